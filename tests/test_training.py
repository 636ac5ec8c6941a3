"""Training: loss goes down, exact resume after SIGKILL, SIGTERM checkpoints, the
non-finite guard, gradient accumulation, and sharded == unsharded."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
import training_helpers as th

from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib

WORKER = pathlib.Path(__file__).parent / "train_worker.py"


def _worker(*args, timeout=600, **kwargs):
  return subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True,
                        text=True, timeout=timeout, **kwargs)


def _losses(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_loss_goes_down_and_outputs_are_written(tmp_path):
  state, summary = th.run(tmp_path, 40, log_every=10, checkpoint_every=20)
  losses = _losses(tmp_path)
  assert losses[40] < 0.7 * losses[10], losses
  assert int(state.step) == 40 and summary["skipped_total"] == 0
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [20, 40]
  assert list((tmp_path / "tensorboard").iterdir())
  assert {"loss_t0", "loss_t3", "grad_norm", "learning_rate", "images_per_s"} <= set(
      json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]))


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
  r = _worker(resumed, 8, "--checkpoint-every", 4, "--dump", tmp_path / "resumed.npz")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "STEP 5" in r.stdout and "STEP 4" not in r.stdout  # resumed at step 4
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


def test_nonfinite_steps_are_skipped_then_abort(tmp_path):
  with pytest.raises(loop_lib.NonFiniteError, match="3 steps in a row"):
    th.run(tmp_path, 10, nan_images=True, max_nonfinite_in_a_row=3, log_every=100)


def test_nonfinite_step_leaves_state_unchanged():
  model = th.tiny_unet()
  tx = state_lib.make_optimizer(state_lib.OptimizerSettings(learning_rate=1e-3,
                                                            warmup_steps=1))
  inputs = loop_lib.init_inputs(model.config, 16, None, th.TEXT_LEN, th.TEXT_DIM)
  params = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
  state = state_lib.create_train_state(params, tx, jax.random.key(1))
  null = loop_lib.encode_null(th.HashText())
  batch = loop_lib._model_batch(next(th.ShapesIterator(4, nan_images=True)), th.HashText())
  settings = step_lib.StepSettings(step_lib.DiffusionSettings())
  new_state, metrics = jax.jit(lambda s, b: step_lib.train_step(
      s, b, null, model=model, tx=tx, settings=settings))(state, batch)
  assert int(new_state.step) == 1 and int(new_state.nonfinite_total) == 1
  assert float(metrics["skipped"]) == 1.0
  for a, b in zip(jax.tree.leaves((state.params, state.ema_params, state.opt_state)),
                  jax.tree.leaves((new_state.params, new_state.ema_params,
                                   new_state.opt_state)), strict=True):
    np.testing.assert_array_equal(a, b)


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


