"""Training-free inpainting: keep the known pixels of an image, sample the rest.

Two forms:

* ``known_region_model_fn`` wraps a ``model_fn`` (like ``guidance.thresholded``, it acts on
  the x0 estimate): in the known region the x0 estimate is replaced by the input image and
  the eps estimate recomputed from x_t. Every sampler step to the next level is then a step
  of the forward process of the *input* there (DDIM: x_t = alpha_t x0 + sigma_t eps along a
  fixed eps; DDPM: a draw of q(x_t | x_s, x0), whose marginal is q(x_t | x0)), so the model
  sees the forward-noised input in the known region at every step, which is RePaint's
  replacement (Lugmayr et al. 2022, Alg. 1, with the known region's noise following the
  sampler instead of fresh draws), and a run ending at clean data returns the known region
  exactly. It works with every sampler, multistep ones included.

* ``repaint``: Lugmayr et al.'s Algorithm 1 itself with its resampling jumps (go back
  ``jump_length`` levels by forward noising, re-denoise, ``jump_n_sample`` times per jump
  point), which "harmonise" the generated region with the known one. A jump moves *up*
  the grid, which the one-signature samplers (a scan down a grid) cannot express; so this
  is a ``lax.scan`` over a static schedule of moves in which each down move runs a sampler
  on the two-level grid [grid[i], grid[i + 1]] and each up move draws q(x_s | x_t).
  (A multistep sampler such as dpmpp_2m thus takes first-order steps here.)

Masks: ``known`` [B, H, W, 1] or [H, W] (broadcast), 1 / True = keep the input's pixel,
0 = generate it (diffusers' inpainting masks use the opposite: white = repaint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import parameterization as param_lib
from diffusion_jax.diffusion import samplers, schedules
from diffusion_jax.diffusion.schedules import alpha_sigma, broadcast_to_image


def check_mask(image: jnp.ndarray, known: jnp.ndarray) -> jnp.ndarray:
  """The known-region mask as float [B, H, W, 1] for an image [B, H, W, C]; one clear
  ValueError when the sizes differ."""
  image_shape, known = tuple(image.shape), jnp.asarray(known)
  if len(image_shape) != 4:
    raise ValueError(f"image must be [B, H, W, C], got shape {image_shape}.")
  if known.ndim == 2:
    known = known[None, :, :, None]
  elif known.ndim == 3:
    known = known[..., None]
  if known.ndim != 4 or known.shape[1:3] != image_shape[1:3] or known.shape[-1] != 1 or (
      known.shape[0] not in (1, image_shape[0])):
    raise ValueError(f"mask of shape {tuple(jnp.shape(known))} does not fit the image "
                     f"{image_shape}: give [H, W] = {image_shape[1:3]} or "
                     f"[B, H, W, 1] with the image's size.")
  return jnp.broadcast_to(known.astype(image.dtype), image_shape[:3] + (1,))


def known_region_model_fn(model_fn, image: jnp.ndarray, known: jnp.ndarray,
                          parameterization: str):
  """Wraps ``model_fn(x_t [B, H, W, C], logsnr [B])`` so its x0 estimate equals ``image``
  [B, H, W, C] where ``known`` is 1 (see the module docstring)."""
  param_lib.check(parameterization)
  known = check_mask(image, known)

  def wrapped(x_t, logsnr):
    logsnr = jnp.broadcast_to(logsnr, x_t.shape[:1])
    alpha, sigma = alpha_sigma(logsnr)
    x0, eps = param_lib.to_x0_eps(model_fn(x_t, logsnr), x_t, alpha, sigma,
                                  parameterization)
    x0 = known * image + (1 - known) * x0
    # eps from x_t and the new x0, so the pair stays consistent with x_t (as in
    # guidance.thresholded); sigma > 0 at every level a sampler calls the model at.
    eps = (x_t - broadcast_to_image(alpha, x_t) * x0) / broadcast_to_image(sigma, x_t)
    return param_lib.from_x0_eps(x0, eps, alpha, sigma, parameterization)

  return wrapped


def repaint_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = 1
                     ) -> np.ndarray:
  """Positions [M + 1] visited on an N-step grid (0 = noisiest, N = clean).

  Down moves go i -> i + 1; after arriving at a jump point (a positive multiple of
  ``jump_length`` below N) it jumps up to i - jump_length, ``jump_n_sample - 1`` times per
  point (RePaint's schedule, on the sampler's grid). ``jump_n_sample = 1``: no jumps.
  """
  if int(jump_length) != jump_length or jump_length < 1:
    raise ValueError(f"jump_length must be an integer >= 1, got {jump_length}.")
  if int(jump_n_sample) != jump_n_sample or jump_n_sample < 1:
    raise ValueError(f"jump_n_sample must be an integer >= 1 (1 = no resampling), got "
                     f"{jump_n_sample}.")
  jumps = {p: jump_n_sample - 1 for p in range(jump_length, num_steps, jump_length)}
  position, path = 0, [0]
  while position < num_steps:
    position += 1
    path.append(position)
    if jumps.get(position, 0) > 0:
      jumps[position] -= 1
      position -= jump_length
      path.append(position)
  return np.asarray(path, np.int32)


def repaint(model_fn, image: jnp.ndarray, known: jnp.ndarray, grid, key: jax.Array, *,
            parameterization: str, sampler: str = "ddpm", jump_length: int = 10,
            jump_n_sample: int = 1, **sampler_options) -> jnp.ndarray:
  """RePaint (Lugmayr et al. 2022, Alg. 1 with resampling jumps): images [B, H, W, C].

  Before every down move the known region of x is replaced by a fresh forward-noised
  ``image`` at the current level; after the last move (to clean data, the grid must end
  at +inf) by ``image`` itself, so the known region equals the input exactly.
  ``key``: one key or one per image; move j draws from fold_in(image key, j + 1).
  """
  known = check_mask(image, known)
  if isinstance(grid, np.ndarray) and not np.isposinf(grid[-1]):
    raise ValueError("repaint needs a grid that ends at clean data (+inf); build it with "
                     "denoise_to_clean=True.")
  grid = jnp.asarray(grid, jnp.float32)
  num_steps = grid.shape[0] - 1
  path = repaint_schedule(num_steps, jump_length, jump_n_sample)
  keys = samplers._as_image_keys(key, image.shape[0], "repaint")
  sampler_fn = samplers.get(sampler)
  batch = image.shape[0]

  def normal(j, salt):
    return jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(k, j + 1), salt), image.shape[1:],
        image.dtype))(keys)

  def move(x, inputs):
    j, a, b = inputs
    logsnr_a, logsnr_b = grid[a], grid[b]

    def down(x):
      noised = schedules.q_sample(image, normal(j, 0), jnp.full((batch,), logsnr_a))
      x = known * noised + (1 - known) * x
      step_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, j + 1), 1))(
          keys)
      return sampler_fn(model_fn, x, jnp.stack([logsnr_a, logsnr_b]), step_keys,
                        parameterization=parameterization, **sampler_options)

    def up(x):
      # q(x_s | x_t) for s noisier than t: alpha_{s|t} = alpha_s / alpha_t and
      # sigma_{s|t}^2 = sigma_s^2 - alpha_{s|t}^2 sigma_t^2 = sigma_s^2 (1 - e^{l_s - l_t}).
      (alpha_s, sigma_s), (alpha_t, _) = alpha_sigma(logsnr_b), alpha_sigma(logsnr_a)
      std = sigma_s * jnp.sqrt(-jnp.expm1(logsnr_b - logsnr_a))
      return ((alpha_s / alpha_t) * x + std * normal(j, 2)).astype(x.dtype)

    return jax.lax.cond(b > a, down, up, x), None

  x = samplers.initial_noise(keys, image.shape, image.dtype)
  moves = (jnp.arange(len(path) - 1), jnp.asarray(path[:-1]), jnp.asarray(path[1:]))
  x, _ = jax.lax.scan(move, x, moves)
  return known * image + (1 - known) * x
