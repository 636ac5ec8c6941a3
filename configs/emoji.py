r"""Colour emoji: a 32 -> 64 px cascade captioned with Unicode emoji names and groups
("cat face, animals and nature"; see diffusion_jax/data/emoji.py), held-out emoji for
evaluation (the `test` split, about one in ten, never trained on).

  make data-real   # once: installs fonts-noto-color-emoji + unicode-data, prepares the data
  python experiments/train.py --config=configs/emoji.py:base --workdir=runs/emoji/base
  python experiments/train.py --config=configs/emoji.py:sr --workdir=runs/emoji/sr

Arguments: `base` (the default: text -> 32 px) or `sr` (32 -> 64 px super-resolution with
noise-conditioning augmentation, trained on 32 px crops of 64 px images with 16 px low-res
inputs, as configs/demo_sr.py), optionally with `,smoke` (two steps, for tests):
`configs/emoji.py:sr,smoke`; `:smoke` alone is the base stage's.
"""

from configs import common

# Emoji of the train split (the held-out test split must stay unseen).
PREVIEW_PROMPTS = ("cat face, animals and nature", "rocket, travel and places",
                   "pizza, food and drink", "ghost, smileys and emotion")


def get_config(arg=None):
  parts = arg.split(",") if arg else []
  stages = [p for p in parts if p in ("base", "sr")]
  if len(stages) > 1 or set(parts) - {"base", "sr", "smoke"} or len(set(parts)) < len(parts):
    raise ValueError("configs/emoji.py takes 'base' or 'sr', optionally with ',smoke' "
                     f"(e.g. ':sr,smoke'), or ':smoke'; got {arg!r}.")
  stage, smoke = (stages or ["base"])[0], "smoke" in parts
  c = common.get_config()
  c.text.cache_dir = "data/text_cache"
  c.data.caption_key = "caption"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.train.batch_size = 32
  c.train.ema_decay = 0.995
  c.train.checkpoint_every = 250
  c.train.preview_prompts = PREVIEW_PROMPTS
  if stage == "base":
    c.model.preset = "demo_base"
    c.diffusion.schedule_kwargs.shifted_cosine.resolution = 32
    c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 32
    c.data.dataset = "noto_emoji/32px"
    c.data.resolution = 32
    c.train.num_steps = 20_000
    c.train.time_budget_s = 1200.0
    c.train.preview_every = 500
  else:
    c.model.preset = "demo_sr"
    c.diffusion.schedule_kwargs.shifted_cosine.resolution = 64
    c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 32
    c.diffusion.lowres_schedule = "shifted_cosine"
    c.diffusion.lowres_aug_max_t = 0.5
    c.data.dataset = "noto_emoji/64px"
    c.data.resolution = 32
    c.data.lowres_resolution = 16
    c.data.crop = "random"
    c.train.num_steps = 10_000
    c.train.time_budget_s = 600.0
    c.train.preview_every = 0
  if smoke:
    c.train.batch_size = 8 if stage == "base" else 4
    c.train.num_steps = 2
    c.train.time_budget_s = None
    c.train.log_every = 1
    c.train.preview_every = 2 if stage == "base" else 0
    c.train.preview_steps = 3
  return c
