r"""Imagen's 256 -> 1024 px super-resolution stage (~400M params, no self-attention),
trained on 256 px random crops of 1024 px images with 64 px low-res crops (the network
is fully convolutional apart from text cross-attention, so it samples at 1024 px).
Only shape-checked on CPU.

  python experiments/train.py --config=configs/imagen_sr1024.py --workdir=gs://.../sr1024
"""

from configs import imagen_sr256


def get_config(arg=None):
  c = imagen_sr256.get_config(arg)
  c.model.preset = "imagen_sr1024"
  c.diffusion.schedule_kwargs.shifted_cosine.resolution = 1024
  c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 64
  c.data.resolution = 256          # training crops
  c.data.lowres_resolution = 64
  c.data.crop = "random"
  return c
