r"""InstructPix2Pix on the shapes world (Brooks et al. 2023): a 32 px image-conditioned
stage (the demo_base U-Net with the input image's 3 channels concatenated to x_t) trained
on exact edit pairs (shapes_edits: image = the edited scene, input_image = the original,
caption = the instruction), text and image dropped independently for dual guidance.

  python experiments/train.py --config=configs/instruct_shapes.py --workdir=runs/instruct
  python experiments/edit.py instruct-eval --workdir=runs/instruct --num_pairs=200 \
      --image_guidance=1,1.5 --text_guidance=3,7.5 --outdir=runs/instruct/eval

`--config=configs/instruct_shapes.py:smoke` shrinks it to a few steps (tests, laptops).
"""

from configs import common


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/instruct_shapes.py takes no argument or ':smoke', got {arg!r}.")
  c = common.get_config()
  c.model.preset = "demo_base"
  # The input image's channels (conditioning_builders sets the U-Net's cond_image_channels
  # from the kind). Each condition is dropped on its own: Brooks et al. drop text only,
  # image only and both in 5% of examples each; independent 10% drops give 9% / 9% / 1%.
  c.conditioning.kind = "input_image"
  c.conditioning.drop_prob = 0.1
  c.diffusion.cond_drop_prob = 0.1
  c.diffusion.schedule_kwargs.shifted_cosine.resolution = 32
  c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 32
  c.data.dataset = "shapes_edits"
  c.data.resolution = 32
  c.data.shapes_num_train = 20_000
  c.text.cache_dir = "data/text_cache"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.train.batch_size = 32
  c.train.num_steps = 3000
  c.train.time_budget_s = 720.0
  c.train.ema_decay = 0.995
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  # Text-only previews cannot show an edit (they have no input image).
  c.train.preview_every = 0
  if arg == "smoke":
    c.data.shapes_num_train = 64
    c.train.batch_size = 8
    c.train.num_steps = 2
    c.train.time_budget_s = None
    c.train.log_every = 1
    c.train.checkpoint_every = 2
  return c
