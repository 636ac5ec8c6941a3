"""unCLIP's decoder and pipeline on tiny models: the CLIP image-embedding encoder the decoder
is conditioned with (against the CLIP's own embeddings), configs/unclip_decoder_shapes.py
trained two steps through the training loop with that encoder, experiments/unclip.py
variations end to end, and (slow) sample and evaluate; bad input is one error line."""

import json
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import training_helpers as th
import unclip_helpers
from cli_helpers import one_error_line
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import builders  # noqa: E402
import conditioning_builders  # noqa: E402
import latent_builders  # noqa: E402
import unclip_builders  # noqa: E402

from configs import demo_base, demo_sr, unclip_decoder_shapes  # noqa: E402
from diffusion_jax import conditioning, sharding, unclip  # noqa: E402
from diffusion_jax.data import shapes  # noqa: E402
from diffusion_jax.evaluation import clip_score  # noqa: E402
from diffusion_jax.models import unet as unet_lib  # noqa: E402
from diffusion_jax.training import loop as loop_lib  # noqa: E402

RES = unclip_helpers.RESOLUTION


def _unclip(*args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "unclip.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=900)


def _decoder_config(clip_dir):
  config = unclip_decoder_shapes.get_config("smoke")
  config.data.resolution = RES
  config.diffusion.schedule_kwargs.shifted_cosine.resolution = RES
  config.diffusion.schedule_kwargs.shifted_cosine.base_resolution = RES
  config.text.encoder, config.text.max_length, config.text.cache_dir = "t5-offline", 16, None
  config.train.batch_size, config.train.num_steps = 4, 2
  config.train.checkpoint_every, config.train.preview_every = 1, 0
  config.conditioning.clip_dir = str(clip_dir)
  return config


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
  return unclip_helpers.save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def decoder_workdir(clip_workdir, tmp_path_factory):
  """The decoder config trained two steps with the experiment's own settings and the
  conditions conditioning_builders builds (the frozen CLIP encoder), on in-memory shapes."""
  workdir = tmp_path_factory.mktemp("decoder")
  config = _decoder_config(clip_workdir)
  model_cfg = latent_builders.stage_unet_config(config, builders.unet_config(config))
  steps = conditioning_builders.for_training(config, builders.step_settings(config), model_cfg)
  loop_lib.train(workdir, model=unet_lib.UNet(model_cfg), loop=builders.loop_settings(config),
                 step_settings=steps, optimizer=builders.optimizer_settings(config),
                 data_factory=lambda: th.ShapesIterator(4, RES),
                 text_encoder=builders.text_encoder(config), config_json=config.to_dict(),
                 log=lambda s: None)
  return workdir, steps


def test_image_embedder_is_the_clips_unit_norm_image_embedding(clip_workdir):
  clip, directory = unclip.load_clip(clip_workdir)
  embedder = unclip.ImageEmbedder(clip, directory)
  images = np.stack([shapes.make_example(0, "validation", i, RES, max_objects=1)[2]
                     for i in range(3)]).astype(np.float32) / 127.5 - 1.0
  out = np.asarray(embedder(images))
  assert out.shape == (3, clip.config.projection_dim) and embedder.dim == 16
  np.testing.assert_allclose(out, clip_score.image_embeddings(clip, images), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  # Its output keeps a sharded batch's batch-axis sharding (the train step's in_sharding).
  mesh = sharding.make_mesh()
  sharded = jax.device_put(images, sharding.batch_sharding(mesh, sharding.FSDP_RULES, 4))
  assert embedder(sharded).sharding == sharding.batch_sharding(mesh, sharding.FSDP_RULES, 2)


def test_decoder_trains_two_steps_on_the_clip_embedding(decoder_workdir, clip_workdir):
  workdir, steps = decoder_workdir
  (condition,) = steps.diffusion.conditions
  assert isinstance(condition, conditioning.ImageEmbedding)
  assert (condition.dim, condition.drop_prob) == (16, 0.1)
  assert isinstance(condition.encoder, unclip.ImageEmbedder)
  assert steps.diffusion.cond_drop_prob == 0.5  # the caption is optional
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  model_cfg = latent_builders.stage_unet_config(config, builders.unet_config(config))
  assert model_cfg.image_embed_dim == 16  # read from the CLIP's config.json
  params, step = loop_lib.restore_ema_params(workdir, model=unet_lib.UNet(model_cfg),
                                             loop=builders.loop_settings(config),
                                             text_len=16, text_dim=256)  # t5-offline
  assert step == 2 and "image_embed_proj" in params


def test_variations_end_to_end(decoder_workdir, tmp_path):
  workdir, _ = decoder_workdir
  image = shapes.make_example(0, "validation", 5, 16, max_objects=1)[2]  # resized to 8 px
  Image.fromarray(image).save(tmp_path / "in.png")
  r = _unclip("variations", f"--workdirs={workdir}", f"--image={tmp_path / 'in.png'}",
              "--num_images=2", "--steps=2", f"--outdir={tmp_path / 'out'}")
  assert r.returncode == 0, r.stderr[-3000:]
  record = json.loads((tmp_path / "out" / "unclip.json").read_text())
  assert record["num_images"] == 2 and record["stages"][0]["num_steps"] == 2
  assert len(record["clip_cosine_to_input"]) == 2
  assert all(-1.0001 <= c <= 1.0001 for c in record["clip_cosine_to_input"])
  grid = np.asarray(Image.open(tmp_path / "out" / "variations.png"))
  # The input and two variations in one row, tiles of 8 px scaled to 128 px.
  assert grid.shape[1] == 3 * (128 + 2) + 2 and grid.std() > 0


def test_bad_input_is_one_error_line(decoder_workdir, tmp_path):
  workdir, _ = decoder_workdir
  line = one_error_line(_unclip("variations", f"--workdirs={workdir}",
                                f"--image={tmp_path / 'none.png'}", f"--outdir={tmp_path}/o"))
  assert "--image" in line and "does not exist" in line
  wrong = tmp_path / "t5"
  wrong.mkdir()
  (wrong / "config.json").write_text(json.dumps({"model_type": "t5"}))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
  line = one_error_line(_unclip("variations", f"--workdirs={workdir}", f"--clip_dir={wrong}",
                                f"--image={tmp_path / 'in.png'}", f"--outdir={tmp_path}/o"))
  assert "--clip_dir" in line and "model_type 't5', not 'clip'" in line
  assert not (tmp_path / "o").exists()
  plain = tmp_path / "plain"  # a text-to-image stage's workdir (its config is enough)
  plain.mkdir()
  (plain / "config.json").write_text(json.dumps(demo_base.get_config("smoke").to_dict()))
  line = one_error_line(_unclip("variations", f"--workdirs={plain}",
                                f"--image={tmp_path / 'in.png'}", f"--outdir={tmp_path}/o"))
  assert "not trained with a CLIP image embedding" in line and "'none'" in line


def test_a_prior_of_another_clip_is_refused(clip_workdir, tmp_path):
  import shutil

  same, other = tmp_path / "same", tmp_path / "other"
  shutil.copytree(clip_workdir / "clip", same)
  shutil.copytree(clip_workdir / "clip", other)
  (other / "model.safetensors").write_bytes(b"other weights")
  assert unclip_builders._same_clip(str(clip_workdir / "clip"), str(same))
  assert not unclip_builders._same_clip(str(clip_workdir / "clip"), str(other))


@pytest.mark.slow
def test_sample_and_evaluate_end_to_end(decoder_workdir, clip_workdir, tmp_path):
  import probe_helpers

  workdir, _ = decoder_workdir
  prior = tmp_path / "prior"
  r = subprocess.run([sys.executable, str(ROOT / "experiments" / "train_prior.py"),
                      "--config=configs/prior_shapes.py:smoke",
                      f"--config.clip_dir={clip_workdir}", f"--config.resolution={RES}",
                      f"--workdir={prior}"], capture_output=True, text=True, cwd=ROOT,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  # An 8 -> 16 px super-resolution stage after the decoder, as demo_sr follows it.
  config = demo_sr.get_config("smoke")
  config.data.resolution, config.data.lowres_resolution = 2 * RES, RES
  config.data.crop, config.data.shapes_resolution = "center", None
  config.diffusion.schedule_kwargs.shifted_cosine.resolution = 2 * RES
  config.diffusion.schedule_kwargs.shifted_cosine.base_resolution = RES
  config.text.encoder, config.text.max_length, config.text.cache_dir = "t5-offline", 16, None
  config.train.batch_size, config.train.num_steps, config.train.checkpoint_every = 4, 2, 2
  sr = tmp_path / "sr"
  loop_lib.train(sr, model=unet_lib.UNet(builders.unet_config(config)),
                 loop=builders.loop_settings(config), step_settings=builders.step_settings(config),
                 optimizer=builders.optimizer_settings(config),
                 data_factory=lambda: th.ShapesIterator(4, 2 * RES, RES),
                 text_encoder=builders.text_encoder(config), config_json=config.to_dict(),
                 log=lambda s: None)
  common = [f"--prior={prior}", f"--workdirs={workdir},{sr}", "--steps=2", "--prior_steps=2"]
  r = _unclip("sample", *common, "--prompts=a red circle", "--prompts=a blue square",
              f"--outdir={tmp_path / 's'}")
  assert r.returncode == 0, r.stderr[-3000:]
  record = json.loads((tmp_path / "s" / "unclip.json").read_text())
  assert record["prompts"] == ["a red circle", "a blue square"]
  assert record["prior"]["num_steps"] == 2
  assert [s["resolution"] for s in record["stages"]] == [RES, 2 * RES]
  assert (tmp_path / "s" / "stage1_8px.png").exists()
  assert (tmp_path / "s" / "stage2_16px.png").exists()
  _, probe_path = probe_helpers.tiny_probe()
  r = _unclip("evaluate", *common, "--images_per_prompt=1", "--num_inputs=3",
              "--variations_per_input=2", "--batch_size=16", f"--probe_path={probe_path}",
              f"--outdir={tmp_path / 'e'}")
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads((tmp_path / "e" / "eval.json").read_text())
  assert result["summary"]["categories"]["colour_shape"]["all"]["n"] == 48
  v = result["variations"]
  assert (v["num_inputs"], v["variations_per_input"]) == (3, 2)
  assert v["vs_input_truth"]["correct"]["n"] == 6
  assert (tmp_path / "e" / "variations.png").exists() and (tmp_path / "e" / "eval.md").exists()


def test_decoder_config_needs_a_clip(clip_workdir, tmp_path):
  config = _decoder_config(clip_workdir)
  (condition,) = conditioning_builders.conditions(config)
  assert condition.dim == 16 and condition.encoder is None  # config.json read, no weights
  config.conditioning.clip_dir = None
  with pytest.raises(builders.ConfigError, match="needs config.conditioning.clip_dir"):
    conditioning_builders.conditions(config)
  config.conditioning.clip_dir = str(tmp_path)
  with pytest.raises(builders.ConfigError, match="config.json not found"):
    conditioning_builders.conditions(config)
  config.conditioning.clip_dir, config.conditioning.embed_dim = str(clip_workdir), 32
  with pytest.raises(builders.ConfigError, match="embed_dim=32, but the CLIP"):
    conditioning_builders.image_embed_encoder(config)
