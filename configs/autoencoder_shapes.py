r"""The latent-diffusion autoencoder on 64 px shapes: f = 4 (16x16x4 latents) by default.

  python experiments/train_autoencoder.py --config=configs/autoencoder_shapes.py \
      --workdir=runs/ae_shapes

writes runs/ae_shapes/autoencoder/ (diffusers layout, scaling_factor computed from data),
which configs/latent_shapes.py trains a latent stage on. `:f8` downsamples by 8 (8x8x4
latents); `:smoke` (or `:f8,smoke`) shrinks the run to two steps at 16 px.
"""

from configs import common


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  if args - {"f8", "smoke"}:
    raise ValueError(f"configs/autoencoder_shapes.py takes 'f8' and/or 'smoke', got {arg!r}.")
  c = common.get_config()
  c.data.resolution = 64
  c.data.shapes_num_train = 20_000
  c.data.shapes_max_objects = 1
  a = c.autoencoder
  a.block_out_channels = (32, 64, 64, 64) if "f8" in args else (32, 64, 64)
  a.layers_per_block = 1
  a.latent_channels = 4
  a.norm_num_groups = 16
  a.l1_weight, a.l2_weight, a.kl_weight = 1.0, 0.0, 1e-6
  a.scale_batches = 8
  a.probe_scenes = 300  # the probe on 300 real images per split and their reconstructions
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 50
  c.train.batch_size = 16
  c.train.num_steps = 1500
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  if "smoke" in args:
    c.data.resolution = 16
    c.data.shapes_num_train = 256
    c.train.batch_size = 4
    c.train.num_steps = 2
    c.train.log_every = 1
    a.scale_batches = 1
    a.probe_scenes = 0
  return c
