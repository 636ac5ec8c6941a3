"""Reliability of training runs (issue 14): one run per workdir, resumes refused on a
config that changes what the weights mean, no checkpoints during a non-finite streak,
unreadable or unwritable checkpoints in one line with the newest intact one offered, the
preemption exit code, a refused data-stream restart, and caption glyphs."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import training_helpers as th
from cli_helpers import PREEMPTED_EXIT_CODE, one_error_line

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import builders  # noqa: E402
import sampling  # noqa: E402

from configs import demo_base  # noqa: E402
from diffusion_jax import images  # noqa: E402
from diffusion_jax.models import unet as unet_lib  # noqa: E402
from diffusion_jax.training import checkpoint as ckpt_lib  # noqa: E402
from diffusion_jax.training import loop as loop_lib  # noqa: E402
from diffusion_jax.training import resume as resume_lib  # noqa: E402
from diffusion_jax.training import workdir_lock  # noqa: E402

# A demo_base stage at 8 px with the offline T5: the same fields through train.py flags.
OVERRIDES = {"data.resolution": 8, "diffusion.schedule_kwargs.shifted_cosine.resolution": 8,
             "diffusion.schedule_kwargs.shifted_cosine.base_resolution": 8,
             "text.encoder": "t5-offline", "text.max_length": 32, "train.batch_size": 4,
             "train.num_steps": 2,
             "train.checkpoint_every": 1, "train.preview_every": 0}


def _config(**changes):
  config = demo_base.get_config("smoke")
  config.text.cache_dir = None
  for name, value in {**OVERRIDES, **changes}.items():
    *parents, leaf = name.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _train(workdir, config, log=lambda s: None):
  """``config``'s run in ``workdir`` on in-memory shapes (no TFDS), as train.py would."""
  d = config.data
  return loop_lib.train(
      workdir, model=unet_lib.UNet(builders.unet_config(config)),
      loop=builders.loop_settings(config), step_settings=builders.step_settings(config),
      optimizer=builders.optimizer_settings(config),
      data_factory=lambda: th.ShapesIterator(config.train.batch_size, d.resolution),
      text_encoder=builders.text_encoder(config), config_json=config.to_dict(),
      resume_rules=builders.resume_rules(), log=log)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with checkpoints at steps 1 and 2 (copy it before changing it)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  _train(workdir, _config())
  return workdir


def _copy(trained, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(trained, target)
  return target


def _train_py(tmp_path, workdir, *flags, env=None):
  command = [sys.executable, str(ROOT / "experiments" / "train.py"),
             f"--config={ROOT / 'configs' / 'demo_base.py'}:smoke", f"--workdir={workdir}",
             f"--config.data.data_dir={tmp_path / 'data'}", "--config.text.cache_dir=",
             *[f"--config.{k}={v}" for k, v in OVERRIDES.items()], *flags]
  return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                        env=env)


# --- 1. one run per workdir ---

def test_a_held_workdir_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
  lock = workdir_lock.WorkdirLock(tmp_path).acquire()
  with pytest.raises(workdir_lock.WorkdirLockedError) as e:
    workdir_lock.WorkdirLock(tmp_path).acquire()
  message = str(e.value)
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in message, message
  assert "in use by another run" in message and "\n" not in message
  lock.release()
  assert not (tmp_path / "lock.json").exists()
  # A holder on this host that died (its heartbeat still fresh): taken over.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  record = dict(token="x", hostname=socket.gethostname(), pid=dead.pid, process_start=None,
                started=time.time(), heartbeat=time.time(), lease_s=300)
  (tmp_path / "lock.json").write_text(json.dumps(record))
  logged = []
  lock = workdir_lock.WorkdirLock(tmp_path, log=logged.append).acquire()
  assert f"(its holder (pid {dead.pid} on this host) is gone" in logged[0], logged
  assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
  lock.release()
  # This pid, but a process that started at another time (a recycled pid): stale.
  own = dict(record, pid=os.getpid(), process_start=-1)
  assert "is gone" in workdir_lock.stale_reason(own)
  assert workdir_lock.stale_reason(dict(own, process_start=None)) is None
  # Another host (or gs://): only the lease tells.
  remote = dict(record, hostname="elsewhere", pid=1)
  assert workdir_lock.stale_reason(remote) is None
  assert "heartbeat is 400 s old" in workdir_lock.stale_reason(
      dict(remote, heartbeat=time.time() - 400))


def test_the_heartbeat_refreshes_and_the_remote_path_confirms_its_token(tmp_path,
                                                                        monkeypatch):
  lock = workdir_lock.WorkdirLock(tmp_path, lease_s=0.2).acquire()
  first = json.loads((tmp_path / "lock.json").read_text())["heartbeat"]
  time.sleep(0.4)
  assert json.loads((tmp_path / "lock.json").read_text())["heartbeat"] > first
  lock.release()
  # The gs:// way (epath writes, then reads back): another launcher's write won the race.
  lock = workdir_lock.WorkdirLock(tmp_path, confirm_delay_s=0)
  real_write = workdir_lock._write

  def racing_write(path, record):
    real_write(path, record)
    real_write(path, dict(record, token="the other launcher"))

  monkeypatch.setattr(workdir_lock, "_write", racing_write)
  with pytest.raises(workdir_lock.WorkdirLockedError):
    lock._acquire_remote()
  monkeypatch.setattr(workdir_lock, "_write", real_write)
  (tmp_path / "lock.json").unlink()
  lock._acquire_remote()
  assert json.loads((tmp_path / "lock.json").read_text())["token"] == lock.token


def test_train_py_on_a_workdir_another_run_holds_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir_lock.WorkdirLock(workdir).acquire()  # this test plays the first run
  try:
    error = one_error_line(_train_py(tmp_path, workdir))
  finally:
    lock.release()
  assert f"workdir {workdir} is in use by another run (pid {os.getpid()}" in error, error
  assert not (workdir / "checkpoints").exists() and not (tmp_path / "data").exists()


# --- 2. resuming with a changed config ---

def test_config_changes_name_what_changes_the_weights():
  rules = resume_lib.ResumeRules(
      may_change=("train.num_steps", "mesh.*"), compared_whole=("d.kwargs",),
      defaults={"d": {"p": "v", "new": 0.0, "kwargs": {}}, "train": {}, "mesh": {}})
  stored = {"d": {"p": "v", "kwargs": {"a": 1}, "gone": 3}, "train": {"num_steps": 5},
            "mesh": {"data": 2}}
  same = {"d": {"p": "v", "new": 0.0, "kwargs": {"a": 1}}, "train": {"num_steps": 9},
          "mesh": {"data": 8}}
  assert resume_lib.config_changes(stored, same, rules) == []  # new field at its default
  changed = {"d": {"p": "eps", "new": 1.0, "kwargs": {}}, "train": {"num_steps": 5},
             "mesh": {"data": 2}}
  assert resume_lib.config_changes(stored, changed, rules) == [
      "d.kwargs: {'a': 1} -> {}", "d.new: (not set) -> 1.0", "d.p: 'v' -> 'eps'"]


def test_every_field_that_may_change_on_resume_exists():
  import fnmatch

  from configs import common

  fields = resume_lib._flatten(common.get_config().to_dict(), common.COMPARED_WHOLE_ON_RESUME)
  for pattern in common.MAY_CHANGE_ON_RESUME:  # (COMPARED_WHOLE may name fields to come)
    assert any(fnmatch.fnmatchcase(f, pattern) for f in fields), pattern


def test_changed_parameterization_is_refused_with_config_json_untouched(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  before = (workdir / "config.json").read_bytes()
  assert json.loads(before)["diffusion"]["parameterization"] == "v"
  error = one_error_line(_train_py(tmp_path, workdir,
                                   "--config.diffusion.parameterization=eps",
                                   "--config.train.num_steps=3"))
  assert f"cannot resume checkpoint {workdir}/checkpoints/2" in error, error
  assert "diffusion.parameterization: 'v' -> 'eps'" in error, error
  assert "train.num_steps" not in error  # may change on resume
  assert (workdir / "config.json").read_bytes() == before
  assert not (tmp_path / "data").exists()  # refused before the data was prepared
  # The loop's own check (against the checkpoint it restores) refuses too, as early.
  with pytest.raises(resume_lib.IncompatibleResumeError, match="parameterization"):
    _train(workdir, _config(**{"diffusion.parameterization": "eps"}))
  assert (workdir / "config.json").read_bytes() == before


def test_sampling_reads_the_config_stored_with_the_loaded_step(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  (workdir / "config.json").write_text(json.dumps({"model": {"preset": "rewritten"}}))
  stored = json.loads((workdir / "checkpoints" / "1" / "config" / "metadata").read_text())
  stored["train"]["seed"] = 123  # tell step 1's config from step 2's
  (workdir / "checkpoints" / "1" / "config" / "metadata").write_text(json.dumps(stored))
  assert sampling.load_workdir_config(str(workdir)).model.preset == "demo_base"
  assert sampling.load_workdir_config(str(workdir), 1).train.seed == 123
  assert sampling.load_workdir_config(str(workdir), 2).train.seed == 0


# --- 3. the non-finite guard ---

def test_a_nonfinite_streak_writes_no_checkpoint_and_the_named_one_resumes(tmp_path):
  # Batches 2-4 (steps 3-5) are NaN; checkpoints every step, only one kept.
  with pytest.raises(loop_lib.NonFiniteError) as e:
    th.run(tmp_path, 8, nan_batches={2, 3, 4}, max_nonfinite_in_a_row=3, log_every=100,
           checkpoint_every=1, keep_checkpoints=1)
  assert "The last checkpoint written before the streak is step 2" in str(e.value)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2]
  logged = []
  state, _ = th.run(tmp_path, 4, checkpoint_every=1, log=logged.append)
  assert any("Resumed" in line and "at step 2" in line for line in logged), logged
  assert int(state.step) == 4 and int(state.nonfinite_total) == 0


# --- 4. unreadable checkpoints ---

def _largest_data_file(workdir, step):
  files = (workdir / "checkpoints" / str(step) / "state").rglob("d/*")
  return max((f for f in files if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
  """The tiny U-Net's workdir with checkpoints at steps 1 and 2 (copy it to change it)."""
  workdir = tmp_path_factory.mktemp("tiny") / "run"
  th.run(workdir, 2, checkpoint_every=1)
  return workdir


def test_a_truncated_data_file_is_one_line_offering_the_intact_checkpoint(tiny_trained,
                                                                          tmp_path):
  workdir = _copy(tiny_trained, tmp_path)
  with open(_largest_data_file(workdir, 2), "r+b") as f:
    f.truncate(1000)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    th.run(workdir, 3)
  message = str(e.value)
  assert "\n" not in message and f"{workdir}/checkpoints/2 is unreadable" in message
  assert "a data file under" in message and "is truncated or corrupt" in message
  assert "The newest intact checkpoint is step 1" in message
  assert "--config.train.recover_from_intact=True" in message
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  logged = []
  th.run(workdir, 3, checkpoint_every=1, recover_from_intact=True, log=logged.append)
  assert any("Resuming from the newest intact checkpoint, step 1" in s for s in logged)
  assert (workdir / "unreadable_checkpoints" / "2" / "state").is_dir()  # kept, aside
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_a_garbage_metadata_file_is_one_line_in_training_and_sampling(tiny_trained, trained,
                                                                      tmp_path):
  for source in (tiny_trained, trained):  # train on the tiny one, sample the demo stage
    workdir = _copy(source, tmp_path / source.parent.name)
    metadata = workdir / "checkpoints" / "2" / "state" / "_METADATA"
    metadata.write_bytes(np.random.default_rng(0).bytes(2000))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    th.run(tmp_path / tiny_trained.parent.name / "run", 3)
  message = str(e.value)
  assert "\n" not in message and "_METADATA is not valid JSON" in message, message
  assert "The newest intact checkpoint is step 1" in message
  r = subprocess.run([sys.executable, str(ROOT / "experiments" / "sample.py"),
                      f"--workdirs={workdir}", "--prompts=a red circle", "--steps=2",
                      f"--outdir={tmp_path / 'out'}"], capture_output=True, text=True,
                     timeout=600, cwd=tmp_path)
  error = one_error_line(r)
  assert "_METADATA is not valid JSON" in error and "different config" not in error, error
  assert "--checkpoint_steps" in error and "Event loop is closed" not in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]


# --- a full disk ---

@pytest.fixture
def small_disk(tmp_path):
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  mount = tmp_path / "disk"
  mount.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                     capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


def test_a_save_into_a_full_disk_is_one_line_and_the_workdir_resumes(small_disk):
  workdir, filler = small_disk / "run", small_disk / "filler"

  def fill_the_disk(step):
    if step == 1:  # after checkpoint 1: leave 64 KiB, far less than a checkpoint
      free = shutil.disk_usage(small_disk).free
      with open(filler, "wb") as f:
        f.write(b"\0" * (free - 64 * 1024))

  with pytest.raises(ckpt_lib.CheckpointError) as e:
    th.run(workdir, 3, checkpoint_every=1, on_step_end=fill_the_disk)
  message = str(e.value)
  assert "\n" not in message and "Could not write checkpoint step 2" in message, message
  assert "No space left on device" in message, message
  assert "the previous checkpoint (step 1) is intact" in message, message
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
  assert not (workdir / "lock.json").exists()
  filler.unlink()
  logged = []
  state, _ = th.run(workdir, 3, checkpoint_every=1, log=logged.append)
  assert any("at step 1" in line for line in logged) and int(state.step) == 3


# --- 5. the preemption exit code ---

def test_train_py_exits_with_the_preemption_code_after_a_sigterm_stop(tmp_path):
  # train.py's main() as it is, with the run replaced by one that was preempted (the
  # loop raising Preempted on SIGTERM is tested in test_training.py).
  script = (
      "import runpy, sys\n"
      f"sys.path[:0] = [{str(ROOT / 'experiments')!r}, {str(ROOT)!r}]\n"
      "import builders\n"
      "from diffusion_jax.training import loop\n"
      "def preempted(config, workdir):\n"
      "  raise loop.Preempted('SIGTERM at step 7: the newest checkpoint is step 7', 7)\n"
      "builders.run_training = preempted\n"
      f"sys.argv = ['train.py', '--config={ROOT / 'configs' / 'demo_base.py'}:smoke', "
      f"'--workdir={tmp_path / 'run'}']\n"
      f"runpy.run_path({str(ROOT / 'experiments' / 'train.py')!r}, run_name='__main__')\n")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == PREEMPTED_EXIT_CODE, (r.returncode, r.stderr[-3000:])
  assert "preempted: SIGTERM at step 7" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_train_py_sigterm_end_to_end_exits_3(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, str(ROOT / "experiments" / "train.py"),
             f"--config={ROOT / 'configs' / 'demo_base.py'}:smoke", f"--workdir={workdir}",
             f"--config.data.data_dir={tmp_path / 'data'}", "--config.text.cache_dir=",
             *[f"--config.{k}={v}" for k, v in OVERRIDES.items() if k != "train.num_steps"],
             "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000"]
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=tmp_path)
  for line in proc.stdout:
    if line.startswith("step 2/"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == PREEMPTED_EXIT_CODE, (proc.returncode, err[-3000:])
  assert "preempted: SIGTERM at step" in err and "Traceback" not in err
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir()]
  assert len(saved) == 1 and saved[0] >= 2
  assert not (workdir / "lock.json").exists()


# --- issue 13: a changed process count does not silently restart the data stream ---

def test_a_data_stream_that_cannot_continue_is_refused_unless_allowed(tmp_path):
  th.run(tmp_path, 1, checkpoint_every=1)
  data = tmp_path / "checkpoints" / "1" / "data" / "metadata"
  saved = json.loads(data.read_text())
  saved["process_count"] = 2  # as if two processes had written it
  saved["by_process"]["1"] = {"index": 9, "process_index": 1}
  data.write_text(json.dumps(saved))
  with pytest.raises(loop_lib.DataRestartError) as e:
    th.run(tmp_path, 2)
  message = str(e.value)
  assert "\n" not in message and "written by 2 process(es), this run has 1" in message
  assert "--config.train.allow_data_restart=True" in message
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
  logged = []
  state, _ = th.run(tmp_path, 2, allow_data_restart=True, log=logged.append)
  assert int(state.step) == 2 and any("starts afresh" in line for line in logged)


# --- 6. captions in any script ---

def test_non_ascii_captions_draw_their_own_glyphs_or_say_they_cannot():
  tile = np.zeros((1, 16, 16, 3), np.uint8)
  greek, cyrillic = (images.make_grid(tile, [c], scale=4)[66:] for c in ("ΩΨΦ", "ЖЩЯ"))  # noqa: RUF001
  assert greek.min() < 128 and not np.array_equal(greek, cyrillic)  # not one box for all
  _, covered = images.caption_font()
  assert covered is not None and ord("Ω") in covered
  assert images.drawable_caption("a 猫 cat", covered) == "a ? cat" + images.MISSING_GLYPH_NOTE
  assert images.drawable_caption("un café", covered) == "un café"
