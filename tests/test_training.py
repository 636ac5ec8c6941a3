"""Training: loss goes down, exact resume after SIGKILL, SIGTERM checkpoints, the
non-finite guard, gradient accumulation, sharded == unsharded, metrics bookkeeping,
multi-process agreement and data states, and a text encoder trained with the U-Net."""

import importlib.util
import json
import math
import pathlib
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import local_cluster
import numpy as np
import pytest
import training_helpers as th

from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training import metrics as metrics_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib

WORKER = pathlib.Path(__file__).parent / "train_worker.py"


def _worker(*args, timeout=600, **kwargs):
  return subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True,
                        text=True, timeout=timeout, **kwargs)


def _records(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir)}


def test_loss_goes_down_and_outputs_are_written(tmp_path):
  # A str workdir: the loop takes local paths and gs:// URLs alike (etils.epath).
  state, summary = th.run(str(tmp_path), 40, log_every=10, checkpoint_every=20)
  losses = _losses(tmp_path)
  assert losses[40] < 0.7 * losses[10], losses
  assert int(state.step) == 40 and summary["skipped_total"] == 0
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [20, 40]
  assert list((tmp_path / "tensorboard").iterdir())
  assert {"loss_t0", "loss_t3", "grad_norm", "learning_rate", "images_per_s"} <= set(
      json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]))
  # The data-iterator state is saved per process, keyed by process index.
  saved = json.loads((tmp_path / "checkpoints" / "40" / "data" / "metadata").read_text())
  assert saved == {"process_count": 1,
                   "by_process": {"0": {"index": 40 * 8, "process_index": 0}}}
  assert ckpt_lib.data_state_of_process(saved, 0, 1) == (saved["by_process"]["0"], None)
  own, why = ckpt_lib.data_state_of_process(saved, 0, 2)
  assert own is None and "written by 1 process(es), this run has 2" in why
  assert state.text_params is None and state.text_ema_params is None  # frozen text


def test_super_resolution_stage_trains(tmp_path):
  state, summary = th.run(tmp_path, 3, super_resolution=True)
  assert int(state.step) == 3 and np.isfinite(summary["loss"])


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  r = _worker(straight, 8, "--dump", tmp_path / "straight.npz")
  assert r.returncode == 0, r.stderr[-3000:]
  # Checkpoint at 4, killed with SIGKILL after step 6 (steps 5-6 are lost), resumed to 8.
  r = _worker(resumed, 8, "--checkpoint-every", 4, "--kill-at", 6)
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  assert "STEP 6" in r.stdout and "STEP 7" not in r.stdout
  assert (resumed / "lock.json").exists()  # the killed run could not remove its lock
  r = _worker(resumed, 8, "--checkpoint-every", 4, "--dump", tmp_path / "resumed.npz")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "STEP 5" in r.stdout and "STEP 4" not in r.stdout  # resumed at step 4
  assert "Taking over the stale lock" in r.stdout and "is gone" in r.stdout, r.stdout
  assert not (resumed / "lock.json").exists()
  # Steps 5-6 of the killed run were logged, then dropped on resume: each step once.
  assert [r["step"] for r in _records(resumed)] == list(range(1, 9))
  assert _losses(resumed) == _losses(straight)
  a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(a.files) == sorted(b.files) and any("ema" in k for k in a.files)
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_sigterm_writes_checkpoint_of_current_step(tmp_path):
  proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "100000", "--slow"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  last = None
  deadline = time.time() + 300
  for line in proc.stdout:
    if line.startswith("STEP"):
      last = int(line.split()[1])
      if last >= 3:
        proc.send_signal(signal.SIGTERM)
        break
    assert time.time() < deadline
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps = [int(line.split()[1]) for line in out.splitlines() if line.startswith("STEP")]
  final = steps[-1] if steps else last
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert saved == [final], (saved, final)
  assert f"DONE {final}" in out
  assert "PREEMPTED" in out  # the loop raised loop.Preempted, not returned as if done


def test_nonfinite_steps_are_skipped_then_abort(tmp_path):
  with pytest.raises(loop_lib.NonFiniteError, match="3 steps in a row"):
    th.run(tmp_path, 10, nan_images=True, max_nonfinite_in_a_row=3, log_every=100)


def test_one_poisoned_batch_is_skipped_counted_and_left_out_of_the_averages(tmp_path):
  # Batch 1 (step 2) is all NaN; the run goes on to the end.
  state, summary = th.run(tmp_path, 6, nan_batches={1}, log_every=3)
  records = {r["step"]: r for r in _records(tmp_path)}
  assert sorted(records) == [3, 6] and int(state.step) == 6
  assert int(state.nonfinite_total) == 1 and summary["skipped_total"] == 1
  assert records[3]["skipped"] == pytest.approx(1 / 3) and records[6]["skipped"] == 0
  # The skipped step's NaN loss and gradient norm are not in step 3's interval means.
  # Every record has a loss and a gradient norm; a timestep bucket only if it was drawn.
  for name in ("loss", "grad_norm"):
    assert all(math.isfinite(records[s][name]) for s in (3, 6)), (name, records)
  # The t-buckets each record must have: those drawn by its applied steps (the skipped
  # step 1's draws are not in them), t drawn from the keys as train_step derives them.
  def drawn_buckets(steps):
    buckets = set()
    for s in steps:
      k_t = jax.random.split(jax.random.fold_in(jax.random.fold_in(state.key, s), 0), 6)[0]
      buckets |= {min(int(t * 4), 3) for t in np.asarray(jax.random.uniform(k_t, (8,)))}
    return {f"loss_t{k}" for k in buckets}

  for record, steps in ((records[3], (0, 2)), (records[6], (3, 4, 5))):
    present = {name for name in record if name.startswith("loss_t")}
    assert present == drawn_buckets(steps) and present, (present, record)
    assert all(math.isfinite(record[name]) for name in present), record
  for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state)):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_a_nonfinite_run_that_ends_between_checks_still_aborts(tmp_path):
  # Checks fall on steps 3 and 6 (every max_nonfinite_in_a_row steps); the run of three
  # skipped steps 2-4 is over by step 6, where only the sticky longest run shows it.
  with pytest.raises(loop_lib.NonFiniteError, match=r"3 steps in a row .*by step 6"):
    th.run(tmp_path, 8, nan_batches={1, 2, 3}, max_nonfinite_in_a_row=3, log_every=100)
  assert not (tmp_path / "checkpoints").exists() or not any(
      (tmp_path / "checkpoints").iterdir())


def test_nonfinite_step_leaves_state_unchanged():
  model = th.tiny_unet()
  opt = state_lib.OptimizerSettings(learning_rate=1e-3, warmup_steps=10)
  tx = state_lib.make_optimizer(opt)
  inputs = loop_lib.init_inputs(model.config, 16, None, th.TEXT_LEN, th.TEXT_DIM)
  params = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
  # As if steps 0-4 had run, the last two skipped: 3 updates were applied.
  state = state_lib.create_train_state(params, tx, jax.random.key(1)).replace(
      step=np.int32(5), nonfinite_in_a_row=np.int32(2), nonfinite_total=np.int32(2),
      nonfinite_longest=np.int32(2))
  null = loop_lib.encode_null(th.HashText())
  batch = loop_lib._model_batch(next(th.ShapesIterator(4, nan_images=True)), th.HashText())
  settings = step_lib.StepSettings(step_lib.DiffusionSettings())
  schedule = state_lib.learning_rate_schedule(opt)
  new_state, metrics = jax.jit(lambda s, b: step_lib.train_step(
      s, b, null, model=model, tx=tx, settings=settings, learning_rate_fn=schedule))(
          state, batch)
  assert int(new_state.step) == 6 and int(new_state.nonfinite_total) == 3
  assert int(new_state.nonfinite_in_a_row) == 3 and int(new_state.nonfinite_longest) == 3
  assert float(metrics["skipped"]) == 1.0
  # The logged rate is the one of the 4th applied update, not of step 6.
  assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(3)))
  assert float(schedule(3)) != pytest.approx(float(schedule(5)))
  for a, b in zip(jax.tree.leaves((state.params, state.ema_params, state.opt_state)),
                  jax.tree.leaves((new_state.params, new_state.ema_params,
                                   new_state.opt_state)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_metric_averages_leave_out_skipped_steps():
  accumulator = metrics_lib.MetricAccumulator()
  for loss, skipped in ((1.0, 0.0), (math.nan, 1.0), (3.0, 0.0)):
    accumulator.add({"loss": np.float32(loss), "skipped": np.float32(skipped),
                     "bucket_loss_sum": np.array([loss, 0.0]),
                     "bucket_count": np.array([1.0, 0.0])})
  summary = accumulator.summarise()
  assert summary["loss"] == 2.0 and summary["loss_t0"] == 2.0
  assert summary["skipped"] == pytest.approx(1 / 3) and "loss_t1" not in summary
  accumulator.add({"loss": np.float32(math.nan), "skipped": np.float32(1.0)})
  summary = accumulator.summarise()  # every step skipped: no loss to report
  assert math.isnan(summary["loss"]) and summary["skipped"] == 1.0


def test_metrics_of_steps_after_the_resumed_one_are_dropped(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path, enabled=True)
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # cut short by a crash
  writer = metrics_lib.MetricWriter(tmp_path, enabled=True, start_step=3)
  writer.write(4, {"loss": 40.0})
  writer.close()
  assert [(r["step"], r["loss"]) for r in _records(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_unwritable_and_remote_workdirs(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match=r"workdir .*file/run cannot be created") as error:
    loop_lib.check_workdir(tmp_path / "file" / "run")
  assert "\n" not in str(error.value)
  # gs:// stays a URL (pathlib would make it 'gs:/bucket'); without gcsfs the check fails
  # with one line naming the URL instead of deep inside a save, and creates no local
  # 'gs:' directory.
  monkeypatch.chdir(tmp_path)
  if importlib.util.find_spec("gcsfs") is None:
    url = "gs://no-such-bucket-diffusion-jax/run"
    with pytest.raises(ValueError, match=re.escape(url)) as error:
      loop_lib.check_workdir(url)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "gs:").exists()
  assert str(ckpt_lib.epath.Path("gs://bucket/run") / "checkpoints") == (
      "gs://bucket/run/checkpoints")


def test_processes_agree_to_stop_when_any_one_wants_to(monkeypatch):
  assert loop_lib._agree_to_stop(False, True) == (False, True)  # one process: its own
  from jax.experimental import multihost_utils

  others = np.asarray([[1, 0]], np.int32)  # another process ran out of time
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda flags: np.concatenate([np.asarray(flags)[None], others]))
  assert loop_lib._agree_to_stop(False, False) == (True, False)
  assert loop_lib._agree_to_stop(False, True) == (True, True)
  others[:] = 0
  assert loop_lib._agree_to_stop(False, False) == (False, False)


def test_gradient_accumulation_averages_micro_batch_gradients():
  model = th.tiny_unet()
  opt = state_lib.OptimizerSettings(learning_rate=1e-3, warmup_steps=1, clip_grad_norm=None)
  tx = state_lib.make_optimizer(opt)
  inputs = loop_lib.init_inputs(model.config, 16, None, th.TEXT_LEN, th.TEXT_DIM)
  params = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
  state = state_lib.create_train_state(params, tx, jax.random.key(1))
  null = loop_lib.encode_null(th.HashText())
  batch = loop_lib._model_batch(next(th.ShapesIterator(8)), th.HashText())
  settings = step_lib.StepSettings(step_lib.DiffusionSettings(), grad_accum_steps=2)
  new_state, _ = jax.jit(lambda s, b: step_lib.train_step(
      s, b, null, model=model, tx=tx, settings=settings))(state, batch)
  # By hand: the gradient of each half with its own key, averaged, then one update.
  key = jax.random.fold_in(state.key, 0)
  grad = jax.jit(jax.grad(lambda p, b, k: step_lib._loss_fn(p, model, b, null, k,
                                                            settings.diffusion)[0]))
  halves = [jax.tree.map(lambda x, i=i: x[4 * i:4 * (i + 1)], batch) for i in range(2)]
  grads = [grad(params, h, jax.random.fold_in(key, i)) for i, h in enumerate(halves)]
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  updates, _ = tx.update(mean, state.opt_state, params)
  expected = jax.tree.map(lambda p, u: p + u, params, updates)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected),
                  strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_sharded_training_matches_single_device_and_restores_unsharded(tmp_path):
  one, eight = tmp_path / "one", tmp_path / "eight"
  r = _worker(eight, 3, "--devices", 8, "--checkpoint-every", 3, "--dump",
              tmp_path / "eight.npz")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _worker(one, 3)
  assert r.returncode == 0, r.stderr[-3000:]
  l1, l8 = _losses(one), _losses(eight)
  assert sorted(l1) == [1, 2, 3]
  for step in l1:
    assert abs(l1[step] - l8[step]) < 1e-5, (step, l1[step], l8[step])
  # Tensor parallel too: (data=4, model=2).
  r = _worker(tmp_path / "dm", 3, "--devices", 8, "--data", 4, "--model", 2)
  assert r.returncode == 0, r.stderr[-3000:]
  ldm = _losses(tmp_path / "dm")
  for step in l1:
    assert abs(l1[step] - ldm[step]) < 1e-5, (step, l1[step], ldm[step])
  # The 8-device checkpoint restores in a 1-device process (and continues from it).
  r = _worker(eight, 3, "--dump", tmp_path / "restored.npz")
  assert r.returncode == 0 and "STEP" not in r.stdout, r.stderr[-3000:]
  a, b = np.load(tmp_path / "eight.npz"), np.load(tmp_path / "restored.npz")
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)




# --- multi-process: stopping together, per-process data states ---

def _two_processes(workdir, steps, *extra_of_process):
  port = local_cluster.free_port()
  env = local_cluster.env(XLA_FLAGS="--xla_force_host_platform_device_count=1")
  outputs = local_cluster.run_together(
      [[sys.executable, str(WORKER), str(workdir), str(steps), "--port", str(port),
        "--process-id", str(i), *map(str, extra_of_process[i])] for i in range(2)],
      env, timeout=600)
  return [out + err for out, err in outputs]


@pytest.mark.slow
def test_two_processes_stop_together_and_resume_their_own_data(tmp_path):
  """Process 1 runs out of its time budget after step 1, process 0 has none: both stop
  at step 1 (else the collective save would hang), and each resumes its own stream."""
  logs = _two_processes(tmp_path, 4, (), ("--time-budget", 0))
  assert all("DONE 1" in log for log in logs), logs
  saved = json.loads((tmp_path / "checkpoints" / "1" / "data" / "metadata").read_text())
  # Batch 8 over 2 processes: process i read examples i, i + 2, i + 4, i + 6.
  assert saved == {"process_count": 2, "by_process": {
      "0": {"index": 8, "process_index": 0}, "1": {"index": 9, "process_index": 1}}}
  logs = _two_processes(tmp_path, 3, (), ())  # set_state refuses another process's state
  assert all("Resumed" in log and "DONE 3" in log for log in logs), logs


# --- a text encoder trained with the U-Net (config.text.trainable) ---

@pytest.fixture(scope="module")
def trained_text(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trainable_text")
  encoder = th.tiny_trainable_t5()
  state, _ = th.run(workdir, 30, log_every=5, checkpoint_every=30, text_encoder=encoder)
  return workdir, encoder, state


def _leaves_differ(a, b):
  return [not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                 strict=True)]


def test_a_trainable_text_encoder_trains_with_the_unet(trained_text):
  workdir, encoder, state = trained_text
  losses = _losses(workdir)
  assert losses[30] < 0.7 * losses[5], losses
  assert all(_leaves_differ(encoder.params, state.text_params))  # every tensor moved
  assert all(_leaves_differ(encoder.params, state.text_ema_params))
  assert all(_leaves_differ(state.text_params, state.text_ema_params))
  # The checkpoint holds both EMAs; each is read alone (the optimizer state is not).
  params, step = loop_lib.restore_text_ema_params(workdir, encoder)
  assert step == 30
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.text_ema_params),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  unet_ema, _ = loop_lib.restore_ema_params(
      workdir, model=th.tiny_unet(16, text_width=encoder.width),
      loop=loop_lib.LoopSettings(num_steps=1, batch_size=8, resolution=16),
      text_len=th.TEXT_LEN, text_dim=encoder.width)
  for a, b in zip(jax.tree.leaves(unet_ema), jax.tree.leaves(state.ema_params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sampling_uses_the_jointly_trained_encoder(trained_text, monkeypatch):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
  import builders
  import ml_collections
  import sampling

  workdir, encoder, state = trained_text
  # The run's config names its encoder; this one is the tiny T5 it trained.
  monkeypatch.setattr(builders, "text_encoder",
                      lambda config, mesh=None: th.tiny_trainable_t5(trainable=False))
  config = ml_collections.ConfigDict({
      "text": {"encoder": "tiny", "max_length": th.TEXT_LEN, "cache_dir": None,
               "trainable": True}, "mesh": {"data": -1, "model": 1, "rules": "fsdp"}})
  sampler = sampling.sampling_text_encoder([config], [str(workdir)])
  assert not sampler.trainable and "+trained:" in sampler.encoder_id
  tokens, mask = encoder.tokenize(["a red circle"])
  np.testing.assert_allclose(sampler.encode(["a red circle"])[0],
                             encoder.apply(state.text_ema_params, tokens, mask), atol=1e-6)
  with pytest.raises(builders.UserError, match="sample that stage alone"):
    sampling.sampling_text_encoder([config, config], [str(workdir), str(workdir)])
  frozen = ml_collections.ConfigDict(config.to_dict())
  frozen.text.trainable = False  # a frozen run samples with the configured encoder
  assert "+trained" not in sampling.sampling_text_encoder([frozen], [str(workdir)]).encoder_id


def test_a_frozen_text_encoder_stays_out_of_the_state(tmp_path):
  encoder = th.tiny_trainable_t5(trainable=False)
  before = jax.tree.map(np.array, encoder.params)
  state, _ = th.run(tmp_path, 2, checkpoint_every=2, text_encoder=encoder)
  assert state.text_params is None and state.text_ema_params is None
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(encoder.params), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="frozen"):
    loop_lib.restore_text_ema_params(tmp_path, encoder)
