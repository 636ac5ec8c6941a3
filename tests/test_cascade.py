"""The cascade with tiny random stages: shapes and ranges with every sampler, thresholding
of every stage's x0 estimate, reproducibility per image, export round trip."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import training_helpers as th

from diffusion_jax import cascade as cascade_lib
from diffusion_jax.diffusion import parameterization as P
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion.schedules import alpha_sigma
from diffusion_jax.training import loop as loop_lib

PROMPTS = ["a red circle", "a blue square", "two green stars"]


def _stage(super_resolution, resolution, **spec):
  model = th.tiny_unet(resolution, super_resolution)
  inputs = loop_lib.init_inputs(model.config, resolution,
                                resolution // 2 if super_resolution else None,
                                th.TEXT_LEN, th.TEXT_DIM)
  params = nn.unbox(model.init(jax.random.key(resolution), **inputs)["params"])
  # Random (not zero-initialised) output layers, so the networks' predictions are large
  # and thresholding has something to do.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: (jax.random.normal(jax.random.key(len(path)), p.shape) * 0.5
                       if "out" in jax.tree_util.keystr(path) else p), params)
  spec = cascade_lib.StageSpec(
      resolution=resolution, num_steps=4, guidance_scale=2.0,
      lowres_schedule="shifted_cosine" if super_resolution else None, aug_level=0.1, **spec)
  return cascade_lib.Stage(model, params, spec)


@pytest.fixture(scope="module")
def stages():
  return [_stage(False, 8), _stage(True, 16)]


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_two_stage_cascade_shapes_and_ranges(stages, sampler):
  stages = [cascade_lib.replace_spec(s, sampler=sampler) for s in stages]
  out = cascade_lib.Cascade(stages, th.HashText()).sample(PROMPTS, jax.random.key(0))
  assert [o.shape for o in out] == [(3, 8, 8, 3), (3, 16, 16, 3)]
  for o in out:
    assert np.all(np.isfinite(o)) and np.abs(o).max() <= 1.0 + 1e-5


def test_dynamic_thresholding_keeps_every_stage_x0_in_range(stages, monkeypatch):
  seen = []
  original = cascade_lib.stage_model_fn

  def recording_model_fn(model, params):
    fn = original(model, params)
    return lambda x_t, logsnr, cond: _record(fn(x_t, logsnr, cond), x_t, logsnr)

  def _record(prediction, x_t, logsnr):
    alpha, sigma = alpha_sigma(logsnr)
    jax.debug.callback(lambda p, x, a, s: seen.append((p, x, a, s)), prediction, x_t,
                       alpha, sigma)
    return prediction

  monkeypatch.setattr(cascade_lib, "stage_model_fn", recording_model_fn)
  cascade = cascade_lib.Cascade([cascade_lib.replace_spec(s, guidance_scale=1.0)
                                 for s in stages], th.HashText())
  cascade.sample(PROMPTS, jax.random.key(1))
  assert seen
  raw_outside = 0
  for prediction, x_t, alpha, sigma in seen:
    x0, _ = P.to_x0_eps(prediction, x_t, alpha, sigma, "v")
    raw_outside += int(np.abs(np.asarray(x0)).max() > 1)
    thresholded = cascade_lib.guidance.dynamic_threshold(jnp.asarray(x0))
    assert np.abs(np.asarray(thresholded)).max() <= 1 + 1e-5
  assert raw_outside > 0  # the random networks do predict x0 outside [-1, 1]


def test_same_seed_same_images_and_image_alone_equals_batch(stages):
  cascade = cascade_lib.Cascade(stages, th.HashText())
  a = cascade.sample(PROMPTS, jax.random.key(7))
  b = cascade.sample(PROMPTS, jax.random.key(7))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  alone = cascade.sample(PROMPTS[2:], jax.random.key(7), first_index=2)
  for x, y in zip(a, alone, strict=True):
    np.testing.assert_allclose(x[2], y[0], atol=1e-5)
  other = cascade.sample(PROMPTS, jax.random.key(8))
  assert not np.allclose(a[1], other[1])


def test_export_round_trip(stages, tmp_path):
  cascade_lib.export_stage(stages[1], tmp_path / "sr", {"encoder": "x", "max_length": 8,
                                                         "id": "x"})
  stage, meta = cascade_lib.load_exported_stage(tmp_path / "sr")
  assert meta["max_length"] == 8 and stage.spec == stages[1].spec
  assert stage.model.config == stages[1].model.config
  for a, b in zip(jax.tree.leaves(stage.params), jax.tree.leaves(stages[1].params),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_bad_cascades(stages):
  with pytest.raises(ValueError, match="first stage must be a base"):
    cascade_lib.Cascade([stages[1]], th.HashText())
  with pytest.raises(ValueError, match="after the first must be a super-resolution"):
    cascade_lib.Cascade([stages[0], stages[0]], th.HashText())
  wrong = dataclasses.replace(stages[1], spec=dataclasses.replace(stages[1].spec,
                                                                  resolution=32))
  with pytest.raises(ValueError, match="does not match"):
    cascade_lib.Cascade([stages[0], wrong], th.HashText())
  with pytest.raises(ValueError, match="aug_level"):
    cascade_lib.StageSpec(resolution=8, aug_level=2.0)
  with pytest.raises(FileNotFoundError, match="not an exported stage"):
    cascade_lib.load_exported_stage("/nonexistent")
