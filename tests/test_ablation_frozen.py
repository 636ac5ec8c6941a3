"""Frozen models of a sweep (experiments/ablation_frozen.py): declared, checked before
anything runs, trained once in a subprocess, and substituted for ``"@name"`` override values
in stage configs and sampling settings."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import ablation_frozen  # noqa: E402
import ablation_runner  # noqa: E402
from builders import UserError  # noqa: E402


def _parse(value):
  return ablation_frozen.parse(value, ablation_runner.load_python_config,
                               ablation_runner.apply_override)


@pytest.mark.parametrize("value,message", [
    ({"ae": {"kind": "vae", "config": "configs/autoencoder_shapes.py"}},
     "kind='vae'; choose one of autoencoder, classifier, clip"),
    ({"ae": {"kind": "autoencoder"}}, "'config' must name a config file"),
    ({"ae": {"kind": "autoencoder", "config": "configs/nope.py"}}, "no such config file"),
    ({"clip": {"kind": "clip", "config": "configs/clip_shapes.py:noisy",
               "overrides": {"num_stepz": 3}}}, "axis 'clip.num_stepz': the config has no"),
    ({"clip": {"kind": "clip", "config": "configs/clip_shapes.py", "extra": 1}},
     "give 'kind', 'config' and optional 'overrides'"),
    ({"my-clip": {"kind": "clip", "config": "configs/clip_shapes.py"}}, "an identifier"),
])
def test_bad_frozen_declarations_are_refused_in_one_line(value, message):
  with pytest.raises(UserError) as e:
    _parse(value)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_references_resolve_to_the_frozen_models_directory(tmp_path):
  models = _parse({"ae": {"kind": "autoencoder", "config": "configs/autoencoder_shapes.py",
                          "overrides": {"train.num_steps": 3}}})
  resolve = ablation_frozen.resolver(models, tmp_path)
  assert resolve("@ae") == str(tmp_path / "frozen" / "ae" / "autoencoder")
  assert resolve(["@ae", 1.0]) == [str(tmp_path / "frozen" / "ae" / "autoencoder"), 1.0]
  assert resolve("plain") == "plain" and resolve(3) == 3
  assert ablation_frozen.references(["@ae", "x", ("@b",)]) == {"ae", "b"}
  with pytest.raises(UserError, match=r"sample.clip_checkpoint='@clip' names no frozen model "
                                      r"of this sweep \(declared: @ae\)"):
    resolve("@clip", "sample.clip_checkpoint")
  assert ablation_frozen._flag("train.num_steps", 3) == "--config.train.num_steps=3"


SWEEP = """def get_config():
  return {"name": "frozen", "stages": {"base": "configs/demo_base.py:smoke"},
          "frozen": {"clip": {"kind": "clip", "config": "configs/clip_shapes.py:noisy_smoke",
                              "overrides": {"num_train": 32, "num_eval": 16}}},
          "fixed": {"base.data.resolution": 8,
                    "base.diffusion.schedule_kwargs.shifted_cosine.resolution": 8,
                    "base.diffusion.schedule_kwargs.shifted_cosine.base_resolution": 8,
                    "base.text.encoder": "t5-offline", "base.text.max_length": 32,
                    "base.text.cache_dir": "", "base.train.batch_size": 4,
                    "base.train.num_steps": 1, "base.train.preview_every": 0,
                    "base.data.data_dir": %r, "sample.clip_checkpoint": "@clip"},
          "axes": {"sample.clip_guidance_scale": [0.0, 1.0]}}
"""


class _RecordingEvaluator:
  """Stands in for ShapesEval: records what each arm was evaluated with."""

  def __init__(self):
    self.calls = []

  def check(self, sample_overrides, num_stages, shown):
    del num_stages, shown
    assert not str(sample_overrides.get("clip_checkpoint", "")).startswith("@")

  def evaluate(self, workdirs, outdir, sample_overrides):
    del workdirs, outdir
    self.calls.append(dict(sample_overrides))
    return {"colour_shape": {"value": 0.5, "low": 0.4, "high": 0.6, "n": 4}}


# Stands in for experiments/train_clip.py (which its own tests cover): records its command
# line and exports a model directory, so this test is about the harness, not CLIP training.
FAKE_TRAINER = """import json, pathlib, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = pathlib.Path(args["workdir"])
(workdir / "clip").mkdir(parents=True)
(workdir / "clip" / "config.json").write_text("{}")
(workdir / "eval.json").write_text(json.dumps({"argv": sys.argv[1:]}))
"""


def test_a_frozen_model_is_trained_once_and_given_to_every_arm(tmp_path, monkeypatch):
  trainer = tmp_path / "fake_train_clip.py"
  trainer.write_text(FAKE_TRAINER)
  monkeypatch.setitem(ablation_frozen.KINDS, "clip", (str(trainer), "clip"))
  sweep = tmp_path / "frozen_sweep.py"
  sweep.write_text(SWEEP % str(tmp_path / "data"))
  root = tmp_path / "runs"
  logs, evaluator = [], _RecordingEvaluator()
  records = ablation_runner.run(str(sweep), str(root), evaluator=evaluator, log=logs.append)
  clip_dir = root / "frozen" / "frozen" / "clip" / "clip"
  assert (clip_dir / "config.json").exists()
  assert [r["name"] for r in records] == ["clip_guidance_scale=0", "clip_guidance_scale=1"]
  assert [c["clip_checkpoint"] for c in evaluator.calls] == [str(clip_dir)] * 2
  done = json.loads((root / "frozen" / "frozen" / "clip" / "frozen_complete.json").read_text())
  assert done["overrides"] == [["num_train", 32], ["num_eval", 16]]
  assert done["eval"]["argv"] == ["--config=configs/clip_shapes.py:noisy_smoke",
                                  f"--workdir={clip_dir.parent}", "--config.num_train=32",
                                  "--config.num_eval=16"]
  assert records[0]["frozen"]["clip"]["directory"] == str(clip_dir)
  assert sum(m.startswith("training frozen clip") for m in logs) == 1
  # A rerun trains nothing, the frozen model included.
  logs.clear()
  ablation_runner.run(str(sweep), str(root), evaluator=evaluator, log=logs.append)
  assert not any(m.startswith("training") for m in logs)


def test_a_failing_frozen_trainer_stops_the_sweep_in_one_line(tmp_path, monkeypatch):
  trainer = tmp_path / "failing_trainer.py"
  trainer.write_text("import sys\nprint('error: no data here', file=sys.stderr)\n"
                     "sys.exit(2)\n")
  monkeypatch.setitem(ablation_frozen.KINDS, "clip", (str(trainer), "clip"))
  sweep = tmp_path / "frozen_sweep.py"
  sweep.write_text(SWEEP % str(tmp_path / "data"))
  with pytest.raises(UserError) as e:
    ablation_runner.run(str(sweep), str(tmp_path / "runs"), evaluator=_RecordingEvaluator(),
                        log=lambda m: None)
  assert "frozen model 'clip'" in str(e.value) and "error: no data here" in str(e.value)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "runs" / "frozen" / "train").exists()  # no arm trained
