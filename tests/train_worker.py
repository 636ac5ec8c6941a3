"""Runs tests/training_helpers.run in its own process (for kill / SIGTERM / multi-device /
multi-process tests). Usage: train_worker.py WORKDIR STEPS [--devices N] [--kill-at K]
[--checkpoint-every C] [--dump FILE.npz] [--data D --model M] [--slow]
[--port P --process-id I (joins a 2-process cluster on 127.0.0.1:P)] [--time-budget S]."""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("steps", type=int)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--kill-at", type=int, default=None)
parser.add_argument("--checkpoint-every", type=int, default=1000)
parser.add_argument("--dump", default=None)
parser.add_argument("--data", type=int, default=-1)
parser.add_argument("--model", type=int, default=1)
parser.add_argument("--slow", action="store_true", help="sleep 0.2 s per step")
parser.add_argument("--port", type=int, default=None)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--time-budget", type=float, default=None)
args = parser.parse_args()
if args.devices > 1:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

import pathlib  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import conftest  # noqa: E402, F401  (the persistent compilation cache)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import training_helpers  # noqa: E402

from diffusion_jax import sharding  # noqa: E402
from diffusion_jax.training import loop as loop_lib  # noqa: E402
from diffusion_jax.training import workdir_lock  # noqa: E402

if args.port is not None:
  assert sharding.maybe_initialize_distributed(f"127.0.0.1:{args.port}", 2, args.process_id)


def on_step_end(step):
  print(f"STEP {step}", flush=True)
  if args.kill_at is not None and step == args.kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
  if args.slow:
    time.sleep(0.2)


try:
  state, _ = training_helpers.run(args.workdir, args.steps,
                                  checkpoint_every=args.checkpoint_every,
                                  mesh_axes=(("data", args.data), ("model", args.model)),
                                  on_step_end=on_step_end, time_budget_s=args.time_budget,
                                  log=lambda s: print(s, flush=True))
except loop_lib.Preempted as e:  # SIGTERM: checkpointed, then stopped
  print("PREEMPTED", flush=True)
  print("DONE", e.step, flush=True)
  sys.exit(0)
except workdir_lock.WorkdirLockedError as e:
  print(f"error: {e}", file=sys.stderr, flush=True)
  sys.exit(2)
if args.dump:
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path({"params": state.params,
                                               "ema": state.ema_params})}
  np.savez(args.dump, **flat)
print("DONE", int(state.step), flush=True)
