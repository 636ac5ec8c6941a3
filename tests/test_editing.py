"""SDEdit, training-free inpainting (known-region wrapper and RePaint with jumps) and
InstructPix2Pix's dual guidance, on the closed-form Gaussian denoiser and toy networks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_data import MU, exact_x0, ode_solution, x0_model_fn

from diffusion_jax.diffusion import grids, guidance, samplers, schedules
from diffusion_jax.editing import dual_guidance, inpainting, sdedit

SHAPE = (3, 4, 4, 2)


def _grid(num_steps=20):
  return grids.uniform_time(schedules.get("cosine"), num_steps)


def _image(seed=1):
  return jax.random.uniform(jax.random.key(seed), SHAPE, minval=-1.0, maxval=1.0)


def test_truncate_keeps_the_last_rounded_steps():
  grid = _grid(10)
  np.testing.assert_array_equal(grids.truncate(grid, 1.0), grid)
  np.testing.assert_array_equal(grids.truncate(grid, 0.3), grid[7:])
  np.testing.assert_array_equal(grids.truncate(grid, 0.26), grid[7:])  # rounds 2.6 -> 3
  assert grids.truncate(grid, 0.04).tolist() == [np.inf]  # below half a step: no step
  for bad in (0.0, -0.1, 1.01, float("nan")):
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
      grids.truncate(grid, bad)


@pytest.mark.parametrize("sampler,opts", [("ddim", {}), ("ddpm", {}),
                                          ("dpmpp_2m", {}), ("heun", {"churn": 5.0})])
def test_sdedit_at_strength_one_is_plain_sampling(sampler, opts):
  grid, key, x0 = _grid(), jax.random.key(3), _image()
  plain = jax.jit(lambda k: samplers.sample(
      sampler, x0_model_fn, samplers.initial_noise(k, SHAPE), grid, k,
      parameterization="x0", **opts))(key)
  edited = jax.jit(lambda x, k: sdedit.sdedit(
      sampler, x0_model_fn, x, grid, 1.0, k, parameterization="x0", **opts))(x0, key)
  np.testing.assert_array_equal(edited, plain)


def test_sdedit_small_strength_returns_the_input_and_errors():
  x0 = _image()
  out = sdedit.sdedit("ddim", x0_model_fn, x0, _grid(10), 0.01, jax.random.key(0),
                      parameterization="x0")
  np.testing.assert_array_equal(out, x0)
  with pytest.raises(ValueError, match="strength"):
    sdedit.sdedit("ddim", x0_model_fn, x0, _grid(10), 0.0, jax.random.key(0),
                  parameterization="x0")


def test_sdedit_follows_the_probability_flow_ode_from_the_noised_input():
  # Gaussian data: from x_s = alpha_s x0 + sigma_s eps the exact ODE solution to clean
  # data is closed-form; DPM-Solver++(2M) with the exact denoiser converges to it
  # (measured 1.5e-3 away after 100 steps, 0.8e-3 after 200; first-order DDIM 5e-3 after 200).
  grid, key, x0 = _grid(200), jax.random.key(5), _image()
  x_start, truncated = sdedit.sdedit_start(x0, grid, 0.5, key)
  assert truncated.shape == (101,)
  noise = samplers.initial_noise(key, SHAPE)
  np.testing.assert_allclose(x_start, schedules.q_sample(x0, noise, truncated[0]),
                             rtol=1e-6)
  out = sdedit.sdedit("dpmpp_2m", x0_model_fn, x0, grid, 0.5, key, parameterization="x0")
  # (the grid's last step jumps to clean data: the sampler lands on E[x0 | x] there)
  last = jnp.full((SHAPE[0],), truncated[-2])
  expected = exact_x0(ode_solution(x_start, truncated[0], truncated[-2]), last)
  np.testing.assert_allclose(out, expected, atol=2.5e-3)
  # ... and lower strength stays closer to the input.
  dist = [float(jnp.abs(sdedit.sdedit("ddim", x0_model_fn, x0, _grid(50), s, key,
                                      parameterization="x0") - x0).mean())
          for s in (0.3, 0.9)]
  assert dist[0] < dist[1], dist


def _mask():
  known = np.zeros(SHAPE[1:3], bool)
  known[:, :2] = True  # left half known
  return jnp.asarray(known)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m", "euler", "heun"])
def test_known_region_wrapper_keeps_the_input_and_samples_the_rest(sampler):
  # (A Karras grid: on the cosine grid's first level, logsnr -19.8, Euler / Heun's
  # y = x / alpha is so ill-conditioned in float32 that jit and eager already differ by
  # 0.15 after one Heun step, without any wrapper.)
  grid, key, image, known = grids.karras(20), jax.random.key(2), _image(), _mask()
  model_fn = inpainting.known_region_model_fn(x0_model_fn, image, known, "x0")
  x_T = samplers.initial_noise(key, SHAPE)
  out = samplers.sample(sampler, model_fn, x_T, grid, key, parameterization="x0")
  np.testing.assert_array_equal(np.asarray(out)[:, :, :2], np.asarray(image)[:, :, :2])
  # The Gaussian denoiser is per pixel, so the unknown pixels are sampled as without a
  # mask.
  plain = samplers.sample(sampler, x0_model_fn, x_T, grid, key, parameterization="x0")
  np.testing.assert_allclose(np.asarray(out)[:, :, 2:], np.asarray(plain)[:, :, 2:],
                             atol=1e-5)


def test_repaint_schedule_jumps():
  assert inpainting.repaint_schedule(4, 2, 1).tolist() == [0, 1, 2, 3, 4]
  assert inpainting.repaint_schedule(6, 2, 2).tolist() == [
      0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
  with pytest.raises(ValueError, match="jump_n_sample"):
    inpainting.repaint_schedule(6, 2, 0)


@pytest.mark.parametrize("sampler,jumps", [("ddpm", 1), ("ddpm", 3), ("ddim", 2)])
def test_repaint_keeps_the_known_region_and_its_samples_have_the_data_law(sampler, jumps):
  # Per-pixel Gaussian data: the unknown pixels' conditional law is the marginal, whatever
  # the known ones, so they must have the law of plain samples on the same grid (20 steps
  # end with a jump to E[x0 | x_t], so a little below STD), and the jumps must not bias it.
  batch = 128
  image = jnp.full((batch, 4, 4, 1), -0.7)
  known = _mask()
  out = jax.jit(functools.partial(
      inpainting.repaint, x0_model_fn, parameterization="x0", sampler=sampler,
      jump_length=4, jump_n_sample=jumps))(image, known, _grid(20), jax.random.key(4))
  np.testing.assert_array_equal(np.asarray(out)[:, :, :2], np.asarray(image)[:, :, :2])
  generated = np.asarray(out)[:, :, 2:]
  plain = samplers.sample(sampler, x0_model_fn, samplers.initial_noise(
      jax.random.key(9), image.shape), _grid(20), jax.random.key(8), parameterization="x0")
  assert abs(generated.mean() - MU) < 0.02, generated.mean()
  assert abs(generated.std() - float(plain.std())) < 0.015, (generated.std(), plain.std())


def test_inpainting_rejects_a_mask_of_another_size():
  with pytest.raises(ValueError, match="does not fit the image"):
    inpainting.known_region_model_fn(x0_model_fn, _image(), jnp.ones((5, 4)), "x0")
  with pytest.raises(ValueError, match="does not fit the image"):
    inpainting.repaint(x0_model_fn, _image(), jnp.ones((3, 4, 4, 2)), _grid(),
                       jax.random.key(0), parameterization="x0")
  with pytest.raises(ValueError, match="clean data"):
    inpainting.repaint(x0_model_fn, _image(), _mask(), _grid()[:-1], jax.random.key(0),
                       parameterization="x0")


def _toy_image_text_net(calls):
  def net(x_t, logsnr, cond):
    calls.append(x_t.shape[0])
    return (x_t * cond["image"] + cond["text"][:, None, None, None] * logsnr[:, None, None,
                                                                            None] ** 2)
  return net


def test_dual_guidance_is_eq3_in_one_call_and_cfg_at_image_scale_one():
  calls = []
  x = _image()
  logsnr = jnp.array([-1.0, 0.5, 2.0])
  cond = {"image": _image(7), "text": jnp.array([1.0, 2.0, 3.0])}
  image_only = {"image": cond["image"], "text": jnp.zeros(())}
  null = {"image": jnp.zeros(()), "text": jnp.zeros(())}
  net = _toy_image_text_net([])
  e_it, e_i, e_0 = (net(x, logsnr, jax.tree.map(lambda c, n: jnp.broadcast_to(n, c.shape),
                                                cond, c)) for c in (cond, image_only, null))
  for s_t, s_i in ((7.5, 1.5), (1.0, 1.0), (0.0, 0.0), (3.0, 1.0)):
    got = dual_guidance.dual_classifier_free(_toy_image_text_net(calls), cond, image_only,
                                             null, s_t, s_i)(x, logsnr)
    np.testing.assert_allclose(got, e_0 + s_i * (e_i - e_0) + s_t * (e_it - e_i),
                               rtol=1e-5, atol=1e-6)
  assert calls == [9] * 4  # one network call on 3B rows each time
  cfg = guidance.classifier_free(net, cond, image_only, 4.0)(x, logsnr)
  dual = dual_guidance.dual_classifier_free(net, cond, image_only, null, 4.0, 1.0)(x, logsnr)
  np.testing.assert_allclose(dual, cfg, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a real (tiny) U-Net: ~45 s of compiles on a busy machine
def test_image_conditioned_unet_under_dual_guidance():
  import flax.linen as nn

  from diffusion_jax import cascade
  from diffusion_jax.models import unet as unet_lib

  config = unet_lib.UNetConfig(levels=(unet_lib.Level(1, 1), unet_lib.Level(2, 1)),
                               base_channels=8, num_heads=2, in_channels=6, out_channels=3,
                               resolution=8, text_width=8, text_length=4)
  model = unet_lib.UNet(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             **unet_lib.example_inputs(config, 1)))
  leaves, tree = jax.tree.flatten(nn.unbox(shapes["params"]))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves, strict=True)])
  net = dual_guidance.image_conditioned(cascade.stage_model_fn(model, params))
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  image = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3))
  text = {"text_emb": jax.random.normal(jax.random.key(4), (2, 4, 8)),
          "text_mask": jnp.ones((2, 4), bool)}
  cond = dict(text, input_image=image)
  image_only = {"input_image": image, "text_emb": jnp.zeros((4, 8)),
                "text_mask": jnp.zeros((4,), bool)}
  null = dict(image_only, input_image=jnp.zeros(()))
  logsnr = jnp.array([0.0, 1.0])
  guided = jax.jit(lambda x, lam: dual_guidance.dual_classifier_free(
      net, cond, image_only, null, 5.0, 1.5)(x, lam))(x, logsnr)
  direct = jax.jit(lambda x, lam, c: model.apply(
      {"params": params}, jnp.concatenate([x, c["input_image"]], -1), lam, c["text_emb"],
      c["text_mask"]))
  full, img, none = (direct(x, logsnr, jax.tree.map(
      lambda a, b: jnp.broadcast_to(b, a.shape), cond, c)) for c in (cond, image_only, null))
  np.testing.assert_allclose(guided, none + 1.5 * (img - none) + 5.0 * (full - img),
                             rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(img - none).max()) > 1e-3  # the input image matters
