"""Samplers: each one function ``(model_fn, x_T, logsnrs, key, *, parameterization, ...)
-> x_0`` whose loop is a single ``jax.lax.scan``, so a whole run is one compiled program.

* ``model_fn(x_t [B, H, W, C], logsnr [B]) -> prediction [B, H, W, C]`` in
  ``parameterization`` (eps, x0 or v). Guidance and thresholding are wrappers of
  model_fn (``guidance.py``); samplers never know about them.
* ``logsnrs`` [N + 1] is a grid from ``grids.py``: noisiest first; ``+inf`` = clean.
  (The grid is in log-SNR, not t: it is all a sampler needs, and Karras grids have no t.)
* ``key``: one PRNG key, or one key per image [B]. Image i of a batch draws all its noise
  from ``fold_in(key, i)`` (``image_keys``), so any image can be regenerated alone;
  ``initial_noise`` makes x_T the same way.

Deterministic samplers ignore ``key``. Jit the call (``jax.jit(partial(ddim, model_fn,
parameterization="v"))``); everything here is traceable.

Notation: a step goes from level s (noisier) to level t; alpha^2 = sigmoid(logsnr);
the VE noise level is sigma_ve = sigma / alpha = exp(-logsnr / 2) and y = x / alpha.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import parameterization as param_lib
from diffusion_jax.diffusion.schedules import alpha_sigma

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
HEUN_VARIABLES = ("lambda", "sigma")


def image_keys(key: jax.Array, batch_size: int, start: int = 0) -> jax.Array:
  """Per-image keys fold_in(key, i) for i in [start, start + batch_size)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.arange(start, start + batch_size, dtype=jnp.uint32))


def _as_image_keys(key: jax.Array | None, batch_size: int, needed_by: str) -> jax.Array:
  if key is None:
    raise ValueError(f"{needed_by} draws fresh noise and needs a key: pass "
                     "key=jax.random.key(seed) (or one key per image).")
  single_ndim = 0 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 1
  if key.ndim == single_ndim:
    return image_keys(key, batch_size)
  if key.ndim == single_ndim + 1 and key.shape[0] == batch_size:
    return key
  raise ValueError(f"key must be one PRNG key or {batch_size} keys (one per image), "
                   f"got shape {key.shape}.")


def _per_image_normal(keys: jax.Array, step, shape, dtype) -> jnp.ndarray:
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape, dtype))(
      keys)


def initial_noise(key: jax.Array, shape, dtype=jnp.float32) -> jnp.ndarray:
  """x_T ~ N(0, I) of ``shape`` [B, ...]; image i from ``fold_in(key, i)`` (or key[i])."""
  keys = _as_image_keys(key, shape[0], "initial_noise")
  return _per_image_normal(keys, 0, tuple(shape[1:]), dtype)


def _step_noise(keys, step, x):
  # Step j of a sampler uses fold_in(image_key, j + 1); 0 is x_T's (initial_noise).
  return _per_image_normal(keys, step + 1, x.shape[1:], x.dtype)


def _check_grid(logsnrs) -> jnp.ndarray:
  logsnrs = jnp.asarray(logsnrs, jnp.float32)
  if logsnrs.ndim != 1 or logsnrs.shape[0] < 2:
    raise ValueError("logsnrs must be a 1-D grid of at least 2 noise levels (num_steps >= "
                     f"1), got shape {logsnrs.shape}; build one with diffusion.grids.")
  return logsnrs


def _scan_steps(step_fn, init, logsnrs):
  """Runs step_fn(carry, (index, logsnr_s, logsnr_t)) over consecutive grid pairs."""
  xs = (jnp.arange(logsnrs.shape[0] - 1), logsnrs[:-1], logsnrs[1:])
  carry, _ = jax.lax.scan(lambda c, x: (step_fn(c, x), None), init, xs)
  return carry


def ddim(model_fn: ModelFn, x_T, logsnrs, key=None, *, parameterization: str = "eps",
         eta: float = 0.0):
  """DDIM (Song et al. 2021); eta = 0 is deterministic, eta = 1 is ancestral DDPM."""
  denoise, logsnrs = param_lib.denoise(model_fn, parameterization), _check_grid(logsnrs)
  keys = _as_image_keys(key, x_T.shape[0], f"ddim with eta={eta}") if eta != 0 else None

  def step(x, inputs):
    i, logsnr_s, logsnr_t = inputs
    x0, eps = denoise(x, logsnr_s)
    (_, sigma_s), (alpha_t, sigma_t) = alpha_sigma(logsnr_s), alpha_sigma(logsnr_t)
    x_next = alpha_t * x0
    if eta == 0:
      return (x_next + sigma_t * eps).astype(x.dtype)
    # sigma_eta^2 = eta^2 (sigma_t^2 / sigma_s^2) (1 - alpha_s^2 / alpha_t^2); the last
    # factor as -expm1 of a log-sigmoid difference stays accurate for close levels.
    sigma_eta = eta * (sigma_t / sigma_s) * jnp.sqrt(-jnp.expm1(
        jax.nn.log_sigmoid(logsnr_s) - jax.nn.log_sigmoid(logsnr_t)))
    direction = jnp.sqrt(jnp.maximum(sigma_t**2 - sigma_eta**2, 0.0))
    x_next = x_next + direction * eps + sigma_eta * _step_noise(keys, i, x)
    return x_next.astype(x.dtype)

  return _scan_steps(step, x_T, logsnrs)


def ddpm(model_fn: ModelFn, x_T, logsnrs, key=None, *, parameterization: str = "eps",
         variance: str = "small"):
  """Ancestral DDPM (Ho et al. 2020), x_s -> x_t ~ q(x_t | x_s, x0_hat).

  ``variance``: ``small`` is the posterior variance beta_tilde (sigma_{s|t}^2 sigma_t^2 /
  sigma_s^2), ``large`` is sigma_{s|t}^2 (beta in DDPM). No noise is added on a step to
  clean data.
  """
  if variance not in ("small", "large"):
    raise ValueError(f"Unknown DDPM variance {variance!r}; choose one of small, large.")
  denoise, logsnrs = param_lib.denoise(model_fn, parameterization), _check_grid(logsnrs)
  keys = _as_image_keys(key, x_T.shape[0], "ddpm")

  def step(x, inputs):
    i, logsnr_s, logsnr_t = inputs
    x0, _ = denoise(x, logsnr_s)
    (alpha_s, sigma_s), (alpha_t, sigma_t) = alpha_sigma(logsnr_s), alpha_sigma(logsnr_t)
    # q(x_s | x_t) has alpha_{s|t} = alpha_s / alpha_t and variance
    # sigma_{s|t}^2 = sigma_s^2 (1 - exp(logsnr_s - logsnr_t)).
    clean = ~jnp.isfinite(logsnr_t)
    var_st = sigma_s**2 * -jnp.expm1(logsnr_s - jnp.where(clean, 0.0, logsnr_t))
    var_st = jnp.where(clean, sigma_s**2, var_st)
    mean = ((alpha_s / alpha_t) * sigma_t**2 / sigma_s**2) * x + (
        alpha_t * var_st / sigma_s**2) * x0
    var = var_st * sigma_t**2 / sigma_s**2 if variance == "small" else var_st
    std = jnp.where(clean, 0.0, jnp.sqrt(var))
    return (mean + std * _step_noise(keys, i, x)).astype(x.dtype)

  return _scan_steps(step, x_T, logsnrs)


def dpmpp_2m(model_fn: ModelFn, x_T, logsnrs, key=None, *, parameterization: str = "eps"):
  """DPM-Solver++(2M) (Lu et al. 2022), multistep 2nd order in the data prediction.

  With lambda = logsnr / 2 and h = lambda_t - lambda_s:
  x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D, where D is x0_hat on the first
  step and on a step to clean data, else (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev with
  r = h_prev / h.
  """
  denoise, logsnrs = param_lib.denoise(model_fn, parameterization), _check_grid(logsnrs)

  def step(carry, inputs):
    x, x0_prev, h_prev = carry
    i, logsnr_s, logsnr_t = inputs
    x0, _ = denoise(x, logsnr_s)
    (_, sigma_s), (alpha_t, sigma_t) = alpha_sigma(logsnr_s), alpha_sigma(logsnr_t)
    clean = ~jnp.isfinite(logsnr_t)
    h = 0.5 * (jnp.where(clean, logsnr_s + 1.0, logsnr_t) - logsnr_s)
    second_order = (i > 0) & ~clean
    r = jnp.where(second_order, h_prev / h, 1.0)
    d = jnp.where(second_order, (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0)
    x_next = (sigma_t / sigma_s) * x - alpha_t * jnp.expm1(-h) * d
    x_next = jnp.where(clean, x0, x_next).astype(x.dtype)
    return x_next, x0, h

  init = (x_T, jnp.zeros_like(x_T), jnp.ones((), jnp.float32))
  return _scan_steps(step, init, logsnrs)[0]


def _phi_linear(h):
  """(h - 1 + e^-h) / h, the exact integral weight of a D linear in lambda; its series
  below h = 1e-2, where h + expm1(-h) would cancel in float32."""
  small = h < 1e-2
  safe = jnp.where(small, 1.0, h)
  return jnp.where(small, h / 2 - h**2 / 6 + h**3 / 24, (safe + jnp.expm1(-safe)) / safe)


def _edm_step(model_fn, x_T, logsnrs, key, parameterization, second_order, churn,
              churn_tmin, churn_tmax, noise_scale, variable="lambda"):
  """EDM's Algorithms 1/2 (Karras et al. 2022) on y = x / alpha against sigma_ve.

  dy/dsigma = (y - D(y)) / sigma = eps_hat, so one Euler step is
  y_t = y_s + (sigma_t - sigma_s) eps_hat (which is exactly DDIM with eta = 0).
  ``churn`` > 0 adds EDM's stochasticity: before a step whose sigma lies in
  [churn_tmin, churn_tmax], raise the noise to sigma_hat = sigma (1 + gamma),
  gamma = min(churn / N, sqrt(2) - 1), with fresh noise scaled by ``noise_scale``.

  Heun's corrector, ``variable``: ``sigma`` is EDM's trapezoid in sigma. Written with
  r = sigma_t / sigma_s it is y_t = r y_s + (1 - r) (D_s + (D_t - D_s) / (2 r)): the
  weight 1 / (2 r) on the change in the denoised estimate extrapolates past D_t as soon
  as a step more than halves sigma (143 times it for sigma 1808 -> 6.3, the first step of
  a 10-step uniform grid on a log-SNR range of [-15, 15]). ``lambda`` (default) integrates
  dy/dlambda exactly for D linear in lambda = -log sigma between D_s and D_t (an
  exponential integrator, as DPM-Solver, Lu et al. 2022): with h = log(sigma_s / sigma_t),
  y_t = r y_s + (1 - r) D_s + c(h) (D_t - D_s), c(h) = (h - 1 + e^-h) / h, so the
  weight c / (1 - r) on D_t stays in [1/2, 1] (1/2 on small steps: the trapezoid; 1 on
  huge ones, where the exact integrand e^lambda D concentrates at the step's end). Both
  are second order and share Euler's predictor.
  """
  if variable not in HEUN_VARIABLES:
    raise ValueError(f"Unknown Heun variable {variable!r}; choose one of "
                     f"{', '.join(HEUN_VARIABLES)}.")
  denoise, logsnrs = param_lib.denoise(model_fn, parameterization), _check_grid(logsnrs)
  num_steps = logsnrs.shape[0] - 1
  gamma_max = min(churn / num_steps, np.sqrt(2.0) - 1.0) if churn > 0 else 0.0
  keys = (_as_image_keys(key, x_T.shape[0], f"{'heun' if second_order else 'euler'} with "
                         f"churn={churn}") if gamma_max > 0 else None)

  def ve_sigma(logsnr):
    return jnp.exp(-0.5 * logsnr)

  def step(x, inputs):
    i, logsnr_s, logsnr_t = inputs
    alpha_s, _ = alpha_sigma(logsnr_s)
    y, sigma_s, sigma_t = x / alpha_s, ve_sigma(logsnr_s), ve_sigma(logsnr_t)
    if gamma_max > 0:
      in_range = (sigma_s >= churn_tmin) & (sigma_s <= churn_tmax)
      sigma_hat = sigma_s * (1.0 + jnp.where(in_range, gamma_max, 0.0))
      y = y + jnp.sqrt(sigma_hat**2 - sigma_s**2) * noise_scale * _step_noise(keys, i, x)
      sigma_s = sigma_hat
    logsnr_hat = -2.0 * jnp.log(sigma_s)
    x0, eps = denoise(y * alpha_sigma(logsnr_hat)[0], logsnr_hat)
    y_next = y + (sigma_t - sigma_s) * eps
    if second_order:
      def heun_correction(y_next):
        alpha_t, _ = alpha_sigma(logsnr_t)
        x0_t, eps_t = denoise(y_next * alpha_t, logsnr_t)
        if variable == "sigma":
          return y + (sigma_t - sigma_s) * 0.5 * (eps + eps_t)
        h = jnp.log(sigma_s) - jnp.log(sigma_t)
        return (sigma_t / sigma_s) * y - jnp.expm1(-h) * x0 + _phi_linear(h) * (x0_t - x0)

      # The last step to clean data stays Euler (no model call at sigma = 0).
      y_next = jax.lax.cond(jnp.isfinite(logsnr_t), heun_correction, lambda y: y, y_next)
    # A step to clean data lands on x0_hat exactly (y - sigma eps_hat in exact arithmetic),
    # so a thresholded x0 estimate stays inside its range despite rounding.
    x_next = jnp.where(jnp.isfinite(logsnr_t), alpha_sigma(logsnr_t)[0] * y_next, x0)
    return x_next.astype(x.dtype)

  return _scan_steps(step, x_T, logsnrs)


def euler(model_fn: ModelFn, x_T, logsnrs, key=None, *, parameterization: str = "eps",
          churn: float = 0.0, churn_tmin: float = 0.0, churn_tmax: float = float("inf"),
          noise_scale: float = 1.0):
  """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 2 with churn)."""
  return _edm_step(model_fn, x_T, logsnrs, key, parameterization, False, churn,
                   churn_tmin, churn_tmax, noise_scale)


def heun(model_fn: ModelFn, x_T, logsnrs, key=None, *, parameterization: str = "eps",
         churn: float = 0.0, churn_tmin: float = 0.0, churn_tmax: float = float("inf"),
         noise_scale: float = 1.0, variable: str = "lambda"):
  """Heun's 2nd-order method (Karras et al. 2022, Alg. 1/2); 2N - 1 model calls for a
  grid ending at clean data. ``variable``: ``lambda`` (default) takes the corrector as an
  exponential integrator, ``sigma`` is EDM's trapezoid, which extrapolates on steps that
  more than halve sigma (``_edm_step``)."""
  return _edm_step(model_fn, x_T, logsnrs, key, parameterization, True, churn,
                   churn_tmin, churn_tmax, noise_scale, variable)


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "euler": euler,
            "heun": heun}


def get(name: str):
  if name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
  return SAMPLERS[name]


def sample(name: str, model_fn: ModelFn, x_T, logsnrs, key=None, **opts):
  """Runs the sampler called ``name`` (for configs): ``sample("ddim", f, x, g, k, eta=0)``."""
  return get(name)(model_fn, x_T, logsnrs, key, **opts)
