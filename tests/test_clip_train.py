"""CLIP contrastive training: the loss against a closed form computed in numpy, one train
step on tiny data, the zero-shot and CLIP-score evaluators, and (slow) the trained shapes
CLIP's zero-shot accuracy above a measured bar."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import one_error_line

from diffusion_jax.models import clip as clip_lib
from diffusion_jax.training import clip_train


def _numpy_infonce(image, text, log_scale):
  """Symmetric InfoNCE written out with float64 log-sum-exp, row by row."""
  scale = min(np.exp(log_scale), 100.0)
  logits = scale * image.astype(np.float64) @ text.T.astype(np.float64)
  total = 0.0
  for i in range(len(logits)):
    row, col = logits[i], logits[:, i]
    total += (np.log(np.exp(row - row.max()).sum()) + row.max() - row[i]) / 2
    total += (np.log(np.exp(col - col.max()).sum()) + col.max() - col[i]) / 2
  return total / len(logits), logits


@pytest.mark.parametrize("log_scale", [0.0, np.log(1 / 0.07), 6.0])  # 6 > log 100: capped
def test_contrastive_loss_matches_closed_form(log_scale):
  rng = np.random.default_rng(0)
  image, text = rng.standard_normal((2, 5, 3)).astype(np.float32)
  image /= np.linalg.norm(image, axis=1, keepdims=True)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  loss, logits = clip_train.contrastive_loss(image, text, np.float32(log_scale))
  expected, expected_logits = _numpy_infonce(image, text, log_scale)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_contrastive_loss_limits():
  # Perfectly aligned orthonormal pairs: the loss -> 0 as the temperature -> 0, and is
  # log B at temperature infinity (all logits equal).
  eye = np.eye(4, dtype=np.float32)
  assert float(clip_train.contrastive_loss(eye, eye, np.float32(np.log(100.0)))[0]) < 1e-6
  np.testing.assert_allclose(float(clip_train.contrastive_loss(eye, eye, np.float32(-50))[0]),
                             np.log(4), rtol=1e-5)


ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "train_clip.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_config_variants_build_and_validate():
  sys.path.insert(0, str(ROOT / "experiments"))
  import train_clip

  from configs import clip_shapes
  for arg in (None, "noisy", "smoke", "noisy_smoke"):
    config = clip_shapes.get_config(arg)
    assert config.is_locked
    settings = train_clip.settings_from_config(config)
    assert settings.noise_aware == (arg is not None and "noisy" in arg)


def test_bad_config_argument_is_one_error_line():
  line = one_error_line(_run("--config=configs/clip_shapes.py:huge", "--workdir=/tmp/x"))
  assert "takes no argument, ':noisy', ':smoke'" in line and "'huge'" in line


@pytest.mark.slow
def test_smoke_run_writes_a_loadable_clip_and_eval(tmp_path):
  r = _run("--config=configs/clip_shapes.py:noisy_smoke", f"--workdir={tmp_path}")
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads((tmp_path / "eval.json").read_text())
  assert result["noise_aware"] and result["train"]["steps"] == 2
  assert 0 <= result["held_out"]["accuracy"] <= 1 and result["num_candidates"] == 48
  clip = clip_lib.load(tmp_path / "clip")
  assert clip.noise_aware and clip.image_mean == (0.5, 0.5, 0.5)


def test_clip_score_and_zero_shot_against_numpy():
  from diffusion_jax.evaluation import clip_score
  tok = clip_lib.train_tokenizer(["a red circle", "a blue square"], 300)
  config = clip_train.small_config(len(tok), resolution=8, width=16, layers=1,
                                   max_length=8, patch_size=4)
  clip = clip_train.init_clip(config, tok, seed=3)
  images = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 3)).astype(np.float32)
  prompts = ["a red circle", "a blue square", "a red square", "a circle", "blue"]
  image_emb = np.asarray(clip.image_embeddings(clip.params, images))
  text_emb = np.asarray(clip.encode_prompts(prompts))
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1, rtol=1e-5)
  cos = np.sum(image_emb.astype(np.float64) * text_emb, axis=1)
  np.testing.assert_allclose(clip_score.clip_score(clip, images, prompts),
                             np.mean(np.maximum(100 * cos, 0)), rtol=1e-5, atol=1e-6)
  # A single pair: its clipped cosine x 100.
  assert clip_score.clip_score(clip, images[:1], prompts[:1]) == pytest.approx(
      max(100 * cos[0], 0), abs=1e-4)
  np.testing.assert_array_equal(clip_score.zero_shot_predictions(clip, images, prompts),
                                np.argmax(image_emb @ text_emb.T, axis=1))
  with pytest.raises(ValueError, match="one prompt per image, got 5 images and 2 prompts"):
    clip_score.clip_score(clip, images, prompts[:2])


# Measured once (2026-12-01, contended CPU, 537 s of training): configs/clip_shapes.py
# (1400 steps, batch 64) chose the right one of the 48 captions for 0.4375 of 480
# validation images and 0.344 of 480 held-out-pair images, the colour always right and
# the shape the part it gets wrong (chance: 1/48 for the caption, 1/6 for the shape).
CACHE = ROOT / ".cache" / "clip_shapes"


@pytest.mark.slow  # trains ~10 minutes unless .cache/clip_shapes holds the trained CLIP
def test_trained_shapes_clip_picks_the_right_caption_above_the_bar():
  sys.path.insert(0, str(ROOT / "experiments"))
  import train_clip

  from configs import clip_shapes
  config = clip_shapes.get_config()
  if not (CACHE / "clip" / "model.safetensors").is_file():
    train_clip.train_and_evaluate(config, str(CACHE))
  clip = clip_lib.load(CACHE / "clip")
  result = clip_train.shapes_zero_shot(clip, config.num_eval, config.resolution)
  assert result["validation"]["colour"] > 0.95 and result["held_out"]["colour"] > 0.95
  # Bars with margin below the measured 0.4375 / 0.344 (a retrained CLIP may differ).
  assert result["validation"]["accuracy"] > 0.3, result
  assert result["held_out"]["accuracy"] > 0.22, result
