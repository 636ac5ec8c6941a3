"""Sampling grids: diffusers' discrete spacings, Karras sigmas, uniform time."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_jax.diffusion import grids, schedules


def test_discrete_spacings_follow_diffusers():
  # Lin et al. (2024), table 2: T = 1000, 10 inference steps.
  np.testing.assert_array_equal(grids.discrete_timesteps(1000, 10, "leading"),
                                np.arange(900, -1, -100))
  np.testing.assert_array_equal(grids.discrete_timesteps(1000, 10, "leading", 1),
                                np.arange(901, 0, -100))
  np.testing.assert_array_equal(grids.discrete_timesteps(1000, 10, "trailing"),
                                np.arange(999, 0, -100))
  np.testing.assert_array_equal(grids.discrete_timesteps(1000, 10, "linspace"),
                                [999, 888, 777, 666, 555, 444, 333, 222, 111, 0])


def test_discrete_grid_uses_table_values_then_clean():
  sched = schedules.cosine(1000)
  grid = grids.discrete(sched, 4, "trailing")
  np.testing.assert_allclose(grid[:-1], sched.logsnr_table[[999, 749, 499, 249]],
                             rtol=1e-6)
  assert grid[-1] == np.inf and grid.dtype == np.float32
  assert len(grids.discrete(sched, 4, denoise_to_clean=False)) == 4


def test_karras_formula():
  grid = grids.karras(5, sigma_min=0.01, sigma_max=10.0, rho=7.0)
  sigmas = np.exp(-0.5 * grid[:-1].astype(np.float64))
  ramp = np.arange(5) / 4
  expected = (10 ** (1 / 7) + ramp * (0.01 ** (1 / 7) - 10 ** (1 / 7))) ** 7
  np.testing.assert_allclose(sigmas, expected, rtol=1e-5)
  assert grid[-1] == np.inf
  inner = grids.karras(5, sigma_min=0.01, sigma_max=10.0, denoise_to_clean=False)
  assert len(inner) == 6
  assert np.exp(-0.5 * inner[-1]) == pytest.approx(0.01, rel=1e-5)


@pytest.mark.parametrize("name", schedules.NAMES)
def test_grids_increase_in_logsnr(name):
  sched = schedules.get(name)
  for grid in (grids.uniform_time(sched, 7), grids.karras_for_schedule(sched, 7)):
    assert grid.shape == (8,)
    assert np.all(np.diff(grid) > 0)
  uniform = grids.uniform_time(sched, 4, denoise_to_clean=False)
  np.testing.assert_allclose(uniform, sched.logsnr(np.linspace(1, 0, 5)), rtol=1e-6)


def test_discrete_grid_needs_discrete_schedule():
  with pytest.raises(ValueError, match="discrete schedule"):
    grids.discrete(schedules.ShiftedCosineSchedule(), 10)
  with pytest.raises(ValueError, match="cannot exceed"):
    grids.discrete(schedules.linear(10), 20)


def test_leading_offset_past_the_table_is_a_clear_error():
  # diffusers' leading spacing + steps_offset=1 with as many steps as the table indexes
  # alphas_cumprod[T]; here that is a ValueError saying what to change, not an IndexError.
  sched = schedules.linear(1000)
  with pytest.raises(ValueError, match=r"starts at timestep 1000, past the table's last "
                                       r"step 999: use steps_offset <= 0"):
    grids.discrete(sched, 1000, "leading", steps_offset=1)
  with pytest.raises(ValueError, match="steps_offset <= 1"):
    grids.discrete_timesteps(10, 5, "leading", steps_offset=2)  # 8 + 2 > 9
  with pytest.raises(ValueError, match="steps_offset must be an integer >= 0"):
    grids.discrete_timesteps(1000, 10, "leading", steps_offset=-1)
  assert grids.discrete_timesteps(1000, 999, "leading", steps_offset=1)[0] == 999


@settings(deadline=None, max_examples=200)
@given(T=st.integers(2, 1200), data=st.data())
def test_discrete_timesteps_stay_in_the_table_or_raise(T, data):
  num_steps = data.draw(st.integers(1, T))
  spacing = data.draw(st.sampled_from(grids.SPACINGS))
  offset = data.draw(st.integers(0, 3))
  try:
    steps = grids.discrete_timesteps(T, num_steps, spacing, offset)
  except ValueError as e:
    assert spacing == "leading" and "past the table's last step" in str(e)
    return
  assert steps.shape == (num_steps,)
  assert steps.min() >= 0 and steps.max() <= T - 1
  assert np.all(np.diff(steps) < 0)


def test_trailing_has_exactly_num_steps_timesteps():
  # np.arange(15, 0, -15 / 13) has 14 entries; the 14th became timestep -1.
  steps = grids.discrete_timesteps(15, 13, "trailing")
  assert len(steps) == 13 and steps.min() == 0 and steps[0] == 14
