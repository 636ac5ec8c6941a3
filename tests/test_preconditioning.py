"""EDM training (Karras et al. 2022, table 1): preconditioning, log-normal noise levels,
their config translation, a 2-step train and sampling with the same wrapper."""

import math
import pathlib
import sys

import flax.linen as nn
import gaussian_data
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import training_helpers as th

from diffusion_jax import cascade
from diffusion_jax.diffusion import grids, losses, noise_levels, parameterization, schedules
from diffusion_jax.diffusion import preconditioning as pre
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import builders  # noqa: E402
import sampling  # noqa: E402

SD = 0.5


def _logsnr_of_sigma(sigma):
  return -2.0 * np.log(sigma)


def test_coefficients_at_known_sigmas():
  # sigma = sigma_data: c_skip = 1/2, c_out = sd / sqrt(2), c_in = 1 / (sd sqrt(2)).
  c = [float(v) for v in pre.edm_coefficients(jnp.float32(SD), SD)]
  np.testing.assert_allclose(c, [0.5, SD / math.sqrt(2), 1 / (SD * math.sqrt(2)),
                                 math.log(SD) / 4], rtol=1e-6)
  # sigma = 1.5: sigma^2 + sd^2 = 2.5.
  c = [float(v) for v in pre.edm_coefficients(jnp.float32(1.5), SD)]
  np.testing.assert_allclose(c, [0.25 / 2.5, 0.75 / math.sqrt(2.5), 1 / math.sqrt(2.5),
                                 math.log(1.5) / 4], rtol=1e-6)
  # sigma -> 0: the identity (c_skip = 1, c_out = 0, c_in = 1/sd).
  c_skip, c_out, c_in, _ = pre.edm_coefficients(jnp.float32(0.0), SD)
  assert (float(c_skip), float(c_out), float(c_in)) == (1.0, 0.0, 2.0)
  # The loss weight lambda = (s^2 + sd^2) / (s sd)^2 is 1 / c_out^2, and the "edm"
  # weighting on the x0 error is that lambda with s = exp(-logsnr / 2).
  sigma = np.array([0.02, 0.3, 1.0, 7.0, 80.0], np.float32)
  lam = (sigma**2 + SD**2) / (sigma * SD) ** 2
  _, c_out, _, _ = pre.edm_coefficients(sigma, SD)
  np.testing.assert_allclose(1.0 / np.asarray(c_out) ** 2, lam, rtol=1e-5)
  np.testing.assert_allclose(losses.loss_weight(_logsnr_of_sigma(sigma), "x0", "edm",
                                                sigma_data=SD), lam, rtol=1e-5)
  np.testing.assert_allclose(pre.edm_sigma(_logsnr_of_sigma(sigma)), sigma, rtol=1e-5)


def test_vp_coefficients_are_the_paper_ones_on_x_t_and_finite_everywhere():
  logsnr = np.array([-12.0, -3.0, 0.0, 2.4, 9.0], np.float32)
  sigma = np.exp(-logsnr / 2)
  alpha = np.sqrt(1 / (1 + np.exp(-logsnr)))  # x = x_t / alpha
  c_skip, c_out, c_in, _ = (np.asarray(c) for c in pre.edm_coefficients(sigma, SD))
  skip, out, scale_in = (np.asarray(c) for c in pre.vp_coefficients(logsnr, SD))
  np.testing.assert_allclose(skip, c_skip / alpha, rtol=1e-5)
  np.testing.assert_allclose(out, c_out, rtol=1e-5)
  np.testing.assert_allclose(scale_in, c_in / alpha, rtol=1e-5)
  ends = pre.vp_coefficients(jnp.array([-jnp.inf, -40.0, 40.0, jnp.inf]), SD)
  assert all(np.isfinite(np.asarray(c)).all() for c in ends)
  # Clean end: D = x_t. Pure noise: D = 0 (the data mean), F scaled by sigma_data.
  np.testing.assert_allclose([float(c[3]) for c in ends], [1.0, 0.0, 1 / SD], atol=1e-6)
  np.testing.assert_allclose([float(c[0]) for c in ends], [0.0, SD, 1.0], atol=1e-6)


def test_effective_training_target_has_unit_variance():
  """x0 ~ N(0, sd^2): the target of F, (x0 - c_skip x) / c_out, has variance 1 at every
  noise level (Karras et al. appendix B.6)."""
  key_x, key_n = jax.random.split(jax.random.key(0))
  n = 200_000
  x0 = SD * jax.random.normal(key_x, (n, 1))
  eps = jax.random.normal(key_n, (n, 1))
  edm = pre.EDMPreconditioning(SD)
  for sigma in (0.01, 0.2, 1.0, 5.0, 80.0):
    logsnr = jnp.full((n,), _logsnr_of_sigma(sigma), jnp.float32)
    target = edm.network_target(x0, schedules.q_sample(x0, eps, logsnr), logsnr)
    assert float(jnp.var(target)) == pytest.approx(1.0, abs=0.01), sigma
    assert abs(float(jnp.mean(target))) < 0.01


def test_weighted_x0_loss_is_the_unit_weight_loss_on_f():
  edm = pre.EDMPreconditioning(SD)
  keys = jax.random.split(jax.random.key(1), 3)
  x0 = jax.random.uniform(keys[0], (5, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(keys[1], x0.shape)
  f = jax.random.normal(keys[2], x0.shape)
  logsnr = jnp.array([-8.0, -2.0, 0.5, 3.0, 10.0])
  x_t = schedules.q_sample(x0, eps, logsnr)
  denoised = edm.wrap(lambda x_in, ls: f)(x_t, logsnr)
  per_example, _ = losses.diffusion_loss(denoised, x0, eps, logsnr, "x0", "edm",
                                         sigma_data=SD)
  expected = jnp.mean((f - edm.network_target(x0, x_t, logsnr)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(per_example, expected, rtol=1e-4)


def test_wrapper_feeds_c_in_x_and_reproduces_the_exact_gaussian_denoiser():
  logsnr = jnp.array([-6.0, -1.0, 0.0, 2.0, 7.0])
  x_t = jax.random.normal(jax.random.key(2), (5, 3, 3, 2))
  # Data N(0, sd^2): the posterior mean is c_skip x, so the ideal F is exactly 0.
  got = pre.EDMPreconditioning(SD).wrap(lambda x_in, ls: jnp.zeros_like(x_in))(x_t, logsnr)
  np.testing.assert_allclose(got, gaussian_data.exact_x0(x_t, logsnr, mu=0.0, std=SD),
                             rtol=1e-5, atol=1e-6)

  # Data N(0.5, 0.2^2): F built from the paper's coefficients in EDM coordinates
  # (x = x_t / alpha) out of the exact denoiser; the wrapper must hand the network
  # c_in x and combine c_skip x + c_out F.
  def ideal_f(x_in, ls):
    sigma = pre.edm_sigma(ls)
    c_skip, c_out, c_in, _ = (c[:, None, None, None] for c in pre.edm_coefficients(sigma, SD))
    x = x_in / c_in
    alpha = schedules.alpha_sigma(ls)[0][:, None, None, None]
    return (gaussian_data.exact_x0(alpha * x, ls) - c_skip * x) / c_out

  got = pre.EDMPreconditioning(SD).wrap(ideal_f)(x_t, logsnr)
  np.testing.assert_allclose(got, gaussian_data.exact_x0(x_t, logsnr), rtol=1e-4, atol=1e-5)


def test_with_unit_sigma_data_it_is_v_prediction():
  logsnr = jnp.array([-3.0, 0.0, 4.0])
  x_t = jax.random.normal(jax.random.key(3), (3, 2, 2, 1))
  v = jax.random.normal(jax.random.key(4), x_t.shape)
  got = pre.EDMPreconditioning(1.0).wrap(lambda x_in, ls: -v)(x_t, logsnr)
  alpha, sigma = schedules.alpha_sigma(logsnr)
  want, _ = parameterization.to_x0_eps(v, x_t, alpha, sigma, "v")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lognormal_noise_levels_have_the_papers_moments():
  logsnr, u = noise_levels.EDMLogNormal().sample(jax.random.key(5), 100_000)
  log_sigma = np.asarray(-logsnr / 2)
  assert log_sigma.mean() == pytest.approx(-1.2, abs=0.02)
  assert log_sigma.std() == pytest.approx(1.2, abs=0.02)
  # u is the draw's quantile: uniform on [0, 1], increasing with sigma.
  u = np.asarray(u)
  assert u.mean() == pytest.approx(0.5, abs=0.005)
  assert u.var() == pytest.approx(1 / 12, abs=0.002)
  order = np.argsort(log_sigma)
  assert np.all(np.diff(u[order]) >= 0)
  # The schedule sampler is the old draw: t ~ U[0, 1] through the schedule.
  schedule = schedules.get("cosine")
  key = jax.random.key(6)
  logsnr, t = noise_levels.get("schedule", schedule).sample(key, 7)
  np.testing.assert_array_equal(t, jax.random.uniform(key, (7,)))
  np.testing.assert_array_equal(logsnr, schedule.logsnr(t))


def _config(**diffusion):
  from configs import common
  config = common.get_config()
  config.diffusion.schedule_kwargs = ml_collections.ConfigDict({})
  config.diffusion.schedule = "cosine"
  for k, v in diffusion.items():
    setattr(config.diffusion, k, v)
  return config


def test_config_translation_and_one_clear_error_per_bad_combination():
  settings = builders.diffusion_settings(_config(
      preconditioning="edm", parameterization="x0", weighting="edm",
      noise_sampling="edm_lognormal", p_mean=-1.0, p_std=1.5, sigma_data=0.4))
  assert settings.preconditioning == pre.EDMPreconditioning(0.4)
  assert settings.noise_sampler == noise_levels.EDMLogNormal(-1.0, 1.5)
  default = builders.diffusion_settings(_config())
  assert default.preconditioning is None
  assert isinstance(default.noise_level_sampler, noise_levels.UniformTime)
  bad = [(dict(preconditioning="edm"), "needs config.diffusion.parameterization='x0'"),
         (dict(preconditioning="karras"), "Unknown preconditioning 'karras'"),
         (dict(noise_sampling="lognormal"), "Unknown noise sampling 'lognormal'"),
         (dict(noise_sampling="edm_lognormal", p_std=0.0), "p_std must be positive"),
         (dict(preconditioning="edm", parameterization="x0", sigma_data=-1.0),
          "sigma_data must be positive")]
  for fields, message in bad:
    with pytest.raises(builders.ConfigError, match=message) as info:
      builders.diffusion_settings(_config(**fields))
    assert "\n" not in str(info.value)
  with pytest.raises(ValueError, match="parameterization must be 'x0'"):
    cascade.StageSpec(resolution=16, preconditioning="edm", parameterization="v")


def test_a_stage_sampled_from_its_workdir_config_gets_the_wrapper():
  config = _config(preconditioning="edm", parameterization="x0", weighting="edm",
                   sigma_data=0.4)
  _, spec = sampling.workdir_stage_spec("w", config, None)
  assert spec.preconditioner() == pre.EDMPreconditioning(0.4)
  assert spec.parameterization == "x0"
  _, spec = sampling.workdir_stage_spec("w", _config(), None)
  assert spec.preconditioner() is None
  round_trip = cascade.StageSpec.from_json(
      cascade.StageSpec(resolution=16, preconditioning="edm", parameterization="x0",
                        sigma_data=0.4).to_json())
  assert round_trip.preconditioner() == pre.EDMPreconditioning(0.4)


@pytest.fixture(scope="module")
def edm_trained():
  """A tiny U-Net trained 2 steps the EDM way, and the pieces it was trained with."""
  model = th.tiny_unet()
  diffusion = step_lib.DiffusionSettings(
      parameterization="x0", weighting="edm", sigma_data=SD,
      noise_sampler=noise_levels.EDMLogNormal(), preconditioning=pre.EDMPreconditioning(SD))
  settings = step_lib.StepSettings(diffusion, ema_decay=0.5)
  tx = state_lib.make_optimizer(state_lib.OptimizerSettings(learning_rate=1e-3,
                                                            warmup_steps=1))
  inputs = loop_lib.init_inputs(model.config, 16, None, th.TEXT_LEN, th.TEXT_DIM)
  params = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
  state = state_lib.create_train_state(params, tx, jax.random.key(1))
  null = loop_lib.encode_null(th.HashText())
  data = th.ShapesIterator(4)
  batches = [loop_lib._model_batch(next(data), th.HashText()) for _ in range(2)]
  step = jax.jit(lambda s, b: step_lib.train_step(s, b, null, model=model, tx=tx,
                                                  settings=settings))
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append(m)
  return model, params, diffusion, null, batches[0], state, metrics


def test_the_train_step_uses_the_lognormal_levels_and_the_wrapper(edm_trained):
  model, params, diffusion, null, batch, _, _ = edm_trained
  # At init the U-Net's output layer is zero, so F = 0 and D = c_skip x: the loss is the
  # mean square of the EDM target at the log-normal levels the step drew.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), 0), 0)
  loss, _ = jax.jit(lambda p, b, k: step_lib._loss_fn(p, model, b, null, k, diffusion))(
      params, batch, key)
  k_t, k_eps = jax.random.split(key, 6)[:2]
  logsnr, _ = noise_levels.EDMLogNormal().sample(k_t, 4)
  x0 = batch["image"]
  eps = jax.random.normal(k_eps, x0.shape)
  target = pre.EDMPreconditioning(SD).network_target(x0, schedules.q_sample(x0, eps, logsnr),
                                                     logsnr)
  assert float(loss) == pytest.approx(float(jnp.mean(target**2)), rel=1e-5)


def test_two_edm_steps_are_finite_and_the_stage_samples_with_the_wrapper(edm_trained):
  model, params, _, null, batch, state, metrics = edm_trained
  assert int(state.step) == 2 and int(state.nonfinite_total) == 0
  assert all(np.isfinite(float(m["loss"])) and float(m["loss"]) > 0 for m in metrics)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, state.params)
  assert any(jax.tree.leaves(changed))
  # The sampling model function is the preconditioned U-Net.
  edm = pre.EDMPreconditioning(SD)
  cond = {"text_emb": batch["text_emb"], "text_mask": batch["text_mask"]}
  x_t = jax.random.normal(jax.random.key(7), batch["image"].shape)
  logsnr = jnp.array([-5.0, -1.0, 1.0, 5.0])
  skip, out, scale_in = (c[:, None, None, None] for c in pre.vp_coefficients(logsnr, SD))
  raw = model.apply({"params": state.ema_params}, scale_in * x_t, logsnr, cond["text_emb"],
                    cond["text_mask"])
  got = cascade.stage_model_fn(model, state.ema_params, edm)(x_t, logsnr, cond)
  np.testing.assert_allclose(got, skip * x_t + out * raw, rtol=1e-5, atol=1e-5)
  schedule = schedules.get("cosine")
  images = cascade.sample_stage(
      model, state.ema_params, cond["text_emb"], cond["text_mask"], null,
      jax.random.key(8), grids.uniform_time(schedule, 3), image_shape=(16, 16, 3),
      parameterization="x0", guidance_scale=1.0, preconditioning=edm)
  assert images.shape == (4, 16, 16, 3) and bool(jnp.all(jnp.isfinite(images)))
