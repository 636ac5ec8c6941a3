"""Guidance-weight schedules: the classifier-free guidance weight as a function of the
noise level, for ``guidance.classifier_free(..., scale=weight_fn)``.

A schedule is stated in the time t in [0, 1] of a noise schedule (t = 1 pure noise, t = 0
clean data), which a sampler never sees: it only passes log-SNR values, some of them off
any time grid (Karras grids, EDM churn). ``time_of_logsnr`` inverts the noise schedule
numerically (it is strictly decreasing, schedules.py), clamping outside its range.

Named schedules, from ``scale_min`` at pure noise to ``scale`` at clean data (increasing
guidance as noise falls, among the shapes Wang et al. 2024, "Analysis of classifier-free
guidance weight schedulers", found to beat a constant weight):

* ``constant``: w(t) = scale
* ``linear``:   w(t) = scale_min + (scale - scale_min) (1 - t)
* ``cosine``:   w(t) = scale_min + (scale - scale_min) (1 + cos(pi t)) / 2
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion.schedules import Schedule

NAMES = ("constant", "linear", "cosine")


def check(name: str) -> str:
  if name not in NAMES:
    raise ValueError(f"Unknown guidance schedule {name!r}; choose one of {', '.join(NAMES)}.")
  return name


def time_of_logsnr(schedule: Schedule, num_points: int = 4097
                   ) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """t(logsnr) for a schedule: piecewise-linear inverse on ``num_points`` times (any
  shape in, the same shape out; logsnr beyond the schedule's range clamps to 0 or 1)."""
  t = np.linspace(0.0, 1.0, num_points)
  neg_logsnr = -np.asarray(schedule.logsnr(t), np.float64)  # increasing in t
  xp, fp = jnp.asarray(neg_logsnr, jnp.float32), jnp.asarray(t, jnp.float32)

  def t_of(logsnr):
    return jnp.interp(-jnp.asarray(logsnr, jnp.float32), xp, fp)

  return t_of


def weight(name: str, t: jnp.ndarray, scale: float, scale_min: float = 1.0) -> jnp.ndarray:
  """The guidance weight of schedule ``name`` at times t (any shape)."""
  check(name)
  t = jnp.asarray(t, jnp.float32)
  if name == "constant":
    return jnp.full_like(t, scale)
  ramp = 1.0 - t if name == "linear" else 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  return scale_min + (scale - scale_min) * ramp


def weight_fn(name: str, schedule: Schedule, scale: float, scale_min: float = 1.0
              ) -> float | Callable[[jnp.ndarray], jnp.ndarray]:
  """``scale`` itself for ``constant`` (or when ``scale_min`` equals it: a constant 1 then
  skips guidance's second network call), else logsnr [B] -> w [B] (for classifier_free)."""
  if check(name) == "constant" or scale == scale_min:
    return scale
  t_of = time_of_logsnr(schedule)
  return lambda logsnr: weight(name, t_of(logsnr), scale, scale_min)
