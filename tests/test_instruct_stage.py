"""configs/instruct_shapes.py end to end on a tiny stage: two training steps through
builders.run_training (the shapes_edits set prepared on first use, input_image reaching the
step), then edit.py's instruct / instruct-eval on it; bad input gets one error line."""

import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from cli_helpers import one_error_line
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import builders  # noqa: E402
import instruct_edit  # noqa: E402
from cli import UserError  # noqa: E402

from configs import instruct_shapes  # noqa: E402

EDIT = ROOT / "experiments" / "edit.py"
RES = 8


def _tiny(tmp):
  config = instruct_shapes.get_config("smoke")
  config.data.resolution, config.data.data_dir = RES, str(tmp / "data")
  config.diffusion.schedule_kwargs.shifted_cosine.resolution = RES
  config.diffusion.schedule_kwargs.shifted_cosine.base_resolution = RES
  config.text.encoder, config.text.max_length, config.text.cache_dir = "t5-offline", 32, None
  config.train.batch_size = 4
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("instruct")
  config = _tiny(tmp)
  state, summary = builders.run_training(config, str(tmp / "stage"))
  assert int(state.step) == 2 and np.isfinite(summary["loss"])
  return tmp / "stage"


@pytest.fixture(scope="module")
def loaded(workdir):
  """(Stage, text encoder) of the trained workdir, loaded once."""
  import sampling

  cascade, _, _ = sampling.load_cascade([str(workdir)])
  return cascade.stages[0], cascade.text_encoder


def _flags(workdir, outdir, **kwargs):
  values = dict(workdir=str(workdir), outdir=str(outdir), checkpoint_step=None, prompt=None,
                image=None, image_guidance=["1.5"], text_guidance=["7.5"], num_images=2,
                seed=0, sampler=None, steps=3, num_pairs=4, probe_path=None)
  return types.SimpleNamespace(**{**values, **kwargs})


def _png(path, size, value=200):
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
  return str(path)


def test_the_stage_trains_on_edit_pairs_with_its_input_image(workdir, loaded):
  config = json.loads((workdir / "config.json").read_text())
  assert config["conditioning"]["kind"] == "input_image"
  assert config["data"]["dataset"] == "shapes_edits"
  # The U-Net's stem took the input image's channels beside x_t.
  assert loaded[0].model.config.cond_image_channels == 3
  assert [c["kind"] for c in loaded[0].conditioning] == ["input_image"]


def test_instruct_runs_end_to_end_at_a_grid_of_scales(workdir, loaded, tmp_path):
  image = _png(tmp_path / "in.png", RES)
  f = _flags(workdir, tmp_path / "out", image=image, prompt="make the circle red",
             image_guidance=["1", "2"], text_guidance=["3"])
  path = instruct_edit.run("instruct", f)
  grid = np.asarray(Image.open(path))
  assert grid.ndim == 3 and grid.dtype == np.uint8
  record = json.loads((tmp_path / "out" / "edit.json").read_text())
  assert record["command"] == "instruct" and len(record["scales"]) == 2
  # s_I = 1, s_T = 1 is the conditional model alone; larger scales change the output.
  from diffusion_jax.diffusion import samplers
  edit = instruct_edit.editor(*loaded)
  x = np.broadcast_to(np.asarray(Image.open(image), np.float32) / 127.5 - 1, (2, RES, RES, 3))
  import jax
  keys = samplers.image_keys(jax.random.key(0), 2)
  plain, guided = (np.asarray(edit(x, ["make the circle red"] * 2, keys, s, s))
                   for s in (1.0, 4.0))
  assert np.isfinite(plain).all() and np.abs(plain - guided).max() > 1e-4


def test_instruct_eval_writes_the_score_table(workdir, tmp_path):
  sys.path.insert(0, str(ROOT / "tests"))
  import probe_helpers

  _, probe_path = probe_helpers.tiny_probe()
  f = _flags(workdir, tmp_path / "eval", num_pairs=3, probe_path=str(probe_path))
  instruct_edit.run("instruct-eval", f)
  table = (tmp_path / "eval" / "instruct_eval.md").read_text()
  for label in ("model s_I=1.5 s_T=7.5", "exact edit", "input returned"):
    assert f"| {label} | all | 3 |" in table
  record = json.loads((tmp_path / "eval" / "instruct_eval.json").read_text())
  assert len(record["per_pair"]["model s_I=1.5 s_T=7.5"]) == 3


def test_bad_input_in_process(workdir, tmp_path):
  with pytest.raises(UserError, match="is 16x16 px but the stage takes 8x8 px"):
    instruct_edit.run("instruct", _flags(workdir, tmp_path / "o", prompt="make it red",
                                         image=_png(tmp_path / "big.png", 16)))
  with pytest.raises(UserError, match="--image_guidance=a is not a list of numbers"):
    instruct_edit.check_flags("instruct", _flags(workdir, tmp_path, prompt="x", image="y",
                                                 image_guidance=["a"]))
  assert not (tmp_path / "o").exists()


def test_a_text_only_stage_is_refused_in_one_line(tmp_path):
  stage = tmp_path / "base"
  stage.mkdir()
  from configs import demo_base
  (stage / "config.json").write_text(json.dumps(demo_base.get_config("smoke").to_dict()))
  image = _png(tmp_path / "in.png", 32)
  r = subprocess.run([sys.executable, str(EDIT), "instruct", f"--workdir={stage}",
                      f"--outdir={tmp_path / 'out'}", f"--image={image}",
                      "--prompt=make the circle red"], capture_output=True, text=True,
                     timeout=600, cwd=ROOT)
  assert "is not an image-conditioned stage" in one_error_line(r)
  assert not (tmp_path / "out").exists()


def test_dual_guidance_at_image_scale_one_is_the_stages_cfg(loaded):
  # On the trained stage: s_I = 1 is classifier-free guidance of (I, T) against (I, null)
  # as cascade.guided_model_fn runs it with the input image in both halves; and the null
  # image (zeros) changes the prediction, so s_I > 1 does guide on the image.
  import jax
  import jax.numpy as jnp

  from diffusion_jax import cascade as cascade_lib
  from diffusion_jax.editing import dual_guidance

  stage, encoder = loaded
  emb, mask = (jnp.asarray(a) for a in encoder.encode(["make the circle red"] * 2))
  null_emb, null_mask = encoder.encode([""])
  null = {"text_emb": jnp.asarray(null_emb[0]), "text_mask": jnp.asarray(null_mask[0])}
  image = jax.random.uniform(jax.random.key(1), (2, RES, RES, 3), minval=-1, maxval=1)
  x = jax.random.normal(jax.random.key(2), (2, RES, RES, 3))
  logsnr = jnp.array([-1.0, 2.0])
  net = cascade_lib.stage_model_fn(stage.model, stage.params)
  conds = dual_guidance.instruct_conditions(image, {"text_emb": emb, "text_mask": mask}, null)
  dual = jax.jit(lambda x, lam, s_i: dual_guidance.dual_classifier_free(
      net, *conds, 4.0, s_i)(x, lam))
  cfg = jax.jit(lambda x, lam: cascade_lib.guided_model_fn(
      stage.model, stage.params, emb, mask, null, parameterization="v", guidance_scale=4.0,
      threshold="none", extra_cond={"cond_image": image})(x, lam))(x, logsnr)
  np.testing.assert_allclose(dual(x, logsnr, 1.0), cfg, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(dual(x, logsnr, 2.0) - cfg).max()) > 1e-5


@pytest.mark.slow
def test_instruct_cli_end_to_end(workdir, tmp_path):
  image = _png(tmp_path / "in.png", RES)
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, str(EDIT), "instruct", f"--workdir={workdir}",
                      f"--outdir={out}", f"--image={image}", "--prompt=make the circle red",
                      "--image_guidance=1,1.5", "--text_guidance=2", "--steps=3"],
                     capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (out / "instruct.png").is_file()
  assert json.loads((out / "edit.json").read_text())["command"] == "instruct"
