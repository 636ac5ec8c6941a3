"""What a network predicts: eps, x0 or v, and conversions to and from (x0, eps).

With x_t = alpha x0 + sigma eps and alpha^2 + sigma^2 = 1:
  * ``eps``: the noise (Ho et al. 2020); x0 = (x_t - sigma eps) / alpha.
  * ``x0``:  the clean image; eps = (x_t - alpha x0) / sigma.
  * ``v``:   v = alpha eps - sigma x0 (Salimans & Ho 2022, "Progressive distillation");
             x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v.

The parameterization travels beside a model function, never inside the network: the
U-Net outputs an image-shaped tensor and these functions say what it means.
All arrays are [B, ...]; alpha and sigma are [B] (or scalars) and broadcast.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.diffusion.schedules import alpha_sigma, broadcast_to_image

PARAMETERIZATIONS = ("eps", "x0", "v")


def check(parameterization: str) -> str:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"Unknown parameterization {parameterization!r}; choose one of "
                     f"{', '.join(PARAMETERIZATIONS)}.")
  return parameterization


def to_x0_eps(prediction: jnp.ndarray, x_t: jnp.ndarray, alpha: jnp.ndarray,
              sigma: jnp.ndarray, parameterization: str
              ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Network prediction [B, ...] -> (x0, eps) estimates, both [B, ...]."""
  check(parameterization)
  a, s = broadcast_to_image(alpha, x_t), broadcast_to_image(sigma, x_t)
  if parameterization == "eps":
    return (x_t - s * prediction) / a, prediction
  if parameterization == "x0":
    return prediction, (x_t - a * prediction) / s
  return a * x_t - s * prediction, s * x_t + a * prediction


def from_x0_eps(x0: jnp.ndarray, eps: jnp.ndarray, alpha: jnp.ndarray,
                sigma: jnp.ndarray, parameterization: str) -> jnp.ndarray:
  """(x0, eps) [B, ...] -> what a network of this parameterization should output."""
  check(parameterization)
  if parameterization == "eps":
    return eps
  if parameterization == "x0":
    return x0
  a, s = broadcast_to_image(alpha, x0), broadcast_to_image(sigma, x0)
  return a * eps - s * x0


def denoise(model_fn, parameterization: str):
  """Turns ``model_fn(x_t, logsnr) -> prediction`` into ``(x_t, logsnr) -> (x0, eps)``.

  ``logsnr`` may be a scalar (one noise level for the batch) or [B].
  """
  check(parameterization)

  def denoiser(x_t, logsnr):
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), x_t.shape[:1])
    alpha, sigma = alpha_sigma(logsnr)
    return to_x0_eps(model_fn(x_t, logsnr), x_t, alpha, sigma, parameterization)

  return denoiser
