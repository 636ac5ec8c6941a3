"""eps / x0 / v conversions: round trips and consistency with x_t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import parameterization as P
from diffusion_jax.diffusion.schedules import alpha_sigma, q_sample


def _batch(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x0 = jax.random.uniform(k1, (7, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, (7, 4, 4, 3))
  logsnr = jnp.linspace(-6.0, 6.0, 7)
  return x0, eps, logsnr


@pytest.mark.parametrize("name", P.PARAMETERIZATIONS)
def test_round_trip(name):
  x0, eps, logsnr = _batch()
  alpha, sigma = alpha_sigma(logsnr)
  x_t = q_sample(x0, eps, logsnr)
  pred = P.from_x0_eps(x0, eps, alpha, sigma, name)
  x0_back, eps_back = P.to_x0_eps(pred, x_t, alpha, sigma, name)
  # Recovering x0 from eps divides by alpha (and eps from x0 by sigma): float32 rounding
  # of x_t, ~1e-7 * |x_t|, is amplified by at most 1 / min(alpha, sigma) ~ 20 here.
  np.testing.assert_allclose(x0_back, x0, atol=1e-5)
  np.testing.assert_allclose(eps_back, eps, atol=1e-5)
  # And the prediction itself survives the opposite round trip.
  np.testing.assert_allclose(P.from_x0_eps(x0_back, eps_back, alpha, sigma, name), pred,
                             atol=1e-5)


def test_v_closed_form():
  x0, eps, logsnr = _batch(1)
  alpha, sigma = alpha_sigma(logsnr)
  v = P.from_x0_eps(x0, eps, alpha, sigma, "v")
  a, s = alpha[:, None, None, None], sigma[:, None, None, None]
  np.testing.assert_allclose(v, a * eps - s * x0, rtol=1e-6)


def test_denoiser_broadcasts_scalar_logsnr():
  x0, eps, _ = _batch(2)
  x_t = q_sample(x0, eps, jnp.full((7,), 1.5))
  seen = []

  def model_fn(x, logsnr):
    seen.append(logsnr.shape)
    return eps

  x0_hat, eps_hat = P.denoise(model_fn, "eps")(x_t, 1.5)
  assert seen == [(7,)]
  np.testing.assert_allclose(x0_hat, x0, atol=1e-5)


def test_unknown_parameterization():
  with pytest.raises(ValueError, match="eps, x0, v"):
    P.check("score")
