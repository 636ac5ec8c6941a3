"""Noise schedules as log-SNR functions of continuous time t in [0, 1].

Everything downstream (losses, samplers, guidance) only needs the log signal-to-noise
ratio ``logsnr = log(alpha**2 / sigma**2)`` of a noise level, with the variance-preserving
convention ``alpha**2 = sigmoid(logsnr)``, ``sigma**2 = sigmoid(-logsnr)`` (Kingma et al.
2021, "Variational Diffusion Models"). So a schedule is just a strictly decreasing map
``t -> logsnr(t)``: t = 0 is (nearly) clean data, t = 1 is (nearly) pure noise.

Families:
  * ``linear``: DDPM's betas linearly spaced 1e-4 .. 0.02 over T steps (Ho et al. 2020).
  * ``cosine``: Nichol & Dhariwal (2021) ``alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2)``,
    betas capped at 0.999 (diffusers' ``squaredcos_cap_v2``).
  * ``sigmoid``: Chen (2023), "On the importance of noise scheduling".
  * ``shifted_cosine``: the continuous cosine log-SNR ``-2 log tan(pi t / 2)`` shifted by
    ``2 log(base_resolution / resolution)`` (Hoogeboom et al. 2023, "simple diffusion").

The two discrete (DDPM-style) schedules keep their ``alphas_cumprod`` table, computed in
float64 numpy exactly as DDPM defines it. Their continuous ``logsnr(t)`` interpolates the
table's log-SNR linearly with discrete step ``i`` at ``t = i / (T - 1)``, so discrete time
grids (``grids.py``) hit the table values exactly and training can still draw continuous t.

The continuous families are truncated to ``[logsnr_min, logsnr_max]`` by an affine
reparameterisation of t (not by clipping), so they stay strictly decreasing.

In float32 (what ``logsnr`` computes in) "strictly decreasing" holds down to a resolution:
an exhaustive scan of every float32 t in [0, 1] on XLA:CPU (jax 0.10) found every schedule
non-increasing between all adjacent t, with equal values only for t closer than 1.2e-7
(2^-23; 6e-8 for the discrete tables). So t2 - t1 >= 2^-22 gives logsnr(t1) > logsnr(t2).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np


class Schedule(Protocol):
  """Anything with a vectorised, jit-able ``logsnr(t)``; t in [0, 1], any shape."""

  def logsnr(self, t: jnp.ndarray) -> jnp.ndarray:
    ...


def alpha_sigma(logsnr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr).

  Works for logsnr = +inf (clean: alpha = 1, sigma = 0) and -inf (pure noise).
  """
  # jax.nn.sigmoid is exact at +-inf and stable for large |logsnr|.
  logsnr = jnp.asarray(logsnr)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def broadcast_to_image(v: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a per-example vector [B] to [B, 1, ..., 1] to broadcast against x [B, ...]."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(x0: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray) -> jnp.ndarray:
  """Forward process x_t = alpha x0 + sigma eps; x0, eps [B, ...], logsnr [B] or scalar."""
  alpha, sigma = alpha_sigma(logsnr)
  return broadcast_to_image(alpha, x0) * x0 + broadcast_to_image(sigma, x0) * eps


# ----------------------------------------------------------------------------------------
# Discrete (DDPM-style) schedules.


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule:
  """A T-step DDPM schedule given by its betas (float64 numpy, shape [T])."""

  name: str
  betas: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """DDPM's alpha_bar_i = prod_{j <= i} (1 - beta_j), float64 [T]."""
    return np.cumprod(1.0 - self.betas, dtype=np.float64)

  @property
  def logsnr_table(self) -> np.ndarray:
    """log(alpha_bar / (1 - alpha_bar)) per discrete step, float64 [T], decreasing."""
    abar = self.alphas_cumprod
    return np.log(abar) - np.log1p(-abar)

  def t_of_index(self, index) -> np.ndarray:
    """Continuous time of discrete step index i: t = i / (T - 1)."""
    return np.asarray(index, np.float64) / (self.num_timesteps - 1)

  def logsnr(self, t: jnp.ndarray) -> jnp.ndarray:
    t = jnp.asarray(t, jnp.float32)
    table = jnp.asarray(self.logsnr_table, jnp.float32)
    position = jnp.clip(t, 0.0, 1.0) * (self.num_timesteps - 1)
    # Piecewise-linear interpolation of the table; exact at t = i / (T - 1). Written as
    # a + frac * (b - a) clipped to [b, a] so that float32 rounding cannot make it
    # increase: within a cell every operation rounds monotonically, and the clip keeps
    # a cell's values >= the next cell's first value b. (The blend a (1 - frac) +
    # b frac rose between ~5M pairs of adjacent float32 t in [0, 0.25) for T = 1000.)
    lower = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, self.num_timesteps - 1)
    upper = jnp.minimum(lower + 1, self.num_timesteps - 1)
    a, b = table[lower], table[upper]
    return jnp.clip(a + (position - lower) * (b - a), b, a)


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4,
           beta_end: float = 0.02) -> DiscreteSchedule:
  """DDPM's linear beta schedule (Ho et al. 2020)."""
  _check_num_timesteps(num_timesteps)
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  return DiscreteSchedule("linear", betas)


def cosine(num_timesteps: int = 1000, s: float = 0.008,
           max_beta: float = 0.999) -> DiscreteSchedule:
  """Nichol & Dhariwal (2021) cosine schedule with betas capped at ``max_beta``."""
  _check_num_timesteps(num_timesteps)
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  abar = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
  return DiscreteSchedule("cosine", betas)


def _check_num_timesteps(num_timesteps: int) -> None:
  if int(num_timesteps) < 2:
    raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}.")


# ----------------------------------------------------------------------------------------
# Continuous schedules, truncated to [logsnr_min, logsnr_max] by reparameterising t.


def _check_logsnr_range(logsnr_min: float, logsnr_max: float) -> None:
  if not (np.isfinite(logsnr_min) and np.isfinite(logsnr_max) and logsnr_min < logsnr_max):
    raise ValueError(
        f"Need finite logsnr_min < logsnr_max, got {logsnr_min} and {logsnr_max}.")


@dataclasses.dataclass(frozen=True)
class ShiftedCosineSchedule:
  """Continuous cosine log-SNR, -2 log tan(pi u / 2), shifted for resolution.

  The shift 2 log(base_resolution / resolution) (Hoogeboom et al. 2023) keeps the
  per-pixel signal-to-noise of downsampled images comparable across resolutions: larger
  images get noisier. The truncation range applies to the unshifted log-SNR.
  """

  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  resolution: int = 64
  base_resolution: int = 64

  def __post_init__(self):
    _check_logsnr_range(self.logsnr_min, self.logsnr_max)
    if self.resolution <= 0 or self.base_resolution <= 0:
      raise ValueError("resolution and base_resolution must be positive, got "
                       f"{self.resolution} and {self.base_resolution}.")

  @property
  def shift(self) -> float:
    return 2.0 * float(np.log(self.base_resolution / self.resolution))

  def logsnr(self, t: jnp.ndarray) -> jnp.ndarray:
    t = jnp.asarray(t, jnp.float32)
    # u_min/u_max are where the unshifted log-SNR equals logsnr_max/logsnr_min.
    u_min = np.arctan(np.exp(-0.5 * self.logsnr_max))
    u_max = np.arctan(np.exp(-0.5 * self.logsnr_min))
    u = u_min + t * (u_max - u_min)
    return -2.0 * jnp.log(jnp.tan(u)) + self.shift


@dataclasses.dataclass(frozen=True)
class SigmoidSchedule:
  """Chen (2023): alpha_bar(u) = (sigmoid(end/tau) - sigmoid((u(end-start)+start)/tau))
  / (sigmoid(end/tau) - sigmoid(start/tau)), truncated in log-SNR."""

  start: float = -3.0
  end: float = 3.0
  tau: float = 1.0
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0

  def __post_init__(self):
    _check_logsnr_range(self.logsnr_min, self.logsnr_max)
    if not (self.start < self.end and self.tau > 0):
      raise ValueError(f"Need start < end and tau > 0, got start={self.start}, "
                       f"end={self.end}, tau={self.tau}.")

  def _u_of_logsnr(self, logsnr: float) -> float:
    """Inverse of the untruncated schedule, in float64 numpy."""
    v_start, v_end = _np_sigmoid(self.start / self.tau), _np_sigmoid(self.end / self.tau)
    abar = _np_sigmoid(logsnr)
    z = self.tau * _np_logit(v_end - abar * (v_end - v_start))
    return float((z - self.start) / (self.end - self.start))

  def logsnr(self, t: jnp.ndarray) -> jnp.ndarray:
    t = jnp.asarray(t, jnp.float32)
    u_min, u_max = self._u_of_logsnr(self.logsnr_max), self._u_of_logsnr(self.logsnr_min)
    u = u_min + t * (u_max - u_min)
    z = (u * (self.end - self.start) + self.start) / self.tau
    z_start, z_end = self.start / self.tau, self.end / self.tau
    # alpha_bar is proportional to sigmoid(z_end) - sigmoid(z) and 1 - alpha_bar to
    # sigmoid(z) - sigmoid(z_start). Near either end one of them is a difference of two
    # nearly equal float32 numbers, so use the exact identity
    # log(sigmoid(a) - sigmoid(b)) = log_sigmoid(a) + log_sigmoid(-b) + log(-expm1(b - a)).
    return (_log_sigmoid_difference(z_end, z) - _log_sigmoid_difference(z, z_start))


def _log_sigmoid_difference(a, b):
  """log(sigmoid(a) - sigmoid(b)) for a > b, without cancellation."""
  return (jax.nn.log_sigmoid(a) + jax.nn.log_sigmoid(-b) + jnp.log(-jnp.expm1(b - a)))


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.float64(x)))


def _np_logit(p):
  p = np.float64(p)
  return np.log(p) - np.log1p(-p)


# ----------------------------------------------------------------------------------------

_REGISTRY = {
    "linear": linear,
    "cosine": cosine,
    "sigmoid": SigmoidSchedule,
    "shifted_cosine": ShiftedCosineSchedule,
}

NAMES = tuple(_REGISTRY)


def get(name: str, **kwargs) -> Schedule:
  """Schedule by name, e.g. ``get("cosine", num_timesteps=1000)``; for configs."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown schedule {name!r}; choose one of {', '.join(NAMES)}.")
  try:
    return _REGISTRY[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"Bad arguments for schedule {name!r}: {e}") from None


def default_arguments(name: str) -> dict:
  """The keyword arguments schedule ``name`` takes, with their defaults (configs derive
  their per-schedule sections from this), e.g. ``{"start": -3.0, "end": 3.0, ...}``."""
  import inspect

  if name not in _REGISTRY:
    raise ValueError(f"Unknown schedule {name!r}; choose one of {', '.join(NAMES)}.")
  return {p.name: p.default for p in inspect.signature(_REGISTRY[name]).parameters.values()}
