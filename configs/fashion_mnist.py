r"""Fashion-MNIST: text -> 32 px clothing images (28 px padded), conditioned on the class
caption ("a photo of a sneaker"; templates in diffusion_jax/data/labelled_sources.py).

  make data-real   # once: installs dataset-fashion-mnist and prepares the TFDS dataset
  python experiments/train.py --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

The data is read from /usr/share/datasets/fashion-mnist (Debian `dataset-fashion-mnist`), or
from the four original .gz files in --config.data.source_dir=DIR, and prepared into
data/fashion_mnist_offline/32px on first use. `:smoke` shrinks it to two steps (tests).
"""

from configs import common

# One per class, in label order (diffusion_jax.data.labelled_sources.FASHION_MNIST_CAPTIONS).
PREVIEW_PROMPTS = ("a photo of a sneaker", "a photo of a dress", "a photo of a bag",
                   "a photo of a pair of trousers")


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/fashion_mnist.py takes no argument or ':smoke', got {arg!r}.")
  c = common.get_config()
  c.model.preset = "demo_base"
  c.diffusion.schedule_kwargs.shifted_cosine.resolution = 32
  c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 32
  c.data.dataset = "fashion_mnist_offline/32px"
  c.data.caption_key = "caption"
  c.data.resolution = 32
  c.text.cache_dir = "data/text_cache"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.train.batch_size = 32
  c.train.num_steps = 20_000
  c.train.time_budget_s = 1200.0     # the README's CPU budget
  c.train.ema_decay = 0.995
  c.train.checkpoint_every = 250
  c.train.preview_every = 500
  c.train.preview_prompts = PREVIEW_PROMPTS
  if arg == "smoke":
    c.train.batch_size = 8
    c.train.num_steps = 2
    c.train.time_budget_s = None
    c.train.log_every = 1
    c.train.preview_every = 2
    c.train.preview_steps = 3
  return c
