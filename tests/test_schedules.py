"""Schedules: closed forms, DDPM tables, properties, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_jax.diffusion import schedules

ALL = {
    "linear": schedules.linear(),
    "cosine": schedules.cosine(),
    "sigmoid": schedules.SigmoidSchedule(),
    "shifted_cosine": schedules.ShiftedCosineSchedule(resolution=256, base_resolution=64),
}
LOGSNR_FNS = {name: jax.jit(s.logsnr) for name, s in ALL.items()}


def test_linear_table_is_ddpm():
  T = 1000
  betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
  abar, expected = 1.0, []
  for b in betas:
    abar *= 1.0 - b
    expected.append(abar)
  sched = schedules.linear(T)
  assert sched.alphas_cumprod.dtype == np.float64
  np.testing.assert_allclose(sched.alphas_cumprod, expected, rtol=1e-12)


def test_cosine_table_closed_form_and_cap():
  T, s = 1000, 0.008
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
  sched = schedules.cosine(T)
  # Away from the capped last beta, alpha_bar_i = f(i + 1) / f(0) (Nichol & Dhariwal).
  expected = np.array([f(i + 1) / f(0) for i in range(T - 1)])
  np.testing.assert_allclose(sched.alphas_cumprod[:-1], expected, rtol=1e-10)
  assert sched.betas.max() == pytest.approx(0.999)
  assert sched.betas[-1] == pytest.approx(0.999)
  # Same construction as diffusers' squaredcos_cap_v2: min(1 - f(i+1)/f(i), 0.999).
  betas = [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]
  np.testing.assert_allclose(sched.betas, betas, rtol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_discrete_logsnr_hits_table(name):
  sched = ALL[name]
  idx = np.array([0, 1, 17, 500, 998, 999])
  got = LOGSNR_FNS[name](jnp.asarray(sched.t_of_index(idx), jnp.float32))
  np.testing.assert_allclose(got, sched.logsnr_table[idx], rtol=1e-5, atol=1e-4)


def test_shifted_cosine_closed_form_and_shift():
  base = schedules.ShiftedCosineSchedule(logsnr_min=-10, logsnr_max=10)
  shifted = schedules.ShiftedCosineSchedule(logsnr_min=-10, logsnr_max=10, resolution=256)
  t = np.linspace(0.0, 1.0, 33)
  u_min, u_max = math.atan(math.exp(-5)), math.atan(math.exp(5))
  expected = [-2 * math.log(math.tan(u_min + ti * (u_max - u_min))) for ti in t]
  np.testing.assert_allclose(base.logsnr(t), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(shifted.logsnr(t) - base.logsnr(t), 2 * math.log(64 / 256),
                             atol=1e-5)
  assert float(base.logsnr(0.0)) == pytest.approx(10.0, abs=1e-4)
  assert float(base.logsnr(1.0)) == pytest.approx(-10.0, abs=1e-4)


def test_sigmoid_matches_naive_float64_formula():
  sched = schedules.SigmoidSchedule(start=-3, end=3, tau=0.7)
  sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
  u_lo, u_hi = sched._u_of_logsnr(sched.logsnr_max), sched._u_of_logsnr(sched.logsnr_min)
  for t in [0.05, 0.3, 0.5, 0.77, 0.95]:
    u = u_lo + t * (u_hi - u_lo)
    abar = (sig(3 / 0.7) - sig((u * 6 - 3) / 0.7)) / (sig(3 / 0.7) - sig(-3 / 0.7))
    assert float(sched.logsnr(t)) == pytest.approx(math.log(abar / (1 - abar)), abs=2e-4)
  assert float(sched.logsnr(0.0)) == pytest.approx(15.0, abs=0.05)
  assert float(sched.logsnr(1.0)) == pytest.approx(-15.0, abs=0.05)


# The float32 resolution of "strictly decreasing": an exhaustive scan of every float32 t
# in [0, 1] (XLA:CPU) found ties only between t closer than 2^-23 and no increase at all
# (schedules module docstring). Below this gap the tests only ask for non-increasing.
RESOLUTION = 2.0**-22


def _check_decreasing(name, t1, t2):
  lo_t, hi_t = (float(v) for v in LOGSNR_FNS[name](jnp.array([t1, t2], jnp.float32)))
  assert lo_t >= hi_t, (t1, t2, lo_t, hi_t)
  if float(t2) - float(t1) >= RESOLUTION:
    assert lo_t > hi_t, (t1, t2, lo_t, hi_t)


@settings(deadline=None, max_examples=100)
@given(name=st.sampled_from(sorted(ALL)), a=st.floats(0.0, 1.0, width=32),
       b=st.floats(0.0, 1.0, width=32))
def test_logsnr_strictly_decreasing(name, a, b):
  t1, t2 = sorted((a, b))
  _check_decreasing(name, t1, t2)


@settings(deadline=None, max_examples=100)
@given(name=st.sampled_from(sorted(ALL)), t=st.floats(0.0, 1.0, width=32),
       ulps=st.integers(1, 64))
def test_logsnr_strictly_decreasing_at_tiny_gaps(name, t, ulps):
  # t2 is `ulps` float32 steps above t: gaps from ~1e-45 to ~4e-6, on both sides of
  # RESOLUTION.
  t1 = np.float32(t)
  t2 = min(np.float32(1.0), (t1.view(np.uint32) + np.uint32(ulps)).view(np.float32))
  _check_decreasing(name, t1, t2)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("start", [1e-3, 0.01, 0.1, 0.2, 0.5, 0.9])
def test_logsnr_never_increases_between_adjacent_float32(name, start):
  # 2^18 consecutive float32 t (a float32 rounding of the table interpolation once made
  # the discrete schedules rise between neighbours here), and strictly decreasing for
  # every pair at least RESOLUTION apart.
  first = np.float32(start).view(np.uint32)
  t = np.arange(first, first + 2**18, dtype=np.uint32).view(np.float32)
  logsnr = np.asarray(LOGSNR_FNS[name](t))
  assert np.all(np.diff(logsnr) <= 0)
  ulp = float(np.spacing(t[0]))  # the smallest step in the range
  stride = int(np.ceil(RESOLUTION / ulp))
  assert np.all(logsnr[stride:] < logsnr[:-stride])


@settings(deadline=None, max_examples=100)
@given(logsnr=st.floats(-40.0, 40.0))
def test_alpha_sigma_unit_variance(logsnr):
  alpha, sigma = schedules.alpha_sigma(jnp.float32(logsnr))
  assert abs(float(alpha**2 + sigma**2) - 1.0) < 1e-6
  assert float(jnp.log(alpha**2) - jnp.log(sigma**2)) == pytest.approx(logsnr, abs=1e-3)


def test_alpha_sigma_at_infinity():
  alpha, sigma = schedules.alpha_sigma(jnp.array([jnp.inf, -jnp.inf]))
  np.testing.assert_array_equal(alpha, [1.0, 0.0])
  np.testing.assert_array_equal(sigma, [0.0, 1.0])


def test_q_sample():
  x0 = jnp.ones((2, 4, 4, 3))
  eps = -jnp.ones((2, 4, 4, 3))
  logsnr = jnp.array([0.0, 2.0])
  x_t = schedules.q_sample(x0, eps, logsnr)
  a = np.sqrt(1 / (1 + np.exp(-np.array([0.0, 2.0]))))
  s = np.sqrt(1 - a**2)
  np.testing.assert_allclose(x_t[:, 0, 0, 0], a - s, atol=1e-6)


def test_get_and_bad_input():
  assert isinstance(schedules.get("cosine", num_timesteps=10), schedules.DiscreteSchedule)
  assert schedules.get("shifted_cosine", resolution=128).shift == pytest.approx(
      2 * math.log(0.5))
  with pytest.raises(ValueError, match="linear, cosine, sigmoid, shifted_cosine"):
    schedules.get("quadratic")
  with pytest.raises(ValueError, match="Bad arguments"):
    schedules.get("linear", beta=0.1)
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.linear(1)
  with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
    schedules.ShiftedCosineSchedule(logsnr_min=5, logsnr_max=-5)
