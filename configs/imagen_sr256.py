r"""Imagen's 64 -> 256 px super-resolution stage at paper scale (~600M-param Efficient
U-Net, batch 2048, noise-conditioning augmentation). Only shape-checked on CPU.

  python experiments/train.py --config=configs/imagen_sr256.py --workdir=gs://.../sr256
"""

from configs import imagen_base64


def get_config(arg=None):
  c = imagen_base64.get_config(arg)
  c.model.preset = "imagen_sr256"
  c.diffusion.schedule_kwargs.shifted_cosine.resolution = 256
  c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 64
  c.diffusion.lowres_schedule = "shifted_cosine"
  c.diffusion.lowres_aug_max_t = 1.0
  c.data.resolution = 256
  c.data.lowres_resolution = 64
  c.train.preview_every = 0
  return c
