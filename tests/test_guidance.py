"""Classifier-free and classifier guidance, dynamic and static thresholding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_data import MU, STD, exact_x0, posterior_var_x0
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diffusion_jax.diffusion import grids, guidance, samplers, schedules
from diffusion_jax.diffusion import parameterization as P
from diffusion_jax.diffusion.schedules import alpha_sigma


def _toy_cond_model(calls):
  def cond_model_fn(x_t, logsnr, cond):
    calls.append(x_t.shape[0])
    return x_t * cond["scale"][:, None] + logsnr[:, None]
  return cond_model_fn


def test_classifier_free_guidance_combination_in_one_call():
  calls = []
  x = jnp.arange(6.0).reshape(3, 2)
  logsnr = jnp.array([0.0, 1.0, 2.0])
  cond = {"scale": jnp.array([2.0, 3.0, 4.0])}
  null = {"scale": jnp.array(1.0)}
  f = _toy_cond_model([])
  c, u = f(x, logsnr, cond), f(x, logsnr, {"scale": jnp.ones(3)})
  for w in (0.0, 1.0, 7.5):
    got = guidance.classifier_free(_toy_cond_model(calls), cond, null, w)(x, logsnr)
    np.testing.assert_allclose(got, u + w * (c - u), rtol=1e-6)
  assert calls == [6, 6, 6]  # one network call on [cond rows; null rows] each time
  schedule = lambda lam: 1.0 + lam  # noqa: E731
  got = guidance.classifier_free(f, cond, null, schedule)(x, logsnr)
  np.testing.assert_allclose(got, u + (1.0 + logsnr[:, None]) * (c - u), rtol=1e-6)


def test_classifier_free_guidance_is_parameterization_agnostic():
  # Guiding eps or x0 predictions gives the same guided x0 estimate (affine maps).
  key1, key2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key1, (5, 4))
  logsnr = jnp.linspace(-2, 2, 5)
  alpha, sigma = alpha_sigma(logsnr)
  cond, null = {"c": jax.random.normal(key2, (5, 4))}, {"c": jnp.zeros(4)}

  def x0_net(x_t, lam, c):
    return jnp.tanh(x_t + c["c"])

  def eps_net(x_t, lam, c):
    a, s = alpha_sigma(lam)
    return (x_t - a[:, None] * x0_net(x_t, lam, c)) / s[:, None]

  x0_guided = guidance.classifier_free(x0_net, cond, null, 3.0)(x, logsnr)
  eps_guided = guidance.classifier_free(eps_net, cond, null, 3.0)(x, logsnr)
  np.testing.assert_allclose(P.to_x0_eps(eps_guided, x, alpha, sigma, "eps")[0], x0_guided,
                             atol=1e-5)


def _likelihood_log_prob(y, tau):
  """log p(y | x_t) for y | x0 ~ N(x0, tau^2) under Gaussian data: y | x_t is Gaussian
  with mean E[x0 | x_t] and variance Var[x0 | x_t] + tau^2."""
  def log_prob(x_t, logsnr):
    var = (posterior_var_x0(logsnr) + tau**2)[:, None]
    return jnp.sum(-0.5 * (y - exact_x0(x_t, logsnr)) ** 2 / var, axis=1)
  return log_prob


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_classifier_guidance_samples_the_bayes_posterior(parameterization):
  # With the exact time-dependent classifier and scale 1, the guided model is the exact
  # denoiser of p(x0 | y), so sampling gives the closed-form posterior N(m, v).
  y, tau = 1.0, 0.15
  post_var = 1 / (1 / STD**2 + 1 / tau**2)
  post_mean = post_var * (MU / STD**2 + y / tau**2)

  def model_fn(x_t, logsnr):
    alpha, sigma = alpha_sigma(logsnr)
    x0 = exact_x0(x_t, logsnr)
    eps = (x_t - alpha[:, None] * x0) / sigma[:, None]
    return P.from_x0_eps(x0, eps, alpha, sigma, parameterization)

  guided = guidance.classifier(model_fn, _likelihood_log_prob(y, tau), 1.0,
                               parameterization)
  n = 20000
  x_T = samplers.initial_noise(jax.random.key(0), (n, 1))
  run = functools.partial(samplers.heun, guided, parameterization=parameterization)
  out = np.asarray(jax.jit(run)(x_T, grids.karras(100))).ravel()
  # Deterministic Heun with 100 steps: discretisation error ~1e-3 (see test_samplers);
  # sampling error of 20000 draws: mean 0.0008, std 0.0006. 5 standard errors.
  post_std = np.sqrt(post_var)
  assert abs(out.mean() - post_mean) < 5 * post_std / np.sqrt(n)
  assert abs(out.std() - post_std) < 5 * post_std / np.sqrt(2 * n) + 1e-3


def test_classifier_guidance_closed_form_shift():
  c = 0.3
  x = jnp.linspace(-1, 1, 8).reshape(4, 2)
  logsnr = jnp.array([-1.0, 0.0, 1.0, 2.0])
  _, sigma = alpha_sigma(logsnr)
  base = lambda x_t, lam: 0.1 * x_t  # noqa: E731 (an eps prediction)
  log_prob = lambda x_t, lam: -0.5 * jnp.sum((x_t - c) ** 2, axis=1)  # noqa: E731
  got = guidance.classifier(base, log_prob, 2.0, "eps")(x, logsnr)
  np.testing.assert_allclose(got, 0.1 * x + 2.0 * sigma[:, None] * (x - c), rtol=1e-6)


@settings(deadline=None, max_examples=50)
@given(x0=hnp.arrays(np.float32, (3, 16), elements=st.floats(-1, 1, width=32,
                                                        allow_subnormal=False)),
       p=st.floats(0.5, 1.0))
def test_dynamic_threshold_is_identity_inside_unit_box(x0, p):
  # (Subnormals are excluded: XLA on CPU flushes them to zero in any arithmetic.)
  np.testing.assert_array_equal(guidance.dynamic_threshold(jnp.asarray(x0), p), x0)


@settings(deadline=None, max_examples=50)
@given(x0=hnp.arrays(np.float32, (3, 16), elements=st.floats(-50, 50, width=32,
                                                        allow_subnormal=False)),
       p=st.floats(0.5, 1.0))
def test_dynamic_threshold_output_in_unit_box_and_closed_form(x0, p):
  out = np.asarray(guidance.dynamic_threshold(jnp.asarray(x0), p))
  assert np.all(np.abs(out) <= 1.0)
  s = np.maximum(np.quantile(np.abs(x0), p, axis=1, keepdims=True), 1.0)
  np.testing.assert_allclose(out, np.clip(x0, -s, s) / s, rtol=1e-5, atol=1e-6)


def test_static_threshold():
  np.testing.assert_array_equal(guidance.static_threshold(jnp.array([-3.0, 0.5, 2.0])),
                                [-1.0, 0.5, 1.0])


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("threshold", ["static", "dynamic"])
def test_thresholded_model_keeps_x0_estimate_in_range(parameterization, threshold):
  key1, key2 = jax.random.split(jax.random.key(1))
  x = 3.0 * jax.random.normal(key1, (4, 8, 8, 3))
  logsnr = jnp.array([-3.0, -1.0, 0.5, 2.0])
  alpha, sigma = alpha_sigma(logsnr)
  wild = 4.0 * jax.random.normal(key2, x.shape)  # x0 estimates far outside [-1, 1]

  def model_fn(x_t, lam):
    eps = (x_t - alpha[:, None, None, None] * wild) / sigma[:, None, None, None]
    return P.from_x0_eps(wild, eps, alpha, sigma, parameterization)

  wrapped = guidance.thresholded(model_fn, parameterization, threshold)
  x0, eps = P.to_x0_eps(wrapped(x, logsnr), x, alpha, sigma, parameterization)
  assert float(jnp.max(jnp.abs(x0))) <= 1.0 + 1e-5
  expected = (guidance.dynamic_threshold(wild) if threshold == "dynamic" else
              jnp.clip(wild, -1, 1))
  np.testing.assert_allclose(x0, expected, atol=1e-4)
  # (x0, eps) stay consistent with x_t.
  np.testing.assert_allclose(alpha[:, None, None, None] * x0 + sigma[:, None, None, None]
                             * eps, x, atol=1e-4)


def test_thresholding_composes_with_samplers():
  # A model whose x0 estimate is always 3: with dynamic thresholding every sampler ends
  # inside [-1, 1].
  model_fn = guidance.thresholded(lambda x, lam: jnp.full_like(x, 3.0), "x0", "dynamic")
  x = samplers.initial_noise(jax.random.key(0), (2, 4, 4, 3))
  grid = grids.uniform_time(schedules.ShiftedCosineSchedule(), 10)
  for name in samplers.SAMPLERS:
    out = jax.jit(functools.partial(samplers.sample, name, model_fn, parameterization="x0"))(
        x, grid, jax.random.key(1))
    assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-5, name


def test_bad_threshold_input():
  for p in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
      guidance.dynamic_threshold(jnp.ones((1, 4)), p)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
      guidance.thresholded(lambda x, lam: x, "eps", "dynamic", p)
  with pytest.raises(ValueError, match="none, static, dynamic"):
    guidance.thresholded(lambda x, lam: x, "eps", "soft")
