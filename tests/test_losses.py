"""Loss weightings (closed forms, equivalence across parameterizations) and CFG dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import parameterization as P
from diffusion_jax.diffusion.schedules import alpha_sigma, q_sample


def _problem(seed=0, batch=9):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.uniform(k1, (batch, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, (batch, 4, 4, 3))
  x0_hat = x0 + 0.1 * jax.random.normal(k3, x0.shape)  # an imperfect denoiser's output
  logsnr = jnp.linspace(-5.0, 5.0, batch)
  return x0, eps, x0_hat, logsnr


def test_uniform_is_plain_mse_of_own_target():
  x0, eps, _, logsnr = _problem()
  pred = eps + 0.3
  per_example, metrics = losses.diffusion_loss(pred, x0, eps, logsnr, "eps")
  np.testing.assert_allclose(per_example, np.full(9, 0.09), rtol=1e-5)
  assert float(metrics["loss"]) == pytest.approx(0.09, rel=1e-5)
  assert float(metrics["mse"]) == pytest.approx(0.09, rel=1e-5)


@pytest.mark.parametrize("weighting,kwargs", [("min_snr", {"min_snr_gamma": 5.0}),
                                              ("edm", {"sigma_data": 0.5})])
def test_weighted_loss_is_the_same_x0_space_loss_in_every_parameterization(weighting,
                                                                         kwargs):
  x0, eps, x0_hat, logsnr = _problem()
  alpha, sigma = alpha_sigma(logsnr)
  x_t = q_sample(x0, eps, logsnr)
  eps_hat = (x_t - alpha[:, None, None, None] * x0_hat) / sigma[:, None, None, None]
  snr = np.exp(np.asarray(logsnr, np.float64))
  w_x0 = np.minimum(snr, 5.0) if weighting == "min_snr" else snr + 1 / 0.25
  expected = w_x0 * np.mean((np.asarray(x0_hat) - np.asarray(x0)) ** 2, axis=(1, 2, 3))
  for name in P.PARAMETERIZATIONS:
    pred = P.from_x0_eps(x0_hat, eps_hat, alpha, sigma, name)
    per_example, metrics = losses.diffusion_loss(pred, x0, eps, logsnr, name, weighting,
                                                 **kwargs)
    np.testing.assert_allclose(per_example, expected, rtol=2e-3, err_msg=name)
    assert float(metrics["mse_x0"]) == pytest.approx(
        float(np.mean((np.asarray(x0_hat) - np.asarray(x0)) ** 2)), rel=2e-3)


def test_edm_with_unit_sigma_data_is_uniform_v_loss():
  logsnr = jnp.linspace(-10, 10, 21)
  np.testing.assert_allclose(losses.loss_weight(logsnr, "v", "edm", sigma_data=1.0), 1.0,
                             rtol=1e-6)


@settings(deadline=None, max_examples=100)
@given(logsnr=st.floats(-30.0, 30.0), gamma=st.floats(0.1, 20.0))
def test_min_snr_weights_bounded_by_gamma(logsnr, gamma):
  lam = jnp.array([logsnr], jnp.float32)
  snr = float(np.exp(np.float64(np.float32(logsnr))))
  w_x0 = float(losses.loss_weight(lam, "x0", "min_snr", min_snr_gamma=gamma)[0])
  w_eps = float(losses.loss_weight(lam, "eps", "min_snr", min_snr_gamma=gamma)[0])
  w_v = float(losses.loss_weight(lam, "v", "min_snr", min_snr_gamma=gamma)[0])
  assert 0 < w_x0 <= gamma * (1 + 1e-6)
  assert w_eps == pytest.approx(min(snr, gamma) / snr, rel=1e-4)
  assert w_v == pytest.approx(min(snr, gamma) / (snr + 1), rel=1e-4)
  assert w_eps <= 1 + 1e-6 and w_v <= 1 + 1e-6


def test_drop_condition():
  emb = jnp.arange(1000 * 3, dtype=jnp.float32).reshape(1000, 3) + 1
  mask = jnp.ones((1000, 5), bool)
  cond = {"emb": emb, "mask": mask}
  null = {"emb": jnp.zeros((3,)), "mask": jnp.zeros((1, 5), bool)}
  key = jax.random.key(3)
  new, keep = losses.drop_condition(key, cond, null, 0.1)
  # Rows are dropped whole: kept rows are untouched, dropped rows are all-null.
  np.testing.assert_array_equal(new["emb"][keep], emb[keep])
  assert not np.any(new["emb"][~keep]) and not np.any(new["mask"][~keep])
  assert np.all(new["mask"][keep])
  # 1000 Bernoulli(0.1) draws: std of the dropped count is sqrt(90) ~ 9.5; allow 4 std.
  assert abs(int((~keep).sum()) - 100) < 38
  assert bool(losses.drop_condition(key, cond, null, 0.0)[1].all())
  assert not bool(losses.drop_condition(key, cond, null, 1.0)[1].any())


def test_bad_loss_input():
  with pytest.raises(ValueError, match="uniform, min_snr, edm"):
    losses.loss_weight(jnp.zeros(2), "eps", "p2")
  with pytest.raises(ValueError, match="min_snr_gamma"):
    losses.loss_weight(jnp.zeros(2), "eps", "min_snr", min_snr_gamma=0.0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    losses.drop_condition(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros(3), 1.5)
