"""SDEdit / img2img (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with
Stochastic Differential Equations"): forward-noise an input image to an intermediate noise
level and denoise it from there with any sampler.

The method is a grid and a starting point, not a sampler: ``grids.truncate`` keeps the
last ``round(strength * N)`` steps of the grid, and the input is noised to the first level
of the truncated grid with the noise ``samplers.initial_noise`` draws from the key. At
strength 1 the start is that noise itself (the sampler's own x_T: every sampler treats
the first level of a full grid as pure noise), so SDEdit at strength 1 *is* plain
sampling with the same key, bit for bit. As strength -> 0 the kept steps go to zero and
the input comes back unchanged (a strength below 1 / (2N) keeps no step).

Used after a cascade stage with that stage's own model function it is a refiner
(SDXL's refiner runs SDEdit on the base model's output).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import grids, samplers, schedules


def sdedit_start(x0: jnp.ndarray, grid, strength: float, key: jax.Array
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(x_start [B, H, W, C], truncated grid [K + 1]) for an input x0 [B, H, W, C] in [-1, 1].

  ``key``: one key (image i from fold_in(key, i)) or one per image [B], as for samplers.
  x_start = alpha x0 + sigma eps at the truncated grid's first level, eps the sampler's
  initial noise; at strength 1, x_start = eps (see the module docstring).
  """
  truncated = grids.truncate(grid, strength)
  noise = samplers.initial_noise(key, x0.shape, x0.dtype)
  if truncated.shape[0] == len(grid):
    return noise, jnp.asarray(truncated)
  logsnr = jnp.full((x0.shape[0],), truncated[0], jnp.float32)
  return schedules.q_sample(x0, noise, logsnr).astype(x0.dtype), jnp.asarray(truncated)


def sdedit(sampler: str | samplers.ModelFn, model_fn, x0: jnp.ndarray, grid, strength: float,
           key: jax.Array, **sampler_options) -> jnp.ndarray:
  """SDEdit of images x0 [B, H, W, C] -> edited images [B, H, W, C].

  ``sampler``: a name of ``samplers.SAMPLERS`` or a sampler function; its options
  (``parameterization=...``, ``eta=...``) follow. ``strength`` is static (it sets the
  number of steps); jit with ``static_argnames``.
  """
  sampler_fn = samplers.get(sampler) if isinstance(sampler, str) else sampler
  x_start, truncated = sdedit_start(x0, grid, strength, key)
  if truncated.shape[0] < 2:
    return x0
  return sampler_fn(model_fn, x_start, truncated, key, **sampler_options)
