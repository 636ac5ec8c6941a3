"""EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", table 1): a thin wrapper around the network.

EDM writes the noisy image as x = x0 + s n (variance exploding, s the noise level) and
the denoiser as

  D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s))
  c_skip = sd^2 / (s^2 + sd^2)    c_out = s sd / sqrt(s^2 + sd^2)
  c_in   = 1 / sqrt(s^2 + sd^2)   c_noise = ln(s) / 4

with sd = sigma_data, the data's standard deviation; the loss weight
lambda(s) = (s^2 + sd^2) / (s sd)^2 = 1 / c_out^2 on ||D - x0||^2 makes it a unit-weight
loss on F, whose target (x0 - c_skip x) / c_out has unit variance when x0 has variance
sd^2 (the paper's "effective training target").

This codebase is variance preserving: x_t = alpha x0 + sigma eps, noise levels as
logsnr = log(alpha^2 / sigma^2). The EDM view of the same point is x = x_t / alpha at
s = sigma / alpha = exp(-logsnr / 2), so on x_t the coefficients become (``vp_coefficients``)

  skip = c_skip / alpha = sd^2 alpha / (sigma^2 + sd^2 alpha^2)
  in   = c_in / alpha   = 1 / sqrt(sigma^2 + sd^2 alpha^2)
  out  = c_out        = sigma sd / sqrt(sigma^2 + sd^2 alpha^2)

which stay finite for every logsnr in [-inf, inf] (the paper's form divides by alpha).
With sd = 1 the denominators are 1 and D = alpha x_t + sigma F: v-prediction with F = -v.

c_noise: the U-Net embeds the log-SNR (sinusoidal features, then an MLP), and
c_noise = ln(s) / 4 = -logsnr / 8 is an affine function of it, so the wrapper passes the
log-SNR through unchanged: a fixed affine reparameterisation of the scalar the network is
told, not a different model. The network never knows it is preconditioned; the wrapped
function outputs the denoised image, so it is an ``x0``-parameterized model function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from diffusion_jax.diffusion.schedules import alpha_sigma, broadcast_to_image

PRECONDITIONINGS = ("none", "edm")


def edm_coefficients(sigma: jnp.ndarray, sigma_data: float
                     ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(c_skip, c_out, c_in, c_noise) of Karras et al. table 1 at VE noise levels sigma [B]."""
  sigma = jnp.asarray(sigma, jnp.float32)
  norm = jnp.sqrt(sigma**2 + sigma_data**2)
  return (sigma_data**2 / norm**2, sigma * sigma_data / norm, 1.0 / norm,
          jnp.log(sigma) / 4.0)


def edm_sigma(logsnr: jnp.ndarray) -> jnp.ndarray:
  """The VE noise level sigma / alpha = exp(-logsnr / 2) of a log-SNR [B]."""
  return jnp.exp(-jnp.asarray(logsnr, jnp.float32) / 2.0)


def vp_coefficients(logsnr: jnp.ndarray, sigma_data: float
                    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(skip, out, in) [B] acting on x_t: D = skip x_t + out F(in x_t) (module docstring)."""
  alpha, sigma = alpha_sigma(jnp.asarray(logsnr, jnp.float32))
  norm2 = sigma**2 + sigma_data**2 * alpha**2
  return sigma_data**2 * alpha / norm2, sigma * sigma_data * jnp.sqrt(1.0 / norm2), \
      jnp.sqrt(1.0 / norm2)


@dataclasses.dataclass(frozen=True)
class EDMPreconditioning:
  """The EDM wrapper for data of standard deviation ``sigma_data`` (0.5 in the paper)."""

  sigma_data: float = 0.5

  def __post_init__(self):
    if not self.sigma_data > 0:
      raise ValueError(f"sigma_data must be positive, got {self.sigma_data}.")

  def wrap(self, network: Callable) -> Callable:
    """``network(x_in [B, ...], logsnr [B], *args, **kwargs) -> F [B, ...]`` -> the
    denoiser ``(x_t, logsnr, *args, **kwargs) -> D [B, ...]`` (an x0 estimate). Extra
    arguments (the condition) pass through untouched."""
    def denoiser(x_t, logsnr, *args, **kwargs):
      logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), x_t.shape[:1])
      skip, out, scale_in = (broadcast_to_image(c, x_t)
                             for c in vp_coefficients(logsnr, self.sigma_data))
      f = network((scale_in * x_t).astype(x_t.dtype), logsnr, *args, **kwargs)
      return skip * x_t + out * f.astype(jnp.float32)
    return denoiser

  def network_target(self, x0: jnp.ndarray, x_t: jnp.ndarray,
                     logsnr: jnp.ndarray) -> jnp.ndarray:
    """What F should output, (x0 - c_skip x) / c_out, [B, ...] (finite for finite logsnr)."""
    skip, out, _ = (broadcast_to_image(c, x_t) for c in vp_coefficients(logsnr,
                                                                         self.sigma_data))
    return (x0 - skip * x_t) / out


def get(name: str, sigma_data: float = 0.5) -> EDMPreconditioning | None:
  """The preconditioning called ``name`` ("none" -> None, "edm"), for configs."""
  if name not in PRECONDITIONINGS:
    raise ValueError(f"Unknown preconditioning {name!r}; choose one of "
                     f"{', '.join(PRECONDITIONINGS)}.")
  return EDMPreconditioning(sigma_data) if name == "edm" else None


def check_parameterization(preconditioning: EDMPreconditioning | None,
                           parameterization: str) -> None:
  """The wrapped model outputs the denoised image, so only ``x0`` describes it."""
  if preconditioning is not None and parameterization != "x0":
    raise ValueError("EDM preconditioning makes the model output the denoised image "
                     f"D(x; sigma), so its parameterization must be 'x0', not "
                     f"{parameterization!r}.")
