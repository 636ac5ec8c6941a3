r"""Latent base stage: text -> 64 px shapes through the f = 4 autoencoder of
configs/autoencoder_shapes.py (the U-Net diffuses 16x16x4 latents; sampling decodes).

  python experiments/train_autoencoder.py --config=configs/autoencoder_shapes.py \
      --workdir=runs/ae_shapes
  python experiments/train.py --config=configs/latent_shapes.py --workdir=runs/latent
  python experiments/sample.py --workdirs=runs/latent --prompts="a red circle" \
      --outdir=runs/latent/samples

--config.autoencoder.directory names another autoencoder (any diffusers AutoencoderKL
directory, e.g. an SD VAE's vae/). `:smoke` shrinks it to two steps at 16 px (4x4 latents).
"""

from configs import demo_base


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/latent_shapes.py takes no argument or ':smoke', got {arg!r}.")
  # The demo base stage's recipe (and its :smoke sizes), diffusing the autoencoder's latents.
  c = demo_base.get_config(arg)
  c.data.shapes_single_size = None  # measured (README) with either size; the demo's is large
  # Measured (README) with the uniform v-loss; demo_base's min-SNR-5 is untried here.
  c.diffusion.weighting = "uniform"
  c.autoencoder.directory = "runs/ae_shapes/autoencoder"
  # The schedule sees the 16 px latent, not the 64 px image: no resolution shift.
  c.diffusion.schedule_kwargs.shifted_cosine.resolution = 16
  c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 16
  c.data.resolution = 16 if arg == "smoke" else 64
  return c
