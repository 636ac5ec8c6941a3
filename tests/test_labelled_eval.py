"""Scoring stages trained on a labelled real-data set by its classifier judge
(experiments/evaluating_labelled.py): the scoring arithmetic on a stand-in judge, then one
end to end run: Fashion-MNIST's smoke config trained with in-training judge scores, scored
by experiments/evaluate.py, and its bad input."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import one_error_line
from test_real_data import _smoke, write_sources

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import evaluating_labelled as el  # noqa: E402


class _Judge:
  """Reads the class from the image's first pixel: image value k -> class k."""
  captions = ("a cat", "a dog", "a fox")
  resolution = 4

  def class_of(self, prompt):
    return self.captions.index(prompt)

  def predict(self, images):
    return np.asarray(images)[:, 0, 0, 0].astype(int)


def test_sample_prompts_is_replica_major_and_pads_every_call():
  calls = []

  def sample_fn(texts, first):
    calls.append((list(texts), first))
    return np.stack([np.full((2, 2, 3), first + i, np.uint8) for i in range(len(texts))])

  images = el.sample_prompts(sample_fn, ["a", "b", "c"], 2, batch_size=4)
  assert [c[1] for c in calls] == [0, 4]
  assert calls[1][0] == ["b", "c", "c", "c"]  # padded with the last prompt
  np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(6))


def test_score_counts_against_the_prompts_class_with_wilson_intervals():
  judge = _Judge()
  prompts = [("a cat", False), ("a dog", False), ("a fox", False)]
  # replica 0 reads cat, dog, cat; replica 1 reads cat, dog, fox
  images = np.array([0, 1, 0, 0, 1, 2], np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1),
                                                                                 np.uint8)
  records, summary = el.score(judge, prompts, images, "class")
  entry = summary["categories"]["class"]
  assert entry["all"]["correct"] == 5 and entry["all"]["n"] == 6
  assert summary["overall"] == pytest.approx(5 / 6)
  assert entry["per_prompt"]["a fox"]["correct"] == 1 and entry["per_prompt"]["a fox"]["n"] == 2
  low, high = entry["all"]["ci95"]
  assert 0.43 < low < 5 / 6 < high < 0.98  # Wilson 95% of 5/6: [0.436, 0.970]
  assert "held_out" not in entry  # no prompt is held out
  assert records[2] == {"prompt": "a fox", "held_out": False, "replica": 0, "wanted": "a fox",
                        "read": "a cat", "correct": False}
  held = [("a cat", False), ("a dog", True), ("a fox", True)]
  _, summary = el.score(judge, held, images, "emoji_group")
  entry = summary["categories"]["emoji_group"]
  assert (entry["seen"]["correct"], entry["seen"]["n"]) == (2, 2)
  assert (entry["held_out"]["correct"], entry["held_out"]["n"]) == (3, 4)


def test_every_kth_keeps_a_fixed_spread():
  assert el._every_kth(list("abcdefghij"), 4) == list("adgj")
  assert el._every_kth(list("abc"), 5) == list("abc")
  assert el._every_kth(list("abc"), None) == list("abc")


# ----------------------------------------------------------------------------------------------
# End to end on the test's own small Fashion-MNIST files.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A fashion_mnist:smoke run (2 steps) with the judge scoring it at step 2."""
  import builders

  tmp = tmp_path_factory.mktemp("labelled_eval")
  sources = write_sources(tmp / "sources", num_fashion_train=60, num_fashion_test=20)
  config = _smoke("fashion_mnist", "smoke", tmp, sources)
  config.eval.every, config.eval.images_per_prompt, config.eval.num_steps = 2, 1, 2
  with pytest.MonkeyPatch.context() as m:
    m.setenv("DIFFUSION_JAX_JUDGE_DIR", str(tmp / "judges"))
    m.setattr(el, "JUDGE_STEPS", 20)
    builders.run_training(config, str(tmp / "run"))
  return tmp


def test_training_scores_a_labelled_stage_with_its_judge(trained):
  # The smoke config trains its two steps, checkpoints and previews.
  assert (trained / "run" / "checkpoints" / "2").is_dir()
  assert (trained / "run" / "previews" / "step_2.png").stat().st_size > 0
  lines = [json.loads(s) for s in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
  scores = [r for r in lines if "eval/class/all" in r]
  assert [r["step"] for r in scores] == [2]
  assert 0.0 <= scores[0]["eval/class/all"] <= 1.0
  assert not any(k.startswith("eval/colour_shape") for r in lines for k in r)
  assert len(list((trained / "judges").iterdir())) == 1  # trained once, cached


def _evaluate(trained, *flags):
  return subprocess.run(
      [sys.executable, "experiments/evaluate.py", f"--workdirs={trained / 'run'}",
       "--steps=2", "--images_per_prompt=1", "--batch_size=10", "--judge_steps=20",
       f"--judge_dir={trained / 'judges'}", *flags],
      capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_evaluate_scores_by_class_with_fd_in_the_judges_features(trained):
  out = trained / "eval"
  r = _evaluate(trained, "--fd_images=5", f"--outdir={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads((out / "eval.json").read_text())
  entry = result["summary"]["categories"]["class"]
  assert entry["all"]["n"] == 10 and set(entry["per_prompt"]) == set(result["judge"]["classes"])
  assert len(result["records"]) == 10
  fd = result["fd_judge"]
  assert fd["num_images"] == 5 and fd["generated_vs_real"] >= 0 and fd["real_vs_real_floor"] >= 0
  assert 0.0 <= result["judge"]["accuracy_on_real_test"] <= 1.0
  assert "FD in the judge's features" in (out / "eval.md").read_text()
  assert (out / "examples.png").stat().st_size > 0
  import evaluation_adapter

  metrics = evaluation_adapter.metrics_of(result)  # the ablation harness reads it too
  assert metrics["class"]["value"] == entry["all"]["accuracy"]
  assert metrics["fd_judge"]["value"] == fd["generated_vs_real"]


@pytest.mark.parametrize("flags,message", [
    (["--categories=counting"], "--categories is a ShapesEval setting"),
    (["--fd_images=11"], "test split has 20 images, the FD needs 2 x 11"),
    (["--max_prompts=0"], "--max_prompts=0; it must be >= 1"),
])
def test_evaluate_bad_input_is_one_line(trained, flags, message, tmp_path):
  r = _evaluate(trained, f"--outdir={tmp_path / 'out'}", *flags)
  assert message in one_error_line(r)
  assert not (tmp_path / "out").exists()
