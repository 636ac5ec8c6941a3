"""Sampling grids: diffusers' discrete spacings, Karras sigmas, uniform time."""

import numpy as np
import pytest

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
