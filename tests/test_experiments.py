"""experiments/train.py end to end (two steps on the shapes dataset, with the pretrained
MiniLM and its embedding cache, or a jointly trained offline T5) and its one-line errors
on bad configs."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from cli_helpers import one_error_line

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _train(tmp_path, *overrides, config="configs/demo_base.py:smoke", workdir=None,
           env=None, cache=True):
  cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"--config={ROOT / config}",
         f"--workdir={workdir or tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'data'}",
         *([f"--config.text.cache_dir={tmp_path / 'data' / 'text_cache'}"] if cache else []),
         *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                        env=None if env is None else {**os.environ, **env})


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
  # Every caption of the (256-example) dataset was encoded before training started.
  cached = re.search(r"Text embedding cache .*: (\d+) captions, (\d+) newly encoded", r.stdout)
  assert cached and cached.group(1) == cached.group(2), r.stdout[-2000:]
  files = list((tmp_path / "data" / "text_cache").rglob("*.npz"))
  assert len(files) >= int(cached.group(1)) > 8
  # A second run on a fresh workdir finds them all.
  r = _train(tmp_path, "--config.train.num_steps=1", workdir=tmp_path / "again")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"{cached.group(1)} captions, 0 newly encoded" in r.stdout


@pytest.mark.parametrize("override,message", [
    ("--config.model.preset=huge", "config.model.preset='huge' is not a U-Net preset"),
    ("--config.data.resolution=30", "config.data.resolution=30 must divide by 4"),
    ("--config.diffusion.schedule=quadratic", "Unknown schedule 'quadratic'"),
    ("--config.diffusion.parameterization=score", "Unknown parameterization 'score'"),
    ("--config.train.batch_size=0", "batch_size must be >= 1"),
    ("--config.text.encoder=/nonexistent/t5", "config.text.encoder='/nonexistent/t5'"),
    ("--config.data.dataset=no_such_dataset", "Unknown dataset 'no_such_dataset'"),
    ("--config.data.dataset=cifar10", "is not prepared in data_dir"),
    ("--config.optimizer.learning_rate=-0.001", "learning_rate must be positive, got -0.001"),
    ("--config.distributed.coordinator_address=127.0.0.1:1",
     "config.distributed: multi-host needs coordinator_address, num_processes and process_id"),
    ("--config.text.trainable=True", "config.text.trainable=True trains the encoder, so its "
     "embeddings cannot be cached"),
    ("--config.train.bogus_field=1", "--config.train.bogus_field=1: the config has no field "
     "'bogus_field'"),
    ("--config.train.batch_szie=8", 'Did you mean "batch_size" instead of "batch_szie"?'),
])
def test_bad_config_is_one_clear_line(tmp_path, override, message):
  (tmp_path / "data").mkdir()
  error = one_error_line(_train(tmp_path, override))
  assert message in error, error
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_unwritable_workdir_is_one_clear_line(tmp_path):
  (tmp_path / "a_file").write_text("")  # root may write anywhere, but not under a file
  error = one_error_line(_train(tmp_path, workdir=tmp_path / "a_file" / "run"))
  assert "a_file/run cannot be created or written to" in error, error
  assert not (tmp_path / "data").exists()  # checked before the dataset is prepared


def test_batch_not_divisible_by_the_devices_is_one_clear_line(tmp_path):
  error = one_error_line(_train(
      tmp_path, "--config.train.batch_size=12",
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
  assert "config.train.batch_size=12 must divide by the mesh's data axis (8 devices)" in error


def test_misspelt_field_in_a_config_file_is_one_clear_line(tmp_path):
  config = tmp_path / "typo.py"
  config.write_text("from configs import common\n\n\ndef get_config():\n"
                    "  c = common.get_config()\n  c.train.num_stpes = 5\n  return c\n")
  error = one_error_line(_train(tmp_path, config=config))
  assert "sets config field 'num_stpes', which configs/common.py does not define" in error
  assert 'Did you mean "num_steps"' in error
  error = one_error_line(_train(tmp_path, config="configs/demo_base.py:smok"))
  assert "takes no argument or ':smoke', got 'smok'" in error


def test_missing_data_dir_for_a_tfds_dataset(tmp_path):
  r = _train(tmp_path, "--config.data.dataset=cifar10",
             f"--config.data.data_dir={tmp_path / 'nowhere'}")
  assert r.returncode == 2
  assert "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_jointly_trained_text_encoder_end_to_end(tmp_path):
  """config.text.trainable through train.py, then sampling reads the trained encoder (the
  fast version of both halves is in test_training.py)."""
  # 4 steps: the U-Net's zero-initialised output layers pass no gradient to the text for
  # the first two.
  r = _train(tmp_path, "--config.text.encoder=t5-offline", "--config.text.trainable=True",
             "--config.text.cache_dir=", "--config.train.preview_every=0",
             "--config.train.num_steps=4", cache=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "trained text-encoder parameters" in r.stdout
  sys.path.insert(0, str(ROOT / "experiments"))
  import jax
  import numpy as np
  import sampling

  from diffusion_jax.text import TextEncoder
  from diffusion_jax.training import loop as loop_lib

  run = str(tmp_path / "run")
  encoder = sampling.sampling_text_encoder([sampling.load_workdir_config(run)], [run])
  initial = TextEncoder.from_pretrained("t5-offline", max_length=encoder.max_length)
  assert "+trained:" in encoder.encoder_id and encoder.encoder_id != initial.encoder_id
  saved, step = loop_lib.restore_text_ema_params(run, initial)
  assert step == 4
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  for a, b in zip(leaves(encoder.params), leaves(saved), strict=True):
    np.testing.assert_array_equal(a, b)
  # Warm-up steps (lr 1e-5 ... 4e-5) move the params a little, but they move.
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(saved), leaves(initial.params),
                                                       strict=True))
  trained, untrained = encoder.encode(["a red circle"])[0], initial.encode(["a red circle"])[0]
  assert np.all(np.isfinite(trained)) and not np.array_equal(trained, untrained)
