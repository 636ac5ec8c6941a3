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

from configs import common


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/latent_shapes.py takes no argument or ':smoke', got {arg!r}.")
  c = common.get_config()
  c.autoencoder.directory = "runs/ae_shapes/autoencoder"
  c.model.preset = "demo_base"
  # The schedule sees the 16 px latent, not the 64 px image: no resolution shift.
  c.diffusion.schedule_kwargs.shifted_cosine.resolution = 16
  c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 16
  c.data.resolution = 64
  c.data.shapes_num_train = 20_000
  c.data.shapes_max_objects = 1
  c.text.cache_dir = "data/text_cache"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.train.batch_size = 32
  c.train.num_steps = 3000
  c.train.time_budget_s = 480.0
  c.train.ema_decay = 0.995
  c.train.checkpoint_every = 250
  c.train.preview_every = 500
  if arg == "smoke":
    c.data.resolution = 16
    c.data.shapes_num_train = 256
    c.train.batch_size = 8
    c.train.num_steps = 2
    c.train.time_budget_s = None
    c.train.log_every = 1
    c.train.preview_every = 2
    c.train.preview_steps = 3
  return c
