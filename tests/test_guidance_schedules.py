"""Guidance-weight schedules against their closed forms in t, through the numerical
inverse t(logsnr) of each noise schedule."""

import numpy as np
import pytest

from diffusion_jax.diffusion import guidance_schedules as gs
from diffusion_jax.diffusion import schedules

T = np.linspace(0.0, 1.0, 21, dtype=np.float32)


@pytest.mark.parametrize("name", schedules.NAMES)
def test_time_of_logsnr_inverts_the_schedule(name):
  schedule = schedules.get(name)
  t_of = gs.time_of_logsnr(schedule)
  np.testing.assert_allclose(np.asarray(t_of(schedule.logsnr(T))), T, atol=2e-3)
  # Beyond the schedule's range (clean data, Karras' sigma_max) it clamps.
  np.testing.assert_array_equal(np.asarray(t_of(np.array([np.inf, -np.inf, 1e4, -1e4]))),
                                [0.0, 1.0, 0.0, 1.0])


@pytest.mark.parametrize("name,expected", [
    ("constant", lambda t: np.full_like(t, 5.0)),
    ("linear", lambda t: 1.5 + 3.5 * (1.0 - t)),
    ("cosine", lambda t: 1.5 + 3.5 * 0.5 * (1.0 + np.cos(np.pi * t))),
])
def test_weights_follow_their_closed_forms(name, expected):
  schedule = schedules.ShiftedCosineSchedule(resolution=32, base_resolution=64)
  w = gs.weight_fn(name, schedule, scale=5.0, scale_min=1.5)
  got = np.full_like(T, w) if name == "constant" else np.asarray(w(schedule.logsnr(T)))
  np.testing.assert_allclose(got, expected(T), atol=1e-2)
  assert name == "constant" or got[0] > got[-1]  # strongest guidance at clean data


def test_unknown_guidance_schedule():
  with pytest.raises(ValueError, match="Unknown guidance schedule 'step'; choose one of "
                                       "constant, linear, cosine"):
    gs.weight_fn("step", schedules.ShiftedCosineSchedule(), 3.0)
