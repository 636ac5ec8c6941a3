r"""Fashion-MNIST: text -> 32 px clothing images (28 px padded), conditioned on the class
caption ("a photo of a sneaker"; templates in diffusion_jax/data/labelled_sources.py).

  make data-real   # once: installs dataset-fashion-mnist and prepares the TFDS dataset
  python experiments/train.py --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

The data is read from /usr/share/datasets/fashion-mnist (Debian `dataset-fashion-mnist`), or
from the four original .gz files in --config.data.source_dir=DIR, and prepared into
data/fashion_mnist_offline/32px on first use. `:smoke` shrinks it to two steps (tests).
"""

from configs import demo_base

# One per class, in label order (diffusion_jax.data.labelled_sources.FASHION_MNIST_CAPTIONS).
PREVIEW_PROMPTS = ("a photo of a sneaker", "a photo of a dress", "a photo of a bag",
                   "a photo of a pair of trousers")


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/fashion_mnist.py takes no argument or ':smoke', got {arg!r}.")
  # The demo base stage's recipe (U-Net, 32 px schedule, optimizer, EMA, and its :smoke
  # sizes) on the class-captioned Fashion-MNIST images.
  c = demo_base.get_config(arg)
  # Measured (README) with the uniform v-loss; demo_base's min-SNR-5 is untried here.
  c.diffusion.weighting = "uniform"
  c.data.dataset = "fashion_mnist_offline/32px"
  c.data.caption_key = "caption"
  c.train.preview_prompts = PREVIEW_PROMPTS
  if arg != "smoke":
    c.train.num_steps = 20_000
    c.train.time_budget_s = 1200.0     # the README's CPU budget
  return c
