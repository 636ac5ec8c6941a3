"""Sampling grids: the noise levels a sampler visits, as log-SNR values.

A grid is a float32 array [N + 1] of log-SNR values, noisiest first and increasing; a
sampler takes N steps, from ``grid[i]`` to ``grid[i + 1]``. The last entry is ``+inf``
(clean data, alpha = 1, sigma = 0) when the run should end on the denoised image, which
is the default everywhere.

Grids are in log-SNR rather than t because that is all a sampler needs, and because
some grids (Karras et al.) are defined in sigma, where no schedule's t exists; a grid in
t becomes one with ``schedule.logsnr(t)``.

Discrete spacings follow diffusers' semantics for a T-step DDPM table (``leading``,
``trailing``, ``linspace``; see Lin et al. 2024, "Common diffusion noise schedules and
sample steps are flawed", table 2), ending with a jump to clean data as diffusers does
with ``set_alpha_to_one=True``.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.diffusion.schedules import DiscreteSchedule, Schedule

SPACINGS = ("leading", "trailing", "linspace")


def _check_num_steps(num_steps: int) -> int:
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}.")
  return int(num_steps)


def _finish(logsnrs: np.ndarray, denoise_to_clean: bool) -> np.ndarray:
  logsnrs = np.asarray(logsnrs, np.float64)
  if denoise_to_clean:
    logsnrs = np.append(logsnrs, np.inf)
  return logsnrs.astype(np.float32)


def uniform_time(schedule: Schedule, num_steps: int, *, t_start: float = 1.0,
                 t_end: float = 0.0, denoise_to_clean: bool = True) -> np.ndarray:
  """N steps uniform in t from ``t_start`` to ``t_end``.

  With ``denoise_to_clean`` (default) the final point t_end is replaced by clean data,
  so the last step predicts x0; otherwise the grid ends at logsnr(t_end).
  """
  num_steps = _check_num_steps(num_steps)
  if not 0.0 <= t_end < t_start <= 1.0:
    raise ValueError(f"Need 0 <= t_end < t_start <= 1, got {t_end} and {t_start}.")
  t = np.linspace(t_start, t_end, num_steps + 1)
  logsnrs = np.asarray(schedule.logsnr(t), np.float64)
  return _finish(logsnrs[:-1] if denoise_to_clean else logsnrs, denoise_to_clean)


def discrete_timesteps(num_train_timesteps: int, num_steps: int,
                       spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
  """Integer DDPM timesteps in [0, T - 1], descending, chosen as diffusers' schedulers
  choose them. ``steps_offset`` shifts the ``leading`` spacing only (as in diffusers,
  which ignores it for the other two)."""
  num_steps = _check_num_steps(num_steps)
  T = int(num_train_timesteps)
  if num_steps > T:
    raise ValueError(f"num_steps ({num_steps}) cannot exceed the schedule's {T} steps.")
  if int(steps_offset) != steps_offset or steps_offset < 0:
    raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset}.")
  if spacing == "leading":
    ratio = T // num_steps
    steps = (np.arange(num_steps) * ratio).round()[::-1] + int(steps_offset)
    if steps[0] > T - 1:
      # e.g. T = 1000, 1000 steps, offset 1: diffusers would index alphas_cumprod[1000].
      raise ValueError(
          f"'leading' spacing with {num_steps} steps and steps_offset={steps_offset} "
          f"starts at timestep {int(steps[0])}, past the table's last step {T - 1}: use "
          f"steps_offset <= {T - 1 - int(steps[0]) + int(steps_offset)}, fewer steps, or "
          "spacing='trailing'.")
  elif spacing == "trailing":
    # diffusers' formula, except that np.arange(T, 0, -T / num_steps) returns
    # num_steps + 1 values when T / (T / num_steps) rounds above num_steps (T = 15,
    # 13 steps), the extra one being timestep -1 (the *noisiest* entry, via wrap-around).
    steps = (np.round(np.arange(T, 0, -T / num_steps)) - 1)[:num_steps]
  elif spacing == "linspace":
    steps = np.linspace(0, T - 1, num_steps).round()[::-1]
  else:
    raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of "
                     f"{', '.join(SPACINGS)}.")
  return steps.astype(np.int64)


def discrete(schedule: DiscreteSchedule, num_steps: int, spacing: str = "leading",
             *, steps_offset: int = 0, denoise_to_clean: bool = True) -> np.ndarray:
  """Grid on a DDPM table's own timesteps (exact table log-SNR values)."""
  if not isinstance(schedule, DiscreteSchedule):
    raise ValueError("Discrete spacings need a discrete schedule ('linear' or 'cosine'), "
                     f"got {type(schedule).__name__}; use uniform_time or karras.")
  steps = discrete_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)
  return _finish(schedule.logsnr_table[steps], denoise_to_clean)


def karras(num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
           rho: float = 7.0, denoise_to_clean: bool = True) -> np.ndarray:
  """Karras et al. (2022) eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) -
  smax^(1/rho)))^rho, in the VE noise level sigma = exp(-logsnr / 2).

  N steps visit N noise levels from sigma_max to sigma_min, then (by default) clean data.
  Without ``denoise_to_clean`` the N + 1 levels all lie in [sigma_min, sigma_max].
  """
  num_steps = _check_num_steps(num_steps)
  if not 0.0 < sigma_min < sigma_max:
    raise ValueError(f"Need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
  if rho <= 0:
    raise ValueError(f"rho must be positive, got {rho}.")
  n = num_steps if denoise_to_clean else num_steps + 1
  ramp = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
  inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho
  return _finish(-2.0 * np.log(sigmas), denoise_to_clean)


def karras_for_schedule(schedule: Schedule, num_steps: int, *, rho: float = 7.0,
                        denoise_to_clean: bool = True) -> np.ndarray:
  """Karras grid spanning a schedule's own range, logsnr(1) .. logsnr(0)."""
  logsnr_min, logsnr_max = (float(schedule.logsnr(np.float32(1.0))),
                            float(schedule.logsnr(np.float32(0.0))))
  return karras(num_steps, sigma_min=float(np.exp(-0.5 * logsnr_max)),
                sigma_max=float(np.exp(-0.5 * logsnr_min)), rho=rho,
                denoise_to_clean=denoise_to_clean)


def check_strength(strength: float) -> float:
  """An SDEdit strength must lie in (0, 1]."""
  strength = float(strength)
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength must lie in (0, 1] (1 = start from pure noise, small = "
                     f"stay close to the input), got {strength}.")
  return strength


def truncate(grid, strength: float) -> np.ndarray:
  """The last ``round(strength * N)`` steps of an N-step grid (SDEdit, Meng et al. 2022).

  Strength 1 keeps the whole grid; smaller strengths start the run at a less noisy level
  ``grid[N - kept]`` (where an input image is forward-noised to). A strength below
  1 / (2N) keeps no step: the result is the single point ``grid[-1]`` (the input is
  returned as it is). Rounding to whole steps is the grid's own resolution; diffusers'
  img2img floors instead (``int(N * strength)``).
  """
  strength = check_strength(strength)
  grid = np.asarray(grid, np.float32)
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError(f"grid must be 1-D with at least 2 levels, got shape {grid.shape}.")
  num_steps = grid.shape[0] - 1
  kept = min(num_steps, int(np.floor(strength * num_steps + 0.5)))
  return grid[num_steps - kept:]
