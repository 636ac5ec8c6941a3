"""Distributions of the training noise level: which log-SNRs the loss sees, how often.

A sampler is ``sample(key, batch) -> (logsnr [B], u [B])``; u in [0, 1] is the draw's
quantile (increasing with the noise, like t), which the train step buckets its loss by.

  * ``UniformTime(schedule)``: t ~ U[0, 1], logsnr = schedule.logsnr(t) (DDPM, VDM,
    Imagen); u = t.
  * ``EDMLogNormal(p_mean, p_std)``: ln(sigma) ~ N(p_mean, p_std^2) for the VE noise level
    sigma = exp(-logsnr / 2) (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", table 1: p_mean = -1.2, p_std = 1.2), i.e.
    logsnr ~ N(-2 p_mean, 4 p_std^2); u = Phi(z), the normal CDF of the standardised draw,
    so the loss buckets are equally likely as with uniform t. The schedule does not
    enter training then; it still makes the sampling grid.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

NOISE_SAMPLINGS = ("schedule", "edm_lognormal")


@dataclasses.dataclass(frozen=True, eq=False)
class UniformTime:
  schedule: Any

  def sample(self, key: jax.Array, batch: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    t = jax.random.uniform(key, (batch,))
    return self.schedule.logsnr(t), t


@dataclasses.dataclass(frozen=True)
class EDMLogNormal:
  p_mean: float = -1.2
  p_std: float = 1.2

  def __post_init__(self):
    if not self.p_std > 0:
      raise ValueError(f"p_std must be positive, got {self.p_std}.")

  def sample(self, key: jax.Array, batch: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    z = jax.random.normal(key, (batch,))
    log_sigma = self.p_mean + self.p_std * z
    return -2.0 * log_sigma, jax.scipy.stats.norm.cdf(z)


def get(name: str, schedule: Any, *, p_mean: float = -1.2, p_std: float = 1.2):
  """The noise-level sampler called ``name`` ("schedule" or "edm_lognormal"), for configs."""
  if name not in NOISE_SAMPLINGS:
    raise ValueError(f"Unknown noise sampling {name!r}; choose one of "
                     f"{', '.join(NOISE_SAMPLINGS)}.")
  if name == "schedule":
    return UniformTime(schedule)
  return EDMLogNormal(p_mean, p_std)
