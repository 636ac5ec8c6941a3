"""experiments/evaluate.py: one-line errors on bad input (fast), the training loop's
evaluator hook, and (slow) the whole evaluation on a tiny base stage trained here with
ShapesEval running inside its training, judged by the tiny test probe."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import probe_helpers
import pytest
import training_helpers as th
from cli_helpers import one_error_line

ROOT = pathlib.Path(__file__).resolve().parent.parent
EVALUATE = ROOT / "experiments" / "evaluate.py"
sys.path.insert(0, str(ROOT / "experiments"))

import builders  # noqa: E402
import evaluating  # noqa: E402

from configs import demo_base  # noqa: E402
from diffusion_jax.models import unet as unet_lib  # noqa: E402
from diffusion_jax.training import loop as loop_lib  # noqa: E402
from diffusion_jax.training import state as state_lib  # noqa: E402
from diffusion_jax.training import step as step_lib  # noqa: E402


def _evaluate(*args, cwd=ROOT):
  return subprocess.run([sys.executable, str(EVALUATE), *args], capture_output=True,
                        text=True, timeout=900, cwd=cwd)


def _tiny_config():
  config = demo_base.get_config("smoke")
  config.data.resolution = 8
  config.diffusion.schedule_kwargs.shifted_cosine.resolution = 8
  config.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 8
  config.text.encoder, config.text.max_length, config.text.cache_dir = "t5-offline", 32, None
  config.train.batch_size, config.train.num_steps = 4, 2
  config.train.checkpoint_every, config.train.preview_every = 1, 0
  config.eval.every, config.eval.num_steps = 2, 2
  config.eval.categories = ("colour_shape", "binding")
  return config


@pytest.mark.parametrize("args,message", [
    (["--categories=colour_shape,colours"], "--categories: unknown ShapesEval category "
     "'colours'; choose from colour_shape, counting, position, relation, binding."),
    (["--images_per_prompt=0"], "--images_per_prompt=0; it must be >= 1"),
    (["--fd_images=-3"], "--fd_images=-3; use 0 (no FD-probe) or at least 2."),
    (["--clip_score_model=/nonexistent/clip"], "--clip_score_model=/nonexistent/clip: "),
])
def test_bad_arguments_are_one_line_before_loading(tmp_path, args, message):
  error = one_error_line(_evaluate("--workdirs=/nonexistent", f"--outdir={tmp_path / 'out'}",
                                   *args))
  assert message in error, error
  assert not (tmp_path / "out").exists()


def test_workdir_without_checkpoints_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(_tiny_config().to_dict()))
  error = one_error_line(_evaluate(f"--workdirs={workdir}", f"--outdir={tmp_path / 'out'}"))
  assert "No checkpoint in" in error and "train this stage first" in error, error
  error = one_error_line(_evaluate(f"--workdirs={tmp_path}", f"--outdir={tmp_path / 'out'}"))
  assert "is not a training workdir" in error, error
  assert not (tmp_path / "out").exists()


def test_loop_calls_the_evaluator_and_logs_its_scalars(tmp_path):
  calls = []

  def evaluator(state, step):
    calls.append(step)
    return {"eval/fake": float(step) / 10}

  # The train step of training_helpers.run (so the compilation cache has it from
  # test_training), with an evaluator.
  loop = loop_lib.LoopSettings(num_steps=3, batch_size=8, resolution=16, checkpoint_every=10,
                               eval_every=2)
  loop_lib.train(tmp_path, model=th.tiny_unet(16), loop=loop,
                 step_settings=step_lib.StepSettings(
                     step_lib.DiffusionSettings(lowres_aug_max_t=0.5), ema_decay=0.9),
                 optimizer=state_lib.OptimizerSettings(learning_rate=2e-3, warmup_steps=2),
                 data_factory=lambda: th.ShapesIterator(8, 16), text_encoder=th.HashText(),
                 log=lambda s: None, evaluator=evaluator)
  assert calls == [2, 3]  # every eval_every steps and at the last
  lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["eval/fake"]) for r in lines if "eval/fake" in r] == [(2, .2), (3, .3)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny base stage trained 2 steps with ShapesEval inside training (the tiny probe)."""
  workdir = tmp_path_factory.mktemp("stage") / "base"
  config = _tiny_config()
  probe, probe_path = probe_helpers.tiny_probe()
  encoder = builders.text_encoder(config)
  model_cfg = builders.unet_config(config)
  evaluator = evaluating.training_evaluator(config, model_cfg, encoder, log=lambda s: None,
                                            probe=probe)
  loop_lib.train(
      workdir, model=unet_lib.UNet(model_cfg), loop=builders.loop_settings(config),
      step_settings=builders.step_settings(config),
      optimizer=builders.optimizer_settings(config),
      data_factory=lambda: th.ShapesIterator(4, 8), text_encoder=encoder,
      config_json=config.to_dict(), log=lambda s: None, evaluator=evaluator)
  return workdir, probe_path


@pytest.mark.slow
def test_shapes_eval_inside_training(trained):
  workdir, _ = trained
  lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
  scored = [r for r in lines if "eval/colour_shape/all" in r]
  assert [r["step"] for r in scored] == [2]
  for name in ("colour_shape/all", "colour_shape/seen", "colour_shape/held_out",
               "binding/all"):
    assert 0.0 <= scored[0][f"eval/{name}"] <= 1.0
  assert list((workdir / "tensorboard").iterdir())


@pytest.mark.slow
def test_evaluate_end_to_end(trained, tmp_path):
  from diffusion_jax.evaluation import inception

  workdir, probe_path = trained
  out = tmp_path / "eval"
  # FID with a small random Inception-v3 of the standard one's interface, from its file.
  tiny_inception = inception.InceptionSettings(width=1 / 16, input_size=75)
  fid_weights = tmp_path / "tiny_inception.npz"
  inception.save_npz(inception.init_params(tiny_inception), fid_weights, tiny_inception)
  r = _evaluate(f"--workdirs={workdir}", "--categories=colour_shape,relation",
                "--images_per_prompt=2", "--steps=2", "--guidance_scale=2", "--fd_images=6",
                "--batch_size=32", f"--probe_path={probe_path}", f"--outdir={out}",
                f"--fid_weights={fid_weights}", f"--clip_score_model={_tiny_clip(tmp_path)}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "ETA" in r.stdout and "images" in r.stdout
  result = json.loads((out / "eval.json").read_text())
  summary = result["summary"]
  assert summary["suite_version"] == "shapes-eval-v1"
  assert set(summary["categories"]) == {"colour_shape", "relation"}
  cs = summary["categories"]["colour_shape"]
  assert (cs["all"]["n"], cs["seen"]["n"], cs["held_out"]["n"]) == (96, 84, 12)
  assert summary["categories"]["relation"]["all"]["n"] == 24
  assert len(result["records"]) == 120
  assert {r["image_index"] for r in result["records"]} == {
      r * 94 + p for r in range(2) for p in [*range(48), *range(70, 82)]}
  for record in result["records"]:
    assert set(record) >= {"prompt", "read", "verdict", "correct", "held_out"}
  fd = result["fd_probe"]
  assert fd["num_images"] == 6 and np.isfinite(fd["generated_vs_real"])
  assert fd["generated_vs_real"] > fd["real_vs_real_floor"]  # 2-step samples are noise
  fid = result["fid"]
  assert fid["num_images"] == 6 and fid["feature_dim"] == 128
  assert fid["weights"] == str(fid_weights) and np.isfinite(fid["generated_vs_real"])
  accuracy = result["probe"]["accuracy_on_real"]
  assert set(accuracy) == {"validation@32px", "test_compositional@32px", "validation@64px",
                           "test_compositional@64px"}
  config = result["config"]
  assert config["stages"][0]["num_steps"] == 2 and config["stages"][0]["guidance_scale"] == 2
  assert config["images_per_prompt"] == 2 and config["workdirs"] == [str(workdir)]
  md = (out / "eval.md").read_text()
  assert "| colour_shape | held_out |" in md and "FD-probe (6 images, 8 px)" in md
  assert "FID (Inception-v3 pool3, 128-d" in md
  assert "The probe on real images" in md
  assert (out / "examples.png").stat().st_size > 0
  clip = result["clip_score"]
  assert clip["num_images"] == 120 and 0 <= clip["ci95"][0] <= clip["value"] <= clip["ci95"][1]
  assert "CLIP score (120 images" in md


def _tiny_clip(tmp_path):
  from diffusion_jax.models import clip as clip_lib
  from diffusion_jax.training import clip_train

  tok = clip_lib.train_tokenizer(["a red circle", "a blue square"], 300)
  config = clip_train.small_config(len(tok), resolution=8, width=16, layers=1, max_length=8,
                                   patch_size=4)
  # (seed 1: its random towers give these prompts positive cosines with noise images, so the
  # score is not all zeros clipped)
  clip_lib.save(clip_train.init_clip(config, tok, seed=1), tmp_path / "clip")
  return tmp_path / "clip"


def test_clip_score_of_is_the_clip_score_with_an_interval(tmp_path):
  from diffusion_jax.evaluation import clip_score
  from diffusion_jax.models import clip as clip_lib

  clip = clip_lib.load(_tiny_clip(tmp_path))
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  prompts = ["a red circle", "a blue square", "a red square", "a circle", "blue", "red"]
  result = evaluating.clip_score_of(clip, images, prompts, "tiny")
  x = images.astype(np.float32) / 127.5 - 1
  pairs = np.array([clip_score.clip_score(clip, x[i:i + 1], prompts[i:i + 1])
                    for i in range(6)])
  assert pairs.std() > 0.1  # (a random CLIP: some pairs clip to 0, the rest must differ)
  assert result["value"] == pytest.approx(clip_score.clip_score(clip, x, prompts), abs=1e-4)
  half = 1.959964 * pairs.std(ddof=1) / np.sqrt(6)
  np.testing.assert_allclose(result["ci95"], [pairs.mean() - half, pairs.mean() + half],
                             atol=1e-4)
  assert result["num_images"] == 6


def test_fd_probe_draws_its_real_images_as_the_stage_was_trained():
  """With single_size, FD-probe's real validation scenes have the stage's object size: a
  'sampler' returning exactly those scenes is at distance ~0 from them, not from mixed sizes."""
  from diffusion_jax.data import shapes

  def features(images):
    return np.asarray(images, np.float32).reshape(len(images), 16, 2, 16, 2, 3).mean(
        (2, 4, 5)).reshape(len(images), -1)[:, ::8]

  def large_scenes(prompts, first_index):
    first = first_index - evaluating.FD_INDEX_OFFSET
    return np.stack([shapes.make_example(0, "validation", first + i, 32, max_objects=1,
                                         single_size="large")[2] for i in range(len(prompts))])

  same = evaluating.fd_probe(features, large_scenes, 24, 32, 1, batch_size=8,
                             single_size="large")
  mixed = evaluating.fd_probe(features, large_scenes, 24, 32, 1, batch_size=8)
  assert same["generated_vs_real"] < 1e-3 * mixed["generated_vs_real"]
  captions = evaluating.fd_captions(24, 1, "large")
  assert captions == [shapes.make_example(0, "validation", i, 8, max_objects=1,
                                          single_size="large")[1] for i in range(24)]


def test_frechet_feature_extractor_is_a_parameter():
  # Any images -> [B, D] function: here a fixed random projection of 4x4-pooled pixels.
  projection = np.random.default_rng(0).normal(size=(48, 12))

  def features(images):
    x = np.asarray(images, np.float32).reshape(len(images), 4, 8, 4, 8, 3).mean((2, 4))
    return x.reshape(len(images), -1) @ projection

  def noise_sampler(prompts, first_index):
    rng = np.random.default_rng(first_index)
    return rng.integers(0, 256, (len(prompts), 32, 32, 3), dtype=np.uint8)

  fd = evaluating.fd_probe(features, noise_sampler, 40, 32, 3, batch_size=16)
  assert fd["feature_dim"] == 12 and fd["num_images"] == 40
  assert 0 < fd["real_vs_real_floor"] < fd["generated_vs_real"]
