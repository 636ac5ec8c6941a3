"""Conditions beyond the text: the U-Net's cond_image / image_embed inputs, the masks and
dropout of diffusion_jax.conditioning, and a conditioned stage through the training loop."""

import dataclasses
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import training_helpers as th

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))

from diffusion_jax import cascade, conditioning  # noqa: E402
from diffusion_jax.models import unet as unet_lib  # noqa: E402
from diffusion_jax.training import loop as loop_lib  # noqa: E402
from diffusion_jax.training import state as state_lib  # noqa: E402
from diffusion_jax.training import step as step_lib  # noqa: E402


def _config(**fields):
  return dataclasses.replace(th.tiny_unet().config, **fields)


def _init(cfg, key=0):
  model = unet_lib.UNet(cfg)
  params = nn.unbox(model.init(jax.random.key(key), **unet_lib.example_inputs(cfg, 2)))
  # Zero-initialised layers (the output conv, FiLM, attention outputs: a new block is the
  # identity) hide the conditioning at init: give every parameter random values.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
  return model, jax.tree.unflatten(tree, leaves)


def test_unet_conditions_reach_the_output_and_bad_inputs_are_refused():
  cfg = _config(cond_image_channels=4, image_embed_dim=5, image_embed_tokens=2,
                micro_cond_dim=4)
  model, params = _init(cfg)
  inputs = unet_lib.example_inputs(cfg, 2)
  assert inputs["cond_image"].shape == (2, 16, 16, 4) and inputs["image_embed"].shape == (2, 5)
  apply = jax.jit(model.apply)
  out = apply(params, **inputs)
  assert out.shape == (2, 16, 16, 3)
  key = jax.random.key(3)
  other_image = dict(inputs, cond_image=jax.random.normal(key, inputs["cond_image"].shape))
  other_embed = dict(inputs, image_embed=jax.random.normal(key, inputs["image_embed"].shape))
  assert float(jnp.abs(apply(params, **other_image) - out).max()) > 1e-3
  assert float(jnp.abs(apply(params, **other_embed) - out).max()) > 1e-3
  cropped = dict(inputs, micro_cond=jnp.asarray([[24.0, 24.0, 8.0, 0.0]] * 2))
  assert float(jnp.abs(apply(params, **cropped) - out).max()) > 1e-3
  with pytest.raises(ValueError, match="cond_image of shape"):
    model.apply(params, **dict(inputs, cond_image=None))
  with pytest.raises(ValueError, match="image_embed of shape"):
    model.apply(params, **dict(inputs, image_embed=jnp.zeros((2, 4))))
  plain_cfg = _config()
  plain, plain_params = _init(plain_cfg)
  with pytest.raises(ValueError, match="cond_image_channels=0"):
    plain.apply(plain_params, **unet_lib.example_inputs(plain_cfg, 2),
                cond_image=inputs["cond_image"])
  # Without the new fields the parameter tree is the one checkpoints already hold.
  assert "image_embed_proj" not in plain_params["params"]
  assert "micro_cond_in" not in plain_params["params"]
  assert plain_params["params"]["stem"]["kernel"].shape[2] == 3


def test_random_masks_are_rectangles_of_the_asked_size_and_full_with_full_prob():
  masks = np.asarray(conditioning.random_masks(jax.random.key(0), 256, 32, 32,
                                               min_fraction=0.25, max_fraction=0.5,
                                               full_prob=0.0))
  assert masks.shape == (256, 32, 32, 1) and set(np.unique(masks)) <= {0.0, 1.0}
  rows, cols = masks[..., 0].any(2).sum(1), masks[..., 0].any(1).sum(1)
  # A rectangle: its area is the product of its row and column extents.
  np.testing.assert_array_equal(masks[..., 0].sum((1, 2)), rows * cols)
  assert rows.min() >= 7 and rows.max() <= 17 and cols.min() >= 7 and cols.max() <= 17
  full = conditioning.random_masks(jax.random.key(1), 400, 8, 8, full_prob=0.25)
  frac_full = float(jnp.mean(jnp.all(full == 1, axis=(1, 2, 3))))
  assert 0.18 < frac_full < 0.32  # 0.25 +- 3.5 sigma (plus rare full rectangles: none at 0.8)


def test_masked_input_and_dropout_closed_forms():
  image = jax.random.uniform(jax.random.key(0), (3, 4, 4, 3), minval=-1, maxval=1)
  mask = jnp.zeros((3, 4, 4, 1)).at[:, :2].set(1.0)
  value = conditioning.masked_input(image, mask)
  np.testing.assert_array_equal(value[:, :2, :, :3], 0.0)
  np.testing.assert_array_equal(value[:, 2:, :, :3], image[:, 2:])
  np.testing.assert_array_equal(value[..., 3:], mask)
  null = conditioning.MaskedImage().null(value)
  np.testing.assert_array_equal(null, conditioning.masked_input(0 * image, 1 + 0 * mask))
  key = jax.random.key(5)
  np.testing.assert_array_equal(conditioning.drop(key, value, null, 0.0), value)
  np.testing.assert_array_equal(conditioning.drop(key, value, null, 1.0), null)
  many = jnp.ones((2000, 2))
  kept = conditioning.drop(key, many, jnp.zeros_like(many), 0.3)[:, 0]
  assert abs(float(kept.mean()) - 0.7) < 0.035  # 3.4 sigma
  with pytest.raises(ValueError, match="drop_prob"):
    conditioning.InputImage(drop_prob=1.5)
  cond = (conditioning.InputImage(), conditioning.MaskedImage(),
          conditioning.MicroConditioning())
  assert conditioning.unet_requirements(cond) == {"cond_image_channels": 7,
                                                  "image_embed_dim": None, "micro_cond_dim": 4}
  for c in (*cond, conditioning.ImageEmbedding(dim=8, source="clip")):
    assert conditioning.from_json(c.to_json()).to_json() == c.to_json()


def test_guided_model_fn_conditions_both_halves_unless_given_a_null():
  cfg = _config(cond_image_channels=3)
  model, params = _init(cfg)
  inputs = unet_lib.example_inputs(cfg, 2)
  image = jax.random.normal(jax.random.key(1), inputs["cond_image"].shape)
  null = {"text_emb": jnp.zeros(inputs["text_emb"].shape[1:]),
          "text_mask": jnp.ones(inputs["text_mask"].shape[1:], bool)}
  x = jax.random.normal(jax.random.key(2), inputs["x_t"].shape)
  logsnr = jnp.full((2,), 1.0)
  net = cascade.stage_model_fn(model, params["params"])
  text = {"text_emb": jax.random.normal(jax.random.key(3), inputs["text_emb"].shape),
          "text_mask": inputs["text_mask"]}
  cond = net(x, logsnr, dict(text, cond_image=image))
  w = 3.0
  for null_extra, uncond_image in ((None, image), ({"cond_image": 0.0}, 0 * image)):
    fn = cascade.guided_model_fn(model, params["params"], text["text_emb"],
                                 text["text_mask"], null, parameterization="eps",
                                 guidance_scale=w, threshold="none",
                                 extra_cond={"cond_image": image}, null_extra=null_extra)
    uncond = net(x, logsnr, dict(null, cond_image=uncond_image,
                                 text_emb=jnp.broadcast_to(null["text_emb"],
                                                           text["text_emb"].shape),
                                 text_mask=jnp.broadcast_to(null["text_mask"],
                                                            text["text_mask"].shape)))
    np.testing.assert_allclose(fn(x, logsnr), uncond + w * (cond - uncond), atol=1e-5)


def _embed(images):
  # A toy frozen encoder: per-channel means [B, 3].
  return jnp.mean(images, axis=(1, 2))


@pytest.mark.slow  # (test_unclip's decoder trains the same path two steps in make test)
def test_a_conditioned_stage_trains_through_the_loop_and_its_loss_falls(tmp_path):
  # (an image embedding: its encoder runs in the loop's prepare_batch; the masked image
  # trains through the builders in the inpainting test below)
  condition = conditioning.ImageEmbedding(dim=3, encoder=jax.jit(_embed), drop_prob=0.5)
  fields = conditioning.unet_requirements((condition,))
  model = unet_lib.UNet(_config(**fields))
  loop_lib.train(
      tmp_path, model=model,
      loop=loop_lib.LoopSettings(num_steps=40, batch_size=8, resolution=16, log_every=10,
                                 checkpoint_every=40, mesh_axes=(("data", -1),
                                                                   ("model", 1))),
      step_settings=step_lib.StepSettings(step_lib.DiffusionSettings(conditions=(condition,)),
                                          ema_decay=0.9),
      optimizer=state_lib.OptimizerSettings(learning_rate=3e-3, warmup_steps=2),
      data_factory=lambda: th.ShapesIterator(8, 16), text_encoder=th.HashText(),
      log=lambda s: None)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  # Means over 10 steps each (one step's loss is too noisy in t).
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  # The stage restores with its conditions' inputs.
  params, step = loop_lib.restore_ema_params(
      tmp_path, model=model, loop=loop_lib.LoopSettings(num_steps=40, batch_size=8,
                                                        resolution=16),
      text_len=th.TEXT_LEN, text_dim=th.TEXT_DIM)
  assert step == 40 and "stem" in params


def test_inpainting_stage_from_its_config_edits_and_is_refused_where_it_cannot_run(tmp_path):
  """configs/inpaint_shapes.py:smoke through the builders (U-Net inputs and conditions
  from config.conditioning), two steps; then edit.py inpaint --method=stage end to end,
  and sample.py / the training-free methods refuse the stage."""
  import subprocess
  import sys

  import builders
  import conditioning_builders
  import latent_builders
  import sampling
  from cli import UserError
  from PIL import Image
  from test_sample import ROOT, _tiny

  from configs import inpaint_shapes

  config = _tiny(inpaint_shapes.get_config("smoke"), 8)
  model_cfg = latent_builders.stage_unet_config(config, builders.unet_config(config))
  assert model_cfg.cond_image_channels == 4
  steps = conditioning_builders.for_training(config, builders.step_settings(config), model_cfg)
  assert steps.diffusion.conditions == (conditioning.MaskedImage(),)
  workdir = tmp_path / "inpaint"
  loop_lib.train(
      workdir, model=unet_lib.UNet(model_cfg), loop=builders.loop_settings(config),
      step_settings=steps, optimizer=builders.optimizer_settings(config),
      data_factory=lambda: th.ShapesIterator(4, 8), text_encoder=builders.text_encoder(config),
      config_json=config.to_dict(), log=lambda s: None)
  with pytest.raises(UserError, match="edit.py inpaint --method=stage"):
    sampling.prepare_cascade(workdirs=[str(workdir)])
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "in.png")
  mask = np.zeros((8, 8), np.uint8)
  mask[:, 4:] = 255
  Image.fromarray(mask, "L").save(tmp_path / "mask.png")
  args = [sys.executable, str(ROOT / "experiments" / "edit.py"), "inpaint",
          f"--workdir={workdir}", "--prompt=a red dot", f"--image={tmp_path / 'in.png'}",
          f"--mask={tmp_path / 'mask.png'}", "--steps=3", "--num_images=2"]
  r = subprocess.run(args + ["--method=stage", f"--outdir={tmp_path / 'out'}"],
                     capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / "out" / "inpaint.png").is_file()
  from probe_helpers import tiny_probe

  r = subprocess.run(args[:2] + ["inpaint-eval", f"--workdir={workdir}", "--method=stage",
                                 "--num_cases=3", "--steps=3", f"--probe_path={tiny_probe()[1]}",
                                 f"--outdir={tmp_path / 'eval'}"],
                     capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  record = json.loads((tmp_path / "eval" / "inpaint_eval.json").read_text())
  assert record["num_cases"] == 3 and record["replaced"]["n"] == 3
  # The training-free methods need a text-to-image stage (edit.py's check).
  stage = sampling.load_cascade([str(workdir)])[0].stages[0]
  with pytest.raises(UserError, match="conditioned on masked_image"):
    sampling.check_stage_condition(stage, None, "w", "inpaint --method=repaint")
  with pytest.raises(UserError, match="kind='input_image'; w has masked_image"):
    sampling.check_stage_condition(stage, "input_image", "w", "instruct")


def test_the_cascade_samples_a_micro_conditioned_stage_uncropped_and_refuses_other_inputs():
  cfg = _config(micro_cond_dim=4)
  model, params = _init(cfg)
  spec = cascade.StageSpec(resolution=16, num_steps=2, guidance_scale=2.0)
  stage = cascade.Stage(model, params["params"], spec,
                        conditioning=(conditioning.MicroConditioning().to_json(),))
  np.testing.assert_array_equal(stage.sampling_inputs(2)["micro_cond"], [[16, 16, 0, 0]] * 2)
  text = th.HashText()
  out = cascade.Cascade([stage], text).sample(["a red circle", "a star"], jax.random.key(0))[0]
  emb, mask = text.encode(["a red circle", "a star"])
  null_emb, null_mask = text.encode([""])
  null = {"text_emb": jnp.asarray(null_emb[0]), "text_mask": jnp.asarray(null_mask[0])}
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), i))(
      jnp.arange(2, dtype=jnp.uint32))
  want = cascade.sample_stage(
      model, params["params"], jnp.asarray(emb), jnp.asarray(mask), null, keys, spec.grid(),
      image_shape=(16, 16, 3), parameterization="v", guidance_scale=2.0,
      extra_cond={"micro_cond": conditioning.uncropped(2, 16)})
  np.testing.assert_allclose(out, want, atol=1e-5)
  masked = dataclasses.replace(stage, conditioning=(conditioning.MaskedImage().to_json(),))
  with pytest.raises(ValueError, match="conditioned on masked_image"):
    masked.sampling_inputs(2)


def test_config_switches_build_the_conditions_and_bad_values_get_one_line():
  import builders
  import conditioning_builders

  from configs import demo_base

  config = demo_base.get_config("smoke")
  assert conditioning_builders.conditions(config) == ()
  config.conditioning.micro = True
  with pytest.raises(builders.ConfigError, match="crop='random_rescale'"):
    conditioning_builders.conditions(config)
  config.data.crop = "random_rescale"
  config.conditioning.kind = "masked_image"
  config.conditioning.drop_prob = 0.2
  assert conditioning_builders.conditions(config) == (
      conditioning.MaskedImage(drop_prob=0.2), conditioning.MicroConditioning())
  cfg = conditioning_builders.stage_unet_config(config, builders.unet_config(config))
  assert (cfg.cond_image_channels, cfg.micro_cond_dim, cfg.image_embed_dim) == (4, 4, None)
  config.conditioning.kind = "image_embed"
  with pytest.raises(builders.ConfigError, match="embed_dim"):
    conditioning_builders.conditions(config)
  config.conditioning.kind = "depth"
  with pytest.raises(builders.ConfigError, match="conditioning.kind='depth'"):
    conditioning_builders.conditions(config)
  config.conditioning.kind, config.conditioning.drop_prob = "input_image", 2.0
  with pytest.raises(builders.ConfigError, match="drop_prob must lie in"):
    conditioning_builders.conditions(config)
