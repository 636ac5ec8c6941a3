r"""Demo super-resolution stage: 32 -> 64 px shapes on CPU, with noise-conditioning
augmentation of the low-res input (Imagen section 2.5), trained on 32 px crops.

  python experiments/train.py --config=configs/demo_sr.py --workdir=runs/demo/sr
"""

from configs import common


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/demo_sr.py takes no argument or ':smoke', got {arg!r}.")
  c = common.get_config()
  c.model.preset = "demo_sr"
  c.diffusion.schedule_kwargs.shifted_cosine.resolution = 64
  c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 32
  c.diffusion.lowres_schedule = "shifted_cosine"
  c.diffusion.lowres_aug_max_t = 0.5
  # Trained on random 32 px crops of 64 px scenes (16 px low-res inputs), as Imagen trains
  # its 1024 px stage on crops: a quarter of the work per example, so four times the
  # examples in the demo's few minutes. The stage has no self-attention, so it samples
  # fully convolutionally at 64 px from the base stage's 32 px images.
  c.data.shapes_resolution = 64
  c.data.resolution = 32
  c.data.lowres_resolution = 16
  c.data.crop = "random"
  c.data.shapes_num_train = 5_000   # super-resolution needs fewer distinct scenes
  c.data.shapes_max_objects = 1
  c.data.shapes_single_size = "large"   # the scenes the base stage draws (configs/demo_base.py)
  c.text.cache_dir = "data/text_cache"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.train.batch_size = 32
  c.train.num_steps = 2000
  c.train.time_budget_s = 300.0
  c.train.ema_decay = 0.995
  c.train.checkpoint_every = 250
  c.train.preview_every = 0
  if arg == "smoke":
    c.data.shapes_num_train = 256
    c.train.batch_size = 4
    c.train.num_steps = 2
    c.train.time_budget_s = None
    c.train.log_every = 1
  return c
