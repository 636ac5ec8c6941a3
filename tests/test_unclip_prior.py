"""unCLIP's prior side: the prior's text condition against transformers' CLIP text model;
experiments/train_prior.py trains two steps on a tiny CLIP saved here, and the loaded
prior's classifier-free-guided samples are unit-norm embeddings of the CLIP's width,
reproducible per row; bad input is one error line."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import unclip_helpers
from cli_helpers import one_error_line

from diffusion_jax import unclip
from diffusion_jax.diffusion import grids, samplers
from diffusion_jax.training import prior_train

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a small blue square on the left", "a green star", ""]


def _train_prior(*args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "train_prior.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
  return unclip_helpers.save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def prior_workdir(clip_workdir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("prior")
  r = _train_prior("--config=configs/prior_shapes.py:smoke", f"--config.clip_dir={clip_workdir}",
                   f"--config.resolution={unclip_helpers.RESOLUTION}", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def test_text_conditioning_matches_transformers(clip_workdir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  clip, _ = unclip.load_clip(clip_workdir)
  tokens, mask = clip.tokenize(PROMPTS)
  length = 6
  cond = unclip.text_conditioning(clip, clip.params, tokens, mask, length)
  model = transformers.CLIPModel.from_pretrained(clip_workdir / "clip").eval()
  with torch.no_grad():
    out = model.text_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                           attention_mask=torch.tensor(mask, dtype=torch.long))
    text_emb = model.get_text_features(input_ids=torch.tensor(tokens, dtype=torch.long),
                                       attention_mask=torch.tensor(mask, dtype=torch.long))
  text_emb = getattr(text_emb, "pooler_output", text_emb).numpy()
  states = out.last_hidden_state.numpy()[:, :length] * mask[:, :length, None]
  assert cond["text_tokens"].shape == (4, length, 16) and cond["text_mask"].shape == (4, length)
  np.testing.assert_allclose(cond["text_tokens"], states, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(cond["text_mask"], mask[:, :length])
  np.testing.assert_allclose(cond["text_emb"], text_emb / np.linalg.norm(
      text_emb, axis=1, keepdims=True), atol=1e-5, rtol=0)


def test_prior_trains_two_steps_and_samples_unit_embeddings(prior_workdir):
  assert sorted(p.name for p in (prior_workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["1", "2"]
  meta = json.loads((prior_workdir / "prior.json").read_text())
  assert meta["step"] == 2 and meta["config"]["embed_dim"] == 16
  result = json.loads((prior_workdir / "eval.json").read_text())
  assert result["train"]["steps"] == 2 and np.isfinite(result["train"]["final_loss"])
  v = result["validation"]
  assert v["num_images"] == 16 and -1 <= v["cosine_sampled_vs_true"]["mean"] <= 1
  np.testing.assert_allclose(v["sample_norm"], 1.0, rtol=1e-5)
  sampler = prior_train.load_sampler(prior_workdir, num_steps=4, guidance_scale=3.0)
  key = jax.random.key(3)
  emb = np.asarray(sampler(PROMPTS, key))
  assert emb.shape == (4, 16) and np.all(np.isfinite(emb))
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  # Row b draws from image_keys(key)[first_index + b]: prompt 2 alone at index 2 is row 2.
  alone = np.asarray(sampler(PROMPTS[2:3], key, first_index=2))
  np.testing.assert_allclose(alone[0], emb[2], atol=1e-5)
  assert not np.allclose(emb[0], emb[1])
  # DALL-E 2's two candidates: candidate c of row b is the sample from fold_in(key_b, c);
  # the one kept has the larger dot product with the caption's CLIP text embedding.
  best = prior_train.load_sampler(prior_workdir, num_steps=4, guidance_scale=3.0,
                                  num_candidates=2)
  picked = np.asarray(best(PROMPTS, key))
  keys = samplers.image_keys(key, len(PROMPTS))
  cond = sampler.condition(PROMPTS)
  grid = grids.uniform_time(sampler.spec.noise_schedule(), 4)
  candidates = np.stack([np.asarray(unclip.sample_prior(
      sampler.prior, sampler.params, cond, sampler.null,
      jax.vmap(lambda k, c=c: jax.random.fold_in(k, c))(keys), grid, guidance_scale=3.0))
      for c in range(2)])
  choice = np.argmax(np.einsum("cbe,be->cb", candidates, cond["text_emb"]), axis=0)
  np.testing.assert_allclose(picked, candidates[choice, np.arange(len(PROMPTS))], atol=1e-5)


def test_bad_clip_is_one_error_line(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
  line = one_error_line(_train_prior("--config=configs/prior_shapes.py:smoke",
                                     f"--config.clip_dir={tmp_path}", f"--workdir={tmp_path}/w"))
  assert "model_type 't5', not 'clip'" in line and "--config.clip_dir" in line
  line = one_error_line(_train_prior("--config=configs/prior_shapes.py:smoke",
                                     f"--config.clip_dir={tmp_path}/none",
                                     f"--workdir={tmp_path}/w"))
  assert "does not exist" in line
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_rerun_resumes_and_refuses_another_network(prior_workdir, clip_workdir):
  common = ["--config=configs/prior_shapes.py:smoke", f"--config.clip_dir={clip_workdir}",
            f"--config.resolution={unclip_helpers.RESOLUTION}", f"--workdir={prior_workdir}"]
  r = _train_prior(*common, "--config.num_steps=3")
  assert r.returncode == 0 and "at step 2" in r.stdout, r.stderr[-3000:]
  assert json.loads((prior_workdir / "prior.json").read_text())["step"] == 3
  line = one_error_line(_train_prior(*common, "--config.num_steps=4",
                                     "--config.model.hidden_size=64"))
  assert "model.hidden_size: 32 -> 64" in line
