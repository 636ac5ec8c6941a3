"""Gaussian data N(mu, s^2) per dimension: every quantity of the diffusion is closed-form.

x_t = alpha x0 + sigma eps is Gaussian with mean alpha mu and variance alpha^2 s^2 +
sigma^2, so the exact denoiser, the posterior variance and the probability-flow ODE's
solution (an affine map that keeps each point's standardised value) are all known.
"""

import jax.numpy as jnp

from diffusion_jax.diffusion.schedules import alpha_sigma, broadcast_to_image

MU, STD = 0.5, 0.2


def marginal_var(alpha, sigma, std=STD):
  return alpha**2 * std**2 + sigma**2


def exact_x0(x_t, logsnr, mu=MU, std=STD):
  """E[x0 | x_t] for x_t [B, ...], logsnr [B]."""
  alpha, sigma = alpha_sigma(logsnr)
  a, s = broadcast_to_image(alpha, x_t), broadcast_to_image(sigma, x_t)
  return mu + a * std**2 / marginal_var(a, s, std) * (x_t - a * mu)


def posterior_var_x0(logsnr, std=STD):
  """Var[x0 | x_t], [B]."""
  alpha, sigma = alpha_sigma(logsnr)
  return std**2 * sigma**2 / marginal_var(alpha, sigma, std)


def x0_model_fn(x_t, logsnr):
  """The exact denoiser as an x0-parameterized model_fn."""
  return exact_x0(x_t, logsnr)


def ode_solution(x_start, logsnr_start, logsnr_end, mu=MU, std=STD):
  """Exact probability-flow ODE solution from logsnr_start to logsnr_end."""
  a0, s0 = alpha_sigma(logsnr_start)
  a1, s1 = alpha_sigma(logsnr_end)
  z = (x_start - a0 * mu) / jnp.sqrt(marginal_var(a0, s0, std))
  return a1 * mu + jnp.sqrt(marginal_var(a1, s1, std)) * z
