"""Samplers against Gaussian data, whose exact denoiser and ODE solution are closed-form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_data import MU, STD, exact_x0, ode_solution, x0_model_fn
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_jax.diffusion import grids, samplers, schedules
from diffusion_jax.diffusion import parameterization as P
from diffusion_jax.diffusion.schedules import alpha_sigma

LINEAR = schedules.linear()
DDPM_GRID = grids.discrete(LINEAR, 1000)  # DDPM's own 1000 steps, then clean.

VARIANTS = [("ddpm", {"variance": "small"}), ("ddpm", {"variance": "large"}),
            ("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}), ("dpmpp_2m", {}),
            ("euler", {}), ("euler", {"churn": 40.0}), ("heun", {}),
            ("heun", {"churn": 40.0})]


def _run(name, x, grid, key, parameterization="x0", model_fn=x0_model_fn, **opts):
  fn = functools.partial(samplers.sample, name, model_fn, parameterization=parameterization,
                         **opts)
  return jax.jit(fn)(x, grid, key)


@pytest.mark.parametrize("name,opts", VARIANTS)
def test_output_distribution_matches_data(name, opts):
  n = 20000
  key = jax.random.key(0)
  x_T = samplers.initial_noise(key, (n, 1))
  out = np.asarray(_run(name, x_T, DDPM_GRID, jax.random.key(1), **opts)).ravel()
  assert np.all(np.isfinite(out))
  # Standard errors for n draws: mean s/sqrt(n) = 0.0014, std s/sqrt(2n) = 0.0010. Allow
  # 5 of them; 1000 steps keep the discretisation bias below that (DDPM's posterior-mean
  # plug-in and Euler+churn are first-order and the largest, ~1.5% of the std).
  assert abs(out.mean() - MU) < 5 * STD / np.sqrt(n)
  assert abs(out.std() - STD) < 5 * STD / np.sqrt(2 * n)


def _convergence_slope(name, steps):
  x = jax.random.normal(jax.random.key(5), (512, 1))
  errors = []
  for n in steps:
    grid = np.linspace(-6.0, 6.0, n + 1).astype(np.float32)  # ends at a finite level
    out = (_run("heun", x, grid, None, variable="sigma") if name == "heun_sigma" else
           _run(name, x, grid, None))
    errors.append(float(jnp.max(jnp.abs(out - ode_solution(x, grid[0], grid[-1])))))
  assert errors == sorted(errors, reverse=True), errors
  return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("name,order,steps", [
    ("ddim", 1, (16, 32, 64, 128)), ("euler", 1, (16, 32, 64, 128)),
    ("heun", 2, (16, 32, 64, 128)), ("heun_sigma", 2, (16, 32, 64, 128)),
    ("dpmpp_2m", 2, (32, 64, 128, 256))])
def test_convergence_order_on_probability_flow_ode(name, order, steps):
  # Measured slopes are 0.98 (DDIM, Euler), 2.04 (Heun, both variables), 1.9 (DPM-Solver++ 2M, whose
  # first step is first order) against the closed-form ODE solution.
  assert abs(_convergence_slope(name, steps) - order) < 0.2


def test_euler_is_ddim_eta0():
  x = samplers.initial_noise(jax.random.key(2), (64, 2))
  grid = grids.karras(20)
  np.testing.assert_allclose(_run("euler", x, grid, None), _run("ddim", x, grid, None),
                             atol=1e-5)


def test_ddpm_small_is_ddim_eta1():
  x = samplers.initial_noise(jax.random.key(2), (64, 2))
  grid = grids.discrete(LINEAR, 50)
  key = jax.random.key(9)
  np.testing.assert_allclose(_run("ddpm", x, grid, key),
                             _run("ddim", x, grid, key, eta=1.0), atol=1e-5)


def test_deterministic_samplers_converge_to_the_denoised_ode_end():
  # On Karras grids ending at clean data (the last step is a plain x0 prediction), the
  # error against the ODE's exact endpoint halves with twice the steps for first-order
  # samplers and quarters for second-order ones (measured: 2.0, 4.45, 4.5).
  x = samplers.initial_noise(jax.random.key(3), (256, 1))
  for name, order in [("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)]:
    errors = []
    for n in (100, 200):
      grid = grids.karras(n, sigma_min=0.002, sigma_max=80.0)
      out = _run(name, x, grid, None)
      errors.append(float(jnp.max(jnp.abs(out - ode_solution(x, grid[0], jnp.inf)))))
    assert errors[1] < (2e-2 if order == 1 else 1e-3), (name, errors)
    assert 0.85 * 2**order < errors[0] / errors[1] < 1.2 * 2**order, (name, errors)


# Multi-scale Gaussian data: images have modes (object colour over many pixels) whose
# signal is far above the noise at sigma ~ 6 while fine detail is not, so the denoised
# estimate changes along the whole trajectory. MU, STD's single scale (0.2) hides that.
SCALES = jnp.array([0.05, 0.2, 1.0, 5.0, 20.0])
WIDE_RANGE = schedules.get("shifted_cosine", logsnr_min=-15.0, logsnr_max=15.0,
                           resolution=32, base_resolution=32)


def _multiscale_errors(name, grid, **opts):
  """RMS error of the sampler's end against the exact ODE end, per mode, in its std."""
  x = samplers.initial_noise(jax.random.key(3), (256, SCALES.shape[0]))
  out = _run(name, x, grid, None, model_fn=lambda x_t, logsnr: exact_x0(x_t, logsnr, 0.0,
                                                                         SCALES), **opts)
  ref = ode_solution(x, grid[0], jnp.inf, 0.0, SCALES)
  return np.asarray(jnp.sqrt(jnp.mean((out - ref) ** 2, axis=0)) / SCALES)


@pytest.mark.parametrize("grid", [grids.uniform_time(WIDE_RANGE, 10),
                                  grids.karras_for_schedule(WIDE_RANGE, 10)],
                         ids=["uniform", "karras_for_schedule"])
def test_heun_beats_euler_on_steps_spanning_decades_of_sigma(grid):
  # The 10-step uniform grid's first step is sigma 1808 -> 6.3, the Karras grid's last
  # finite one 0.039 -> 0.00055. Measured per-mode errors (in stds) on the uniform grid:
  # Euler 0.69 0.28 0.12 0.29 0.66, Heun 0.68 0.22 0.02 0.01 0.44, EDM's trapezoid in
  # sigma 0.68 0.07 3.7 44 36 (it extrapolates the denoised estimate 143-fold).
  euler_err, heun_err = _multiscale_errors("euler", grid), _multiscale_errors("heun", grid)
  assert np.all(heun_err < euler_err), (heun_err, euler_err)
  assert np.max(_multiscale_errors("heun", grid, variable="sigma")) > 2 * np.max(euler_err)


@pytest.mark.parametrize("name,opts", VARIANTS)
def test_parameterization_does_not_change_samples(name, opts):
  # The same exact denoiser expressed as eps, x0 and v gives the same samples.
  def as_param(param):
    def model_fn(x_t, logsnr):
      alpha, sigma = alpha_sigma(logsnr)
      x0 = exact_x0(x_t, logsnr)
      eps = (x_t - alpha[:, None] * x0) / sigma[:, None]
      return P.from_x0_eps(x0, eps, alpha, sigma, param)
    return model_fn

  x = samplers.initial_noise(jax.random.key(4), (32, 3))
  grid = grids.karras(12)
  key = jax.random.key(8)
  ref = _run(name, x, grid, key, "x0", as_param("x0"), **opts)
  for param in ("eps", "v"):
    np.testing.assert_allclose(_run(name, x, grid, key, param, as_param(param), **opts), ref,
                               atol=2e-4, err_msg=param)


@pytest.mark.parametrize("name,opts", VARIANTS)
def test_image_alone_equals_image_in_batch(name, opts):
  key = jax.random.key(11)
  grid = grids.karras(8)
  batch = _run(name, samplers.initial_noise(key, (6, 4, 4, 3)), grid, key, **opts)
  keys = samplers.image_keys(key, 1, start=4)
  alone = _run(name, samplers.initial_noise(keys, (1, 4, 4, 3)), grid, keys, **opts)
  np.testing.assert_allclose(alone[0], batch[4], atol=1e-6)
  assert not np.allclose(batch[4], batch[3])


def test_heun_makes_no_model_call_at_clean_data():
  def model_fn(x_t, logsnr):
    poison = jnp.where(jnp.isfinite(logsnr), 0.0, jnp.nan)[:, None]
    return exact_x0(x_t, logsnr) + poison

  x = samplers.initial_noise(jax.random.key(0), (8, 1))
  assert np.all(np.isfinite(_run("heun", x, grids.karras(5), None, model_fn=model_fn)))


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), key_seed=st.integers(0, 2**31 - 1))
def test_ddim_eta0_is_deterministic(seed, key_seed):
  x = samplers.initial_noise(jax.random.key(seed), (4, 2, 2, 1))
  grid = grids.karras(6)
  first = _run("ddim", x, grid, jax.random.key(key_seed))
  again = _run("ddim", x, grid, jax.random.key(key_seed + 1))
  np.testing.assert_array_equal(first, again)


def test_bad_input():
  x = jnp.zeros((2, 1))
  with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m, euler, heun"):
    samplers.sample("plms", x0_model_fn, x, grids.karras(3))
  with pytest.raises(ValueError, match="num_steps"):
    grids.karras(0)
  with pytest.raises(ValueError, match="num_steps"):
    grids.uniform_time(LINEAR, 0)
  with pytest.raises(ValueError, match="num_steps"):
    grids.discrete(LINEAR, -3)
  with pytest.raises(ValueError, match="at least 2 noise levels"):
    samplers.ddim(x0_model_fn, x, jnp.array([1.0]))
  with pytest.raises(ValueError, match="leading, trailing, linspace"):
    grids.discrete(LINEAR, 10, "even")
  with pytest.raises(ValueError, match="small, large"):
    samplers.ddpm(x0_model_fn, x, grids.karras(3), jax.random.key(0), variance="fixed")
  with pytest.raises(ValueError, match="one per image"):
    samplers.ddpm(x0_model_fn, x, grids.karras(3), jax.random.split(jax.random.key(0), 3))
  with pytest.raises(ValueError, match="lambda, sigma"):
    samplers.heun(x0_model_fn, x, grids.karras(3), variable="t")


@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 0.5}),
                                       ("euler", {"churn": 10.0}), ("heun", {"churn": 10.0})])
def test_stochastic_sampler_without_key_says_it_needs_one(name, opts):
  x = jnp.zeros((2, 1))
  with pytest.raises(ValueError, match=f"^{name}.* needs a key: pass key=jax.random.key"):
    samplers.sample(name, x0_model_fn, x, grids.karras(3), None, parameterization="x0",
                    **opts)
  with pytest.raises(ValueError, match="initial_noise .*needs a key"):
    samplers.initial_noise(None, (2, 1))


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "heun"])
def test_deterministic_samplers_need_no_key(name):
  x = samplers.initial_noise(jax.random.key(0), (2, 1))
  assert np.all(np.isfinite(_run(name, x, grids.karras(3), None)))
