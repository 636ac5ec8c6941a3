"""Latent diffusion end to end on tiny sizes: an autoencoder trained here for two steps
(scale factor from data, PSNR, diffusers export), a latent base stage trained on its
latents for two steps with the ordinary trainer, sampled through experiments/sample.py
(decoded to pixels), and one-line errors for a VAE without weights and sizes that do not
chain."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import training_helpers as th
from cli_helpers import one_error_line
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import builders  # noqa: E402
import latent_builders  # noqa: E402

from configs import autoencoder_shapes, latent_shapes  # noqa: E402
from diffusion_jax import sharding, stage_kinds  # noqa: E402
from diffusion_jax.models import autoencoder as ae  # noqa: E402
from diffusion_jax.models import unet as unet_lib  # noqa: E402
from diffusion_jax.training import autoencoder as ae_train  # noqa: E402
from diffusion_jax.training import loop as loop_lib  # noqa: E402

RES, BATCH = 16, 4


def _tiny_autoencoder_config():
  config = autoencoder_shapes.get_config("smoke")
  config.autoencoder.block_out_channels = (8, 16, 16)  # f = 4: 16 px -> 4x4x4 latents
  config.autoencoder.norm_num_groups = 4
  return config


@pytest.fixture(scope="module")
def trained_autoencoder(tmp_path_factory):
  config = _tiny_autoencoder_config()
  workdir = tmp_path_factory.mktemp("ae")
  a = config.autoencoder
  summary = ae_train.train(
      workdir, config=latent_builders.autoencoder_config(config),
      loop=ae_train.AutoencoderLoop(num_steps=2, batch_size=BATCH, resolution=RES,
                                    log_every=1, scale_batches=2),
      loss=ae_train.LossSettings(a.l1_weight, a.l2_weight, a.kl_weight),
      optimizer=builders.optimizer_settings(config),
      data_factory=lambda: th.ShapesIterator(BATCH, RES), log=lambda s: None)
  return workdir, summary


def test_autoencoder_trains_two_steps_and_stores_its_scale_factor(trained_autoencoder):
  workdir, summary = trained_autoencoder
  assert summary["step"] == 2 and (workdir / "checkpoints" / "2").is_dir()
  assert 0 < summary["psnr"] < 100 and math.isfinite(summary["train_metrics"]["loss"])
  loaded = ae.load_diffusers(workdir / ae_train.EXPORT_DIR)
  assert loaded.config.scaling_factor == pytest.approx(summary["scale_factor"])
  assert json.loads((workdir / ae_train.SUMMARY_NAME).read_text())["step"] == 2
  # Recomputed here: the statistics were taken on the two batches after the training ones.
  data = th.ShapesIterator(BATCH, RES)
  batches = [next(data)["image"] for _ in range(4)][2:]
  model, params = loaded.model, loaded.params
  encode_mean = jax.jit(lambda x: model.apply({"params": params}, x, method="encode")[0])
  z = np.asarray(encode_mean(np.concatenate(batches)))
  assert z.shape == (2 * BATCH, RES // 4, RES // 4, 4)
  assert summary["scale_factor"] == pytest.approx(1 / z.std(), rel=1e-4)
  scaled = z * loaded.config.scaling_factor  # what encode_fn gives (test_autoencoder.py)
  assert scaled.std() == pytest.approx(1.0, rel=1e-4)  # unit variance by construction
  recon = np.clip(jax.jit(lambda x: model.apply({"params": params}, x)[0])(batches[0]), -1, 1)
  mse = np.mean((recon - batches[0]) ** 2, axis=(1, 2, 3))
  psnr0 = np.asarray(ae_train.psnr(recon, batches[0]))
  np.testing.assert_allclose(psnr0, 10 * np.log10(4 / mse), rtol=1e-5)


def test_the_probe_reads_the_autoencoders_reconstructions(trained_autoencoder):
  from probe_helpers import tiny_probe

  from diffusion_jax.evaluation import probe_accuracy

  workdir, _ = trained_autoencoder
  directory = str(workdir / ae_train.EXPORT_DIR)
  probe = tiny_probe()[0]
  images, _ = probe_accuracy.real_examples("validation", 8, RES)
  recon = latent_builders.reconstructions_fn(ae.load_diffusers(directory), batch_size=4)(images)
  assert recon.shape == images.shape and recon.dtype == np.uint8
  assert np.abs(recon.astype(int) - images).max() > 0  # (a two-step autoencoder is lossy)
  report = latent_builders.probe_on_reconstructions(directory, RES, 8, probe=probe)
  assert report["real"] == probe_accuracy.measure(probe, ((RES, 8),))
  # The reconstructed entry is the probe's reading of those reconstructions.
  entry = report["reconstructed"][f"validation@{RES}px"]
  _, specs = probe_accuracy.real_examples("validation", 8, RES)
  assert entry == {**probe_accuracy.attribute_accuracy(probe.read(recon), specs),
                   "num_images": 8}


def _latent_config(directory):
  config = latent_shapes.get_config("smoke")
  config.autoencoder.directory = str(directory)
  config.text.encoder, config.text.max_length, config.text.cache_dir = "t5-offline", 32, None
  config.train.batch_size, config.train.checkpoint_every = BATCH, 1
  config.train.preview_every, config.train.preview_steps = 2, 2
  return config


@pytest.fixture(scope="module")
def latent_workdir(trained_autoencoder, tmp_path_factory):
  config = _latent_config(trained_autoencoder[0] / ae_train.EXPORT_DIR)
  workdir = tmp_path_factory.mktemp("latent")
  loop = builders.loop_settings(config)
  mesh = sharding.make_mesh(dict(loop.mesh_axes))
  kind, model_cfg, loop = latent_builders.for_training(
      config, builders.unet_config(config), loop, mesh, loop.rules)
  assert isinstance(kind, stage_kinds.LatentKind)
  assert (loop.resolution, model_cfg.in_channels, model_cfg.out_channels) == (RES // 4, 4, 4)
  state, _ = loop_lib.train(
      workdir, model=unet_lib.UNet(model_cfg), loop=loop,
      step_settings=builders.step_settings(config),
      optimizer=builders.optimizer_settings(config),
      data_factory=lambda: th.ShapesIterator(BATCH, RES), text_encoder=builders.text_encoder(
          config), config_json=config.to_dict(), log=lambda s: None, stage_kind=kind)
  assert int(state.step) == 2
  return workdir


@pytest.mark.slow  # two U-Net steps, a preview and a sample.py run: ~1 min idle
def test_latent_stage_trains_and_samples_through_sample_py(latent_workdir, tmp_path):
  preview = Image.open(latent_workdir / "previews" / "step_2.png")  # decoded, not latents
  assert preview.mode == "RGB"
  out = tmp_path / "samples"
  r = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "sample.py"),
       f"--workdirs={latent_workdir}", "--prompts=a red circle", "--prompts=a blue square",
       "--steps=2", f"--outdir={out}"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  image = np.asarray(Image.open(out / "images" / "0001_16px.png"))
  assert image.shape == (RES, RES, 3)  # pixels at the stage's output size
  record = json.loads((out / "samples.json").read_text())
  assert record["stages"][0]["resolution"] == RES
  assert record["stages"][0]["threshold"] == "none"  # latents are not clipped to [-1, 1]


def test_latent_kind_shapes_and_decoding(trained_autoencoder):
  kind = latent_builders.stage_kind(_latent_config(trained_autoencoder[0] / "autoencoder"))
  images = next(th.ShapesIterator(BATCH, RES))["image"]
  latents = kind.encode_batch({"image": jax.numpy.asarray(images), "text_mask": 1})
  assert latents["image"].shape == (BATCH, 4, 4, 4) and latents["text_mask"] == 1
  assert kind.sample_shape(RES, 3) == (4, 4, 4)
  decoded = np.asarray(kind.decode(latents["image"]))
  assert decoded.shape == (BATCH, RES, RES, 3) and np.abs(decoded).max() <= 1.0
  assert stage_kinds.PIXEL.sample_shape(RES, 3) == (RES, RES, 3)
  assert stage_kinds.from_json(kind.to_json()).directory == kind.directory


def test_latent_cache_returns_what_the_encoder_gave_and_stops_growing_when_full():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
  latents = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  cache = stage_kinds.LatentCache(max_bytes=2 * latents[0].nbytes)  # room for two of three
  keys, found = cache.lookup(images)
  assert found is None and cache.misses == 1
  cache.store(keys, latents)
  assert len(cache) == 2 and cache.bytes == 2 * latents[0].nbytes
  _, found = cache.lookup(images[:2])
  np.testing.assert_array_equal(found, latents[:2])  # exact, in the batch's order
  assert cache.lookup(images[[1, 0]])[1][0].tobytes() == latents[1].tobytes()
  assert cache.lookup(images)[1] is None  # the third never fitted: the batch is a miss
  changed = images[:1].copy()
  changed[0, 0, 0, 0] += 1e-3
  assert cache.lookup(changed)[1] is None  # one changed value is another image
  with pytest.raises(ValueError, match="positive size"):
    stage_kinds.LatentCache(0)


def test_a_cached_latent_stage_encodes_each_image_once_and_gives_the_same_latents(
    trained_autoencoder):
  config = _latent_config(trained_autoencoder[0] / "autoencoder")
  plain = latent_builders.stage_kind(config)  # sampling: no cache
  assert plain.cache is None
  cached = latent_builders.stage_kind(config, training=True)
  assert cached.cache is not None and cached.cache.max_bytes == 2048 * 2**20
  images = jax.numpy.asarray(next(th.ShapesIterator(BATCH, RES))["image"])
  expected = np.asarray(plain.encode_batch({"image": images})["image"])
  first = cached.encode_batch({"image": images, "text_mask": 1})
  second = cached.encode_batch({"image": images, "text_mask": 1})
  assert (cached.cache.misses, cached.cache.hits, len(cached.cache)) == (1, 1, BATCH)
  np.testing.assert_array_equal(np.asarray(first["image"]), expected)
  np.testing.assert_array_equal(np.asarray(second["image"]), expected)
  assert second["text_mask"] == 1 and second["image"].shape == first["image"].shape
  config.autoencoder.latent_cache_mb = 0
  assert latent_builders.stage_kind(config, training=True).cache is None
  config.autoencoder.latent_cache_mb = -1
  with pytest.raises(builders.UserError, match="latent_cache_mb=-1"):
    latent_builders.stage_kind(config, training=True)


def test_a_vae_directory_without_weights_is_one_line(trained_autoencoder, tmp_path):
  empty = tmp_path / "vae"
  empty.mkdir()
  (empty / "config.json").write_text(
      (trained_autoencoder[0] / "autoencoder" / "config.json").read_text())
  r = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "train.py"),
       "--config=configs/latent_shapes.py:smoke", f"--config.autoencoder.directory={empty}",
       f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT)
  assert "has no autoencoder weights" in one_error_line(r)


@pytest.mark.parametrize("resolution, preset, message", [
    (18, "demo_base", "does not chain with the autoencoder"),
    (24, "demo_base", "gives 6 px latents"),
    (16, "demo_sr", "latent stages are base stages"),
])
def test_sizes_that_do_not_chain_are_one_line(trained_autoencoder, resolution, preset,
                                              message):
  config = _latent_config(trained_autoencoder[0] / "autoencoder")
  config.data.resolution, config.model.preset = resolution, preset
  if preset == "demo_sr":
    config.data.lowres_resolution = 8
  # The preset as is: builders.unet_config's pixel-size checks are implied by these.
  unet_cfg = unet_lib.PRESETS[preset]
  with pytest.raises(builders.UserError, match=message) as error:
    latent_builders.stage_unet_config(config, unet_cfg)
  assert "\n" not in str(error.value)



def test_workdirs_from_before_latent_stages_are_pixel_stages():
  import ml_collections
  old = ml_collections.ConfigDict({"model": {"preset": "demo_base"}})  # no autoencoder
  assert latent_builders.stage_unet_config(old, unet_lib.PRESETS["demo_base"]) is (
      unet_lib.PRESETS["demo_base"])
  assert latent_builders.stage_kind(old) is stage_kinds.PIXEL
  assert latent_builders.spec_defaults(old) == {}


def test_train_autoencoder_script_reports_a_bad_flag_in_one_line(tmp_path):
  """The script's flag handling (it once crashed on a flag parser that had moved)."""
  r = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "train_autoencoder.py"),
       "--config=configs/autoencoder_shapes.py:smoke", "--config.train.num_steps=-1",
       f"--workdir={tmp_path / 'ae'}"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 2 and "num_steps" in one_error_line(r), r.stderr[-2000:]
  assert not (tmp_path / "ae" / "autoencoder").exists()
