"""Guidance and thresholding: wrappers that turn networks into ``model_fn``s.

Samplers only see ``model_fn(x_t [B, ...], logsnr [B]) -> prediction``; everything here
returns such a function, so guidance and thresholding compose with every sampler.

* ``classifier_free``: Ho & Salimans (2021). pred = uncond + w (cond - uncond), from one
  batched network call on [conditional rows; null rows]. Because every parameterization
  is affine in the prediction for fixed x_t, guiding eps, x0 or v gives the same result.
* ``classifier``: Dhariwal & Nichol (2021), eps_hat <- eps_hat - w sigma grad log p(y|x_t).
* ``thresholded``: applies ``dynamic_threshold`` (Imagen, Saharia et al. 2022) or
  ``static_threshold`` to the x0 estimate and re-expresses the prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import parameterization as param_lib
from diffusion_jax.diffusion.schedules import alpha_sigma, broadcast_to_image

# A conditional network: (x_t [B, ...], logsnr [B], cond pytree of [B, ...]) -> prediction.
CondModelFn = Callable[[jnp.ndarray, jnp.ndarray, object], jnp.ndarray]


def classifier_free(cond_model_fn: CondModelFn, cond, null_cond,
                    scale: float | Callable[[jnp.ndarray], jnp.ndarray]):
  """Classifier-free guidance.

  Args:
    cond_model_fn: network ``(x_t, logsnr, cond) -> prediction``.
    cond: condition pytree, leaves [B, ...].
    null_cond: null condition pytree; leaves broadcast to the rows of ``cond``
      ([...] or [1, ...], or already [B, ...]).
    scale: guidance weight w (1 = no guidance, 0 = unconditional), or a function of
      logsnr [B] -> w [B] for a guidance schedule over noise levels.
  Returns:
    model_fn(x_t, logsnr) making a single network call on a batch of 2B.
  """
  def broadcast_null(c, n):
    return jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)

  null_cond = jax.tree.map(broadcast_null, cond, null_cond)
  both = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null_cond)

  def model_fn(x_t, logsnr):
    batch = x_t.shape[0]
    logsnr = jnp.broadcast_to(logsnr, (batch,))
    pred = cond_model_fn(jnp.concatenate([x_t, x_t], 0), jnp.concatenate([logsnr, logsnr]),
                         both)
    cond_pred, uncond_pred = pred[:batch], pred[batch:]
    w = scale(logsnr) if callable(scale) else scale
    w = broadcast_to_image(jnp.asarray(w, cond_pred.dtype), cond_pred)
    return uncond_pred + w * (cond_pred - uncond_pred)

  return model_fn


def classifier(model_fn, log_prob_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
               scale: float, parameterization: str):
  """Classifier guidance: shifts the eps estimate by -scale * sigma * grad log p(y | x_t).

  Args:
    model_fn: ``(x_t, logsnr) -> prediction`` in ``parameterization``.
    log_prob_fn: differentiable ``(x_t [B, ...], logsnr [B]) -> log p(y | x_t) [B]``
      (the label y is closed over).
    scale: guidance weight (Dhariwal & Nichol's s).
  """
  param_lib.check(parameterization)
  grad_fn = jax.grad(lambda x, logsnr: jnp.sum(log_prob_fn(x, logsnr)))

  def guided(x_t, logsnr):
    logsnr = jnp.broadcast_to(logsnr, x_t.shape[:1])
    alpha, sigma = alpha_sigma(logsnr)
    _, eps = param_lib.to_x0_eps(model_fn(x_t, logsnr), x_t, alpha, sigma,
                                 parameterization)
    eps = eps - scale * broadcast_to_image(sigma, x_t) * grad_fn(x_t, logsnr)
    x0 = (x_t - broadcast_to_image(sigma, x_t) * eps) / broadcast_to_image(alpha, x_t)
    return param_lib.from_x0_eps(x0, eps, alpha, sigma, parameterization)

  return guided


def check_percentile(percentile: float) -> float:
  if not 0.0 < percentile <= 1.0:
    raise ValueError(f"Dynamic-threshold percentile must lie in (0, 1], got {percentile} "
                     "(Imagen uses 0.995).")
  return percentile


def dynamic_threshold(x0: jnp.ndarray, percentile: float = 0.995) -> jnp.ndarray:
  """Imagen's dynamic thresholding of an x0 estimate [B, ...].

  Per sample: s = max(1, the ``percentile`` quantile of |x0|); clip x0 to [-s, s] and
  divide by s. The result lies in [-1, 1]; samples already inside are unchanged.
  """
  check_percentile(percentile)
  flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  s = broadcast_to_image(s, x0).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


def static_threshold(x0: jnp.ndarray) -> jnp.ndarray:
  """Clips an x0 estimate [B, ...] to [-1, 1]."""
  return jnp.clip(x0, -1.0, 1.0)


THRESHOLDS = ("none", "static", "dynamic")


def thresholded(model_fn, parameterization: str, threshold: str = "dynamic",
                percentile: float = 0.995):
  """Wraps model_fn so its implied x0 estimate is thresholded.

  The prediction is converted to (x0, eps), x0 thresholded, eps recomputed from x_t and
  the new x0 (so the pair stays consistent with x_t), and the result converted back to
  ``parameterization``. ``threshold``: none, static or dynamic.
  """
  param_lib.check(parameterization)
  if threshold not in THRESHOLDS:
    raise ValueError(f"Unknown threshold {threshold!r}; choose one of "
                     f"{', '.join(THRESHOLDS)}.")
  if threshold == "none":
    return model_fn
  if threshold == "dynamic":
    check_percentile(percentile)

  def wrapped(x_t, logsnr):
    logsnr = jnp.broadcast_to(logsnr, x_t.shape[:1])
    alpha, sigma = alpha_sigma(logsnr)
    x0, _ = param_lib.to_x0_eps(model_fn(x_t, logsnr), x_t, alpha, sigma,
                                parameterization)
    x0 = dynamic_threshold(x0, percentile) if threshold == "dynamic" else (
        static_threshold(x0))
    eps = (x_t - broadcast_to_image(alpha, x_t) * x0) / broadcast_to_image(sigma, x_t)
    return param_lib.from_x0_eps(x0, eps, alpha, sigma, parameterization)

  return wrapped
