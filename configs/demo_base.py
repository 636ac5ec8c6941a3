r"""Demo base stage: text -> 32 px shapes on CPU in minutes (1.1M-param U-Net).

  python experiments/train.py --config=configs/demo_base.py --workdir=runs/demo/base

`--config=configs/demo_base.py:smoke` shrinks it to a few steps (tests, laptops).
"""

from configs import common


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/demo_base.py takes no argument or ':smoke', got {arg!r}.")
  c = common.get_config()
  c.model.preset = "demo_base"
  c.diffusion.schedule_kwargs.shifted_cosine.resolution = 32
  c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 32
  c.data.resolution = 32
  # Min-SNR-5: 0.656 vs 0.354 colour x shape at step 1000 against the uniform v-loss
  # (configs/sweeps/weighting.py; README "Ablation results").
  c.diffusion.weighting = "min_snr"
  c.data.shapes_num_train = 20_000
  c.data.shapes_max_objects = 1
  # Every object large (radius 0.23-0.29 of the image, not also 0.13-0.17): 0.854 vs 0.510
  # colour x shape at step 800, 0.906 at step 1000 (benchmarks/convergence.py; README
  # "Demo results"). ShapesEval's colour x shape prompts name no size.
  c.data.shapes_single_size = "large"
  c.text.cache_dir = "data/text_cache"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0
  c.train.batch_size = 32
  c.train.num_steps = 3000
  c.train.time_budget_s = 480.0
  c.train.ema_decay = 0.995
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.preview_every = 500
  if arg == "smoke":
    c.data.shapes_num_train = 256
    c.train.batch_size = 8
    c.train.num_steps = 2
    c.train.time_budget_s = None
    c.train.log_every = 1
    c.train.preview_every = 2
    c.train.preview_steps = 3
  return c
