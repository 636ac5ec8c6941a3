"""Ordered map over worker subprocesses, for CPU-bound dataset preparation.

Not `multiprocessing`: its "spawn"/"forkserver" start methods re-import the caller's main
module (a script without an ``if __name__ == "__main__"`` guard then makes the pool respawn
workers forever), and "fork" can deadlock once JAX has started its threads. Here each worker
is a fresh ``python -c`` that imports only the module holding the function.
"""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence

_WORKER_CODE = "from diffusion_jax.data.parallel import _worker_main; _worker_main()"


def _write_message(stream, obj) -> None:
  payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  stream.write(struct.pack("<Q", len(payload)) + payload)
  stream.flush()


def _read_message(stream):
  header = stream.read(8)
  if len(header) < 8:
    raise EOFError("worker closed its output")
  (size,) = struct.unpack("<Q", header)
  return pickle.loads(stream.read(size))


def _worker_main() -> None:
  """Reads (module, function, [tasks]) on stdin; writes one result per task to stdout."""
  module_name, function_name, tasks = _read_message(sys.stdin.buffer)
  function = getattr(importlib.import_module(module_name), function_name)
  for task in tasks:
    _write_message(sys.stdout.buffer, function(task))


def ordered_map(function, tasks: Sequence, num_workers: int) -> Iterator:
  """Yields function(task) for each task, in order, computed by `num_workers` subprocesses.

  `function` must be a module-level function; tasks and results must pickle. Worker w gets
  tasks w, w + num_workers, ..., so the results are read back round-robin; a full pipe
  blocks a worker that runs ahead, which bounds memory.
  """
  num_workers = max(1, min(num_workers, len(tasks)))
  package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
  workers = []
  try:
    for w in range(num_workers):
      process = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env)
      _write_message(process.stdin, (function.__module__, function.__name__,
                                     list(tasks[w::num_workers])))
      process.stdin.close()
      workers.append(process)
    for index in range(len(tasks)):
      process = workers[index % num_workers]
      try:
        yield _read_message(process.stdout)
      except EOFError:
        raise RuntimeError(f"worker subprocess for task {index} of {function.__name__} failed "
                           f"(exit code {process.wait()}); see its traceback above") from None
  finally:
    for process in workers:
      if process.poll() is None:
        process.kill()
      process.wait()
      process.stdout.close()


def map_in_order(function, tasks: Iterable, num_workers: int) -> Iterator:
  """`ordered_map`, or a plain loop when one worker is enough."""
  tasks = list(tasks)
  if num_workers <= 1 or len(tasks) <= 1:
    return map(function, tasks)
  return ordered_map(function, tasks, num_workers)
