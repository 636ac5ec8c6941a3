"""experiments/train.py end to end (two steps on the shapes dataset, with the offline T5
and its embedding cache) and its one-line errors on bad configs."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _train(tmp_path, *overrides, config="configs/demo_base.py:smoke"):
  cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"--config={ROOT / config}",
         f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'data'}",
         f"--config.text.cache_dir={tmp_path / 'data' / 'text_cache'}", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)


def test_train_two_steps_end_to_end(tmp_path):
  r = _train(tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  run = tmp_path / "run"
  config = json.loads((run / "config.json").read_text())
  assert config["model"]["preset"] == "demo_base"
  steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2]
  assert (run / "checkpoints" / "2").is_dir()
  assert (run / "previews" / "step_2.png").stat().st_size > 0
  assert any((tmp_path / "data" / "text_cache").rglob("*.npz"))


@pytest.mark.parametrize("override,message", [
    ("--config.model.preset=huge", "config.model.preset='huge' is not a U-Net preset"),
    ("--config.data.resolution=30", "config.data.resolution=30 must divide by 4"),
    ("--config.diffusion.schedule=quadratic", "Unknown schedule 'quadratic'"),
    ("--config.diffusion.parameterization=score", "Unknown parameterization 'score'"),
    ("--config.train.batch_size=0", "batch_size must be >= 1"),
    ("--config.text.encoder=/nonexistent/t5", "config.text.encoder='/nonexistent/t5'"),
    ("--config.data.dataset=no_such_dataset", "Unknown dataset 'no_such_dataset'"),
    ("--config.data.dataset=cifar10", "is not prepared in data_dir"),
])
def test_bad_config_is_one_clear_line(tmp_path, override, message):
  (tmp_path / "data").mkdir()
  r = _train(tmp_path, override)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_dir_for_a_tfds_dataset(tmp_path):
  r = _train(tmp_path, "--config.data.dataset=cifar10",
             f"--config.data.data_dir={tmp_path / 'nowhere'}")
  assert r.returncode == 2
  assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_unknown_config_field_is_rejected(tmp_path):
  r = _train(tmp_path, "--config.train.bogus_field=1")
  assert r.returncode != 0
  assert "bogus_field" in r.stderr
