"""Shared by test_sharding.py and the scripts it runs in subprocesses (8 host devices, two
processes): a tiny U-Net whose every large dimension divides 8, its inputs and a loss."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.unet import Level, UNet, UNetConfig

CONFIG = UNetConfig(
    levels=(Level(1, 1), Level(2, 1, self_attention=True, cross_attention=True)),
    base_channels=16, cond_dim=32, num_heads=2, head_dim=8, text_pooling="attention",
    super_resolution=True, resolution=8, lowres_resolution=4, text_width=16, text_length=4)
BATCH = 8


def enable_compilation_cache():
  """Subprocesses share the test suite's persistent compilation cache (see conftest.py)."""
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def fast_jit(fn, *args):
  """jit compiled without XLA's backend optimisations: these tiny programs run once, and
  compiling them is what takes the time on two cores."""
  from diffusion_jax import sharding
  compiled = jax.jit(fn).lower(*args).compile(compiler_options=sharding.FAST_COMPILE)
  return compiled(*args)


def inputs(batch=BATCH, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return dict(
      x_t=jax.random.normal(keys[0], (batch, 8, 8, 3)),
      logsnr=jnp.linspace(-6.0, 6.0, batch),
      text_emb=jax.random.normal(keys[1], (batch, 4, 16)),
      text_mask=jnp.arange(4)[None, :] < (jnp.arange(batch)[:, None] % 4 + 1),
      lowres=jax.random.uniform(keys[2], (batch, 4, 4, 3), minval=-1, maxval=1),
      lowres_logsnr=jnp.full((batch,), 3.0))


def init_fn(key):
  """Boxed parameters (with their logical axis names)."""
  return UNet(CONFIG).init(key, **inputs(batch=1))["params"]


def perturb(params, seed=0, scale=0.05):
  """Adds fixed host-side noise to every parameter, keeping each one's sharding: output
  layers start at zero, which would make outputs and most gradients trivially equal."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


def forward(params, batch):
  return UNet(CONFIG).apply({"params": params}, **batch)


def loss(params, batch):
  return jnp.mean((forward(params, batch) - batch["x_t"]) ** 2)
