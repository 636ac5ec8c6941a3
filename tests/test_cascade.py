"""The cascade with tiny random stages: shapes and ranges with every sampler, thresholding
of every stage's x0 estimate, reproducibility per image, export round trip."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
import training_helpers as th

from diffusion_jax import cascade as cascade_lib
from diffusion_jax.diffusion import grids, guidance, samplers, schedules
from diffusion_jax.diffusion import parameterization as P
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
  """Observes the x0 estimate where the samplers take it (parameterization.denoise, which
  every sampler calls on the model_fn the cascade built), for networks that predict x0
  far outside [-1, 1]. Fails if the cascade stops thresholding any stage."""
  seen, raw = {}, {}
  original_denoise = P.denoise

  def observed_denoise(model_fn, parameterization):
    denoise = original_denoise(model_fn, parameterization)

    def recording(x_t, logsnr):
      x0, eps = denoise(x_t, logsnr)
      jax.debug.callback(lambda x: seen.setdefault(x.shape[1], []).append(np.asarray(x)), x0)
      return x0, eps
    return recording

  original_model_fn = cascade_lib.stage_model_fn

  def large_model_fn(model, params, preconditioning=None):
    # The network under guidance and thresholding, scaled to predict x0 of size ~10.
    fn = original_model_fn(model, params, preconditioning)

    def scaled(x_t, logsnr, cond):
      prediction = 20.0 * fn(x_t, logsnr, cond)
      alpha, sigma = alpha_sigma(logsnr)
      x0, _ = P.to_x0_eps(prediction, x_t, alpha, sigma, "v")
      jax.debug.callback(lambda x: raw.setdefault(x.shape[1], []).append(np.asarray(x)), x0)
      return prediction
    return scaled

  monkeypatch.setattr(samplers.param_lib, "denoise", observed_denoise)
  monkeypatch.setattr(cascade_lib, "stage_model_fn", large_model_fn)
  # heun: both network calls of a step (Euler and correction) go through the wrapper.
  cascade = cascade_lib.Cascade([cascade_lib.replace_spec(s, sampler="heun") for s in stages],
                                th.HashText())
  cascade.sample(PROMPTS, jax.random.key(1))
  assert sorted(seen) == [8, 16]  # both stages' samplers were observed
  for resolution, estimates in seen.items():
    assert len(estimates) >= 2 * stages[0].spec.num_steps - 1, resolution
    assert max(np.abs(x0).max() for x0 in estimates) <= 1 + 1e-4, resolution
    # ... while the network's own x0 estimates were far outside [-1, 1].
    assert max(np.abs(x0).max() for x0 in raw[resolution]) > 3, resolution


@pytest.mark.parametrize("sampler,options", [
    ("ddim", ()), ("ddpm", ()), ("euler", (("churn", 10.0),))])
def test_same_seed_same_images_and_image_alone_equals_batch(stages, sampler, options):
  # ddpm and euler with churn draw fresh noise every step: image i alone must draw the
  # same noise as image i of the batch, at every step of both stages.
  stages = [cascade_lib.replace_spec(s, sampler=sampler, sampler_options=options)
            for s in stages]
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
  with pytest.raises(ValueError, match="aug_level"):
    cascade_lib.StageSpec(resolution=8, aug_level=2.0)
  with pytest.raises(FileNotFoundError, match="not an exported stage"):
    cascade_lib.load_exported_stage("/nonexistent")


def _with_spec(stage, **changes):
  return dataclasses.replace(stage, spec=dataclasses.replace(stage.spec, **changes))


def test_stages_must_chain_at_the_trained_lowres_size(stages):
  base, sr = stages  # base samples 8 px; sr was trained to upsample 8 -> 16 px
  cascade_lib.Cascade([base, sr], th.HashText())
  # A 16 px base before it: the U-Net would resize the 16 px image down to its 8 px input
  # and silently sample an upsampling it never learnt.
  with pytest.raises(ValueError, match=r"Stage 2 does not chain: it was trained to upsample "
                                       r"8 -> 16 px, but the stage before it samples at 16 px"):
    cascade_lib.Cascade([_with_spec(base, resolution=16), sr], th.HashText())
  with pytest.raises(ValueError, match="must sample at 16 px, not 32 px"):
    cascade_lib.Cascade([base, _with_spec(sr, resolution=32)], th.HashText())
  with pytest.raises(ValueError, match="Stage 3 does not chain"):
    cascade_lib.Cascade([base, sr, sr], th.HashText())
  # Trained on random crops: fully convolutional, only the x2 scale must chain.
  crops = _with_spec(sr, trained_on_crops=True, resolution=32)
  cascade_lib.Cascade([_with_spec(base, resolution=16), crops], th.HashText())
  with pytest.raises(ValueError, match=r"trained on 8 -> 16 px crops \(x2\), so after a 16 "
                                       r"px stage it must sample at 32 px, not 24 px"):
    cascade_lib.Cascade([_with_spec(base, resolution=16), _with_spec(crops, resolution=24)],
                        th.HashText())
  assert "no lowres_resolution" in cascade_lib.chain_error(8, 16, None, 16, False)


def test_stage_trained_on_crops_samples_at_its_scale_factor(stages):
  base = _with_spec(stages[0], resolution=16, num_steps=2, guidance_scale=1.0)
  crops = _with_spec(stages[1], resolution=32, num_steps=2, guidance_scale=1.0,
                     trained_on_crops=True)
  out = cascade_lib.Cascade([base, crops], th.HashText()).sample(PROMPTS[:1],
                                                                 jax.random.key(0))
  assert [o.shape for o in out] == [(1, 16, 16, 3), (1, 32, 32, 3)]
  assert all(np.all(np.isfinite(o)) for o in out)


@pytest.mark.parametrize("changes,message", [
    (dict(sampler_options=(("eta", -0.1),)), "eta must be >= 0, got -0.1"),
    (dict(sampler="heun", sampler_options=(("eta", 0.5),)),
     "sampler 'heun' has no option 'eta' (it takes churn, churn_tmin, churn_tmax, "
     "noise_scale, variable)"),
    (dict(sampler="dpmpp_2m", sampler_options=(("eta", 0.5),)), "it takes no options"),
    (dict(sampler="ddpm", sampler_options=(("variance", "huge"),)),
     "Unknown DDPM variance 'huge'"),
    (dict(sampler="euler", sampler_options=(("churn_tmin", 2.0), ("churn_tmax", 1.0))),
     "churn_tmax (1.0) must be >= churn_tmin (2.0)"),
    (dict(grid_kind="fast"), "Unknown grid 'fast'"),
    (dict(grid_kind="leading"), "grid 'leading' is a spacing of a discrete schedule's"),
    (dict(grid_kind="karras", rho=0.0), "rho must be positive, got 0.0"),
    (dict(schedule="linear", schedule_kwargs=(("num_timesteps", 10),), grid_kind="trailing",
          num_steps=20), "cannot exceed the schedule's 10 steps"),
    (dict(guidance_schedule="step"), "Unknown guidance schedule 'step'"),
    (dict(refine_strength=0.0), "refine_strength must lie in (0, 1], got 0.0"),
    (dict(lowres_schedule="sigmoid", lowres_schedule_kwargs=(("tau", -1.0),)), "tau > 0"),
])
def test_bad_stage_specs(changes, message):
  with pytest.raises(ValueError) as e:
    cascade_lib.StageSpec(resolution=8, **changes)
  assert message in str(e.value), e.value


def test_grid_sampler_options_and_guidance_schedule_reach_the_sampler(stages, monkeypatch):
  """What the cascade hands the sampler and the guidance wrapper, per stage (the sampler
  is replaced by one returning x_T, so no network runs)."""
  calls, weights = [], []

  def fake_sample(name, model_fn, x_T, grid, key, **options):
    calls.append((name, np.asarray(grid), options))
    return x_T

  original_guidance = guidance.classifier_free

  def recording_guidance(cond_model_fn, cond, null_cond, scale):
    weights.append(scale)
    return original_guidance(cond_model_fn, cond, null_cond, scale)

  monkeypatch.setattr(cascade_lib.samplers, "sample", fake_sample)
  monkeypatch.setattr(cascade_lib.guidance, "classifier_free", recording_guidance)
  base = _with_spec(stages[0], schedule="linear", schedule_kwargs=(("num_timesteps", 100),),
                    grid_kind="trailing", sampler="ddim", sampler_options=(("eta", 0.5),),
                    guidance_scale=4.0, guidance_schedule="linear", guidance_min=0.5)
  sr = _with_spec(stages[1], grid_kind="karras", rho=3.0, sampler="heun",
                  sampler_options=(("churn", 2.0),), guidance_scale=2.0)
  cascade_lib.Cascade([base, sr], th.HashText()).sample(PROMPTS[:1], jax.random.key(0))
  (base_name, base_grid, base_opts), (sr_name, sr_grid, sr_opts) = calls
  assert (base_name, base_opts) == ("ddim", {"parameterization": "v", "eta": 0.5})
  assert (sr_name, sr_opts) == ("heun", {"parameterization": "v", "churn": 2.0})
  np.testing.assert_array_equal(base_grid, grids.discrete(schedules.linear(100), 4, "trailing"))
  np.testing.assert_array_equal(sr_grid, grids.karras_for_schedule(
      schedules.ShiftedCosineSchedule(), 4, rho=3.0))
  # Linear in t from 0.5 at pure noise to 4 at clean data; the SR stage's constant 2.
  linear_schedule = schedules.linear(100)
  w = weights[0](linear_schedule.logsnr(np.array([1.0, 0.5, 0.0], np.float32)))
  np.testing.assert_allclose(np.asarray(w), [0.5, 2.25, 4.0], atol=1e-3)
  assert weights[1] == 2.0


def test_a_refiner_is_sdedit_of_the_stage_before(stages):
  """A text-to-image stage with a refine_strength after a stage of its resolution: at
  strength 1 it samples from its own noise (SDEdit at 1 is plain sampling), so its output
  is the stage's plain sample with the refiner's keys; below one step it returns its input."""
  base = _with_spec(stages[0], guidance_scale=2.0)
  key = jax.random.key(3)
  full = cascade_lib.Cascade([base, _with_spec(base, refine_strength=1.0)], th.HashText())
  out = full.sample(PROMPTS, key)
  assert [o.shape for o in out] == [(3, 8, 8, 3), (3, 8, 8, 3)]
  emb, mask = th.HashText().encode(PROMPTS)
  null_emb, null_mask = th.HashText().encode([""])
  spec = base.spec
  plain = cascade_lib.sample_stage(
      base.model, base.params, jax.numpy.asarray(emb), jax.numpy.asarray(mask),
      {"text_emb": null_emb[0], "text_mask": null_mask[0]},
      samplers.image_keys(jax.random.fold_in(key, 1), 3, 0), spec.grid(),
      image_shape=(8, 8, 3), parameterization=spec.parameterization, sampler=spec.sampler,
      guidance_scale=spec.guidance_scale, threshold=spec.threshold,
      percentile=spec.percentile)
  np.testing.assert_allclose(out[1], plain, atol=1e-5)
  assert np.abs(out[1] - out[0]).max() > 0.1  # (not the input passed through)
  # 0.1 of a 4-step grid keeps no step: the input comes back unchanged.
  kept = cascade_lib.Cascade([base, _with_spec(base, refine_strength=0.1)],
                             th.HashText()).sample(PROMPTS, key)
  np.testing.assert_array_equal(kept[1], kept[0])
  # At 0.5 it starts from the base output noised to the grid's midpoint: a different image.
  half = cascade_lib.Cascade([base, _with_spec(base, refine_strength=0.5)],
                             th.HashText()).sample(PROMPTS, key)
  assert 0 < np.abs(half[1] - half[0]).max() and not np.allclose(half[1], out[1])


def test_a_micro_conditioned_refiner_gets_the_uncropped_condition():
  """A refiner trained with SDXL micro-conditioning samples with (R, R, 0, 0) as a base
  stage does (it once ran without it and failed inside jit)."""
  from diffusion_jax import conditioning

  plain_model = th.tiny_unet(8)
  model = type(plain_model)(dataclasses.replace(plain_model.config, micro_cond_dim=4))
  inputs = loop_lib.init_inputs(model.config, 8, None, th.TEXT_LEN, th.TEXT_DIM)
  params = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
  params = jax.tree.map(lambda p: 0.3 * jax.random.normal(jax.random.key(p.size), p.shape),
                        params)
  spec = cascade_lib.StageSpec(resolution=8, num_steps=4, guidance_scale=2.0)
  stage = cascade_lib.Stage(model, params, spec, conditioning=({"kind": "micro",
                                                               "drop_prob": 0.0},))
  key = jax.random.key(3)
  out = cascade_lib.Cascade([stage, _with_spec(stage, refine_strength=1.0)],
                            th.HashText()).sample(PROMPTS, key)
  emb, mask = th.HashText().encode(PROMPTS)
  null_emb, null_mask = th.HashText().encode([""])
  plain = cascade_lib.sample_stage(
      model, params, jax.numpy.asarray(emb), jax.numpy.asarray(mask),
      {"text_emb": null_emb[0], "text_mask": null_mask[0]},
      samplers.image_keys(jax.random.fold_in(key, 1), 3, 0), spec.grid(),
      image_shape=(8, 8, 3), parameterization=spec.parameterization, sampler=spec.sampler,
      guidance_scale=spec.guidance_scale, threshold=spec.threshold,
      percentile=spec.percentile, extra_cond={"micro_cond": conditioning.uncropped(3, 8)})
  np.testing.assert_allclose(out[1], plain, atol=1e-5)


def test_bad_refiners(stages):
  base, sr = stages
  refiner = _with_spec(base, refine_strength=0.3)
  with pytest.raises(ValueError, match="first stage cannot be a refiner"):
    cascade_lib.Cascade([refiner], th.HashText())
  with pytest.raises(ValueError, match="Stage 3 cannot refine: it samples at 8 px and the "
                                       "stage before it at 16 px"):
    cascade_lib.Cascade([base, sr, refiner], th.HashText())
  with pytest.raises(ValueError, match="Stage 2 cannot refine: it is a super-resolution"):
    cascade_lib.Cascade([base, _with_spec(sr, refine_strength=0.3)], th.HashText())
