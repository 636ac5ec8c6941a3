"""Per-example weighted MSE losses and condition dropout for classifier-free guidance.

A weighting is defined once, as a weight ``w_x0(logsnr)`` on the x0-space error
||x0_hat - x0||^2, and converted to whichever target the network predicts. The
conversion follows from the parameterizations (SNR = exp(logsnr)):
  ||eps_hat - eps||^2 = SNR       ||x0_hat - x0||^2
  ||v_hat - v||^2     = (1 + SNR) ||x0_hat - x0||^2
so the weight on the eps-loss is w_x0 / SNR and on the v-loss w_x0 / (1 + SNR).

Weightings:
  * ``uniform``: the plain MSE of the network's own target (weight 1 whatever it is);
    "L_simple" of Ho et al. for eps.
  * ``min_snr``: Min-SNR-gamma (Hang et al. 2023), w_x0 = min(SNR, gamma), i.e.
    min(SNR, gamma) / SNR on eps and min(SNR, gamma) / (SNR + 1) on v.
  * ``edm``: Karras et al. (2022), w_x0 = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    with the VE noise level sigma^2 = 1 / SNR, i.e. w_x0 = SNR + 1 / sigma_data^2.
    (With sigma_data = 1 this is exactly the uniform v-loss.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import parameterization as param_lib
from diffusion_jax.diffusion.schedules import alpha_sigma

WEIGHTINGS = ("uniform", "min_snr", "edm")


def x0_weight(logsnr: jnp.ndarray, weighting: str, *, min_snr_gamma: float = 5.0,
              sigma_data: float = 0.5) -> jnp.ndarray:
  """Weight on the x0-space squared error, [B]. Not defined for ``uniform``."""
  snr = jnp.exp(logsnr)
  if weighting == "min_snr":
    return jnp.minimum(snr, min_snr_gamma)
  if weighting == "edm":
    return snr + 1.0 / sigma_data**2
  raise ValueError(f"x0_weight is defined for 'min_snr' and 'edm', not {weighting!r}.")


def loss_weight(logsnr: jnp.ndarray, parameterization: str, weighting: str = "uniform",
                *, min_snr_gamma: float = 5.0, sigma_data: float = 0.5) -> jnp.ndarray:
  """Weight [B] on the MSE of the network's own target (eps, x0 or v)."""
  param_lib.check(parameterization)
  if weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown loss weighting {weighting!r}; choose one of "
                     f"{', '.join(WEIGHTINGS)}.")
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if weighting == "uniform":
    return jnp.ones_like(logsnr)
  if weighting == "min_snr" and min_snr_gamma <= 0:
    raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}.")
  if weighting == "edm" and sigma_data <= 0:
    raise ValueError(f"sigma_data must be positive, got {sigma_data}.")
  w = x0_weight(logsnr, weighting, min_snr_gamma=min_snr_gamma, sigma_data=sigma_data)
  if parameterization == "x0":
    return w
  # w / SNR and w / (1 + SNR) written with exp(-logsnr) and sigmoid so that neither
  # overflows at large |logsnr|.
  if parameterization == "eps":
    if weighting == "min_snr":
      return jnp.minimum(1.0, min_snr_gamma * jnp.exp(-logsnr))
    return 1.0 + jnp.exp(-logsnr) / sigma_data**2
  sigma2 = jax.nn.sigmoid(-logsnr)  # = 1 / (1 + SNR)
  if weighting == "min_snr":
    return jnp.minimum(jax.nn.sigmoid(logsnr), min_snr_gamma * sigma2)
  return jax.nn.sigmoid(logsnr) + sigma2 / sigma_data**2


def diffusion_loss(prediction: jnp.ndarray, x0: jnp.ndarray, eps: jnp.ndarray,
                   logsnr: jnp.ndarray, parameterization: str,
                   weighting: str = "uniform", *, min_snr_gamma: float = 5.0,
                   sigma_data: float = 0.5) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Weighted MSE between a prediction and its target.

  Args:
    prediction: network output [B, H, W, C], in ``parameterization``.
    x0, eps: the clean image and the noise that made x_t, [B, H, W, C].
    logsnr: noise level of each example, [B].
  Returns:
    (per-example losses [B] float32, metrics dict of scalars: ``loss`` (weighted mean),
    ``mse`` (unweighted mean of the target's MSE) and ``mse_x0`` (x0-space MSE, comparable
    across parameterizations)).
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  alpha, sigma = alpha_sigma(logsnr)
  target = param_lib.from_x0_eps(x0, eps, alpha, sigma, parameterization)
  axes = tuple(range(1, prediction.ndim))
  error = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  mse = jnp.mean(jnp.square(error), axis=axes)
  weight = loss_weight(logsnr, parameterization, weighting,
                       min_snr_gamma=min_snr_gamma, sigma_data=sigma_data)
  per_example = weight * mse
  # x0-space error = mse * (conversion factor), the inverse of the table in the docstring.
  to_x0 = {"x0": jnp.ones_like(logsnr), "eps": jnp.exp(-logsnr),
           "v": jax.nn.sigmoid(-logsnr)}[parameterization]
  metrics = {"loss": jnp.mean(per_example), "mse": jnp.mean(mse),
             "mse_x0": jnp.mean(mse * to_x0)}
  return per_example, metrics


def drop_condition(key: jax.Array, cond, null_cond, drop_prob: float):
  """Replaces whole rows of a condition by the null condition with prob. ``drop_prob``.

  Classifier-free guidance training (Ho & Salimans 2021): the same network learns the
  conditional and the unconditional model.

  Args:
    key: PRNG key.
    cond: pytree of arrays with a leading batch dim [B, ...] (e.g. text embeddings
      [B, L, D] and mask [B, L]).
    null_cond: pytree of the same structure whose leaves broadcast to the rows of
      ``cond`` ([...] or [1, ...]), e.g. zero embeddings and an all-False mask.
    drop_prob: probability in [0, 1] of dropping a row.
  Returns:
    (new cond, keep [B] bool).
  """
  if not 0.0 <= drop_prob <= 1.0:
    raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}.")
  leaves = jax.tree.leaves(cond)
  if not leaves:
    raise ValueError("drop_condition needs a non-empty condition pytree.")
  batch = leaves[0].shape[0]
  keep = jax.random.uniform(key, (batch,)) >= drop_prob

  def select(c, n):
    n = jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)
    return jnp.where(keep.reshape((batch,) + (1,) * (c.ndim - 1)), c, n)

  return jax.tree.map(select, cond, null_cond), keep
