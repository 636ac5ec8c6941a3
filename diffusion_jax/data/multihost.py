"""Dataset preparation on many processes: process 0 prepares, the others wait, then reuse it.

    name = prepare_once(lambda: shapes_tfds.prepare_shapes(data_dir, 32, 20_000))

Every process must make this call, whether or not the data looks prepared to it: the wait is a
collective, so a process that skipped it (because process 0 had already finished by the time it
checked) would leave the others waiting forever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def _broadcast_success(ok: bool) -> bool:
  """Barrier across all processes that also hands every process process 0's outcome."""
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def prepare_once(prepare: Callable[[], T], *, process_index: int | None = None,
                 process_count: int | None = None,
                 barrier: Callable[[bool], bool] | None = None) -> T:
  """Runs `prepare` on process 0, then, once it has finished, on every other process.

  `prepare` must be idempotent (skip what is already there, like
  ``shapes_tfds.prepare_shapes``) and return the same thing on every process (e.g. the
  dataset name). With a shared data_dir the other processes then find the data prepared
  and only read its metadata, instead of all writing the same files at once; with a
  data_dir local to each host they prepare their own copy. (Several processes on one host
  with a host-local data_dir would still race after process 0; give each its own dir.)

  The wait is a collective (``broadcast_one_to_all``, a barrier that also carries whether
  process 0 succeeded), so if process 0 fails the others raise instead of waiting forever or
  racing to prepare. `process_index`, `process_count` (default: JAX's) and `barrier`
  (ok -> process 0's ok) are injectable for tests.
  """
  if process_index is None or process_count is None:
    import jax  # only when needed: single-process data code does not start JAX

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count == 1:
    return prepare()
  barrier = barrier or _broadcast_success
  if process_index == 0:
    try:
      result = prepare()
    except Exception:
      barrier(False)  # release the others with the news, then fail here with the real error
      raise
    barrier(True)
    return result
  if not barrier(True):
    raise RuntimeError(f"Process 0 failed to prepare the dataset (its log has the error); "
                       f"process {process_index} stops too.")
  return prepare()
