r"""Demo super-resolution stage: 32 -> 64 px shapes on CPU, with noise-conditioning
augmentation of the low-res input (Imagen section 2.5).

  python experiments/train.py --config=configs/demo_sr.py --workdir=runs/demo/sr
"""

from configs import common


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/demo_sr.py takes no argument or ':smoke', got {arg!r}.")
  c = common.get_config()
  c.model.preset = "demo_sr"
  c.diffusion.schedule_kwargs.resolution = 64
  c.diffusion.schedule_kwargs.base_resolution = 32
  c.diffusion.lowres_schedule = "shifted_cosine"
  c.diffusion.lowres_aug_max_t = 0.5
  c.data.resolution = 64
  c.data.lowres_resolution = 32
  c.data.shapes_num_train = 5_000   # super-resolution needs fewer distinct scenes
  c.data.shapes_max_objects = 1
  c.text.cache_dir = "data/text_cache"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.train.batch_size = 16
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
