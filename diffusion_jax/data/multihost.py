"""Dataset preparation on many processes: process 0 prepares, the others wait, then reuse it.

    name = prepare_once(lambda: shapes_tfds.prepare_shapes(data_dir, 32, 20_000))

Every process must make this call, whether or not the data looks prepared to it: the others
wait for process 0's call, so a process 0 that skipped it (its host-local data_dir was prepared by
an earlier run, say) would leave them waiting until the timeout. Put the "already prepared?" check
inside `prepare`, where it runs on process 0 first and on the others after the wait.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TypeVar

import numpy as np

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 4 * 3600.0  # how long the other processes wait for process 0 to prepare
_call_index = itertools.count()  # every process makes the same calls in the same order


def _share_outcome(ok: bool, *, is_source: bool, key: str, timeout_s: float) -> bool:
  """Barrier that hands every process process 0's outcome (process 0 does not wait).

  Through the coordination service's key-value store rather than a device collective
  (``sync_global_devices``, ``broadcast_one_to_all``): on CPU, gloo gives up on a collective
  whose peers do not arrive within 30 s, and preparing a dataset takes minutes.
  """
  from jax._src import distributed  # no public API for the store; jax's own code uses this

  client = distributed.global_state.client
  if client is None:  # multi-process without jax.distributed (not seen in practice)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
  if is_source:
    # Overwritable: a second call with the same key (already prepared) must not fail.
    client.key_value_set(key, "ok" if ok else "failed", allow_overwrite=True)
    return ok
  try:
    return client.blocking_key_value_get(key, int(timeout_s * 1000)) == "ok"
  except RuntimeError as error:  # jax.errors.JaxRuntimeError, its status code first
    first_line = (str(error).strip().splitlines() or [""])[0]
    if first_line.startswith("DEADLINE_EXCEEDED"):
      raise TimeoutError(f"Gave up waiting for process 0 to prepare the dataset after "
                         f"{timeout_s:g} s; see process 0's log.") from None
    # Anything else (UNAVAILABLE: the coordinator is gone, CANCELLED, ...) is not a time-out.
    raise RuntimeError(f"Waiting for process 0 to prepare the dataset failed before the "
                       f"{timeout_s:g} s time-out: {type(error).__name__}: {first_line} "
                       "(did process 0 or the coordinator exit? see their logs).") from error


def prepare_once(prepare: Callable[[], T], *, key: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, process_index: int | None = None,
                 process_count: int | None = None,
                 barrier: Callable[[bool], bool] | None = None) -> T:
  """Runs `prepare` on process 0, then, once it has finished, on every other process.

  `prepare` must be idempotent (skip what is already there, like
  ``shapes_tfds.prepare_shapes``) and return the same thing on every process (e.g. the
  dataset name). With a shared data_dir the other processes then find the data prepared
  and only read its metadata, instead of all writing the same files at once; with a
  data_dir local to each host they prepare their own copy. (Several processes on one host
  with a host-local data_dir would still race after process 0; give each its own dir.)

  The others wait (up to `timeout_s`) on a key process 0 writes to jax.distributed's
  coordination service when it is done, saying whether it succeeded, so if process 0 fails
  they raise instead of waiting forever or racing to prepare. `key` names the preparation
  (e.g. the dataset and data_dir); by default calls are paired by their order. `process_index`,
  `process_count` (default: JAX's) and `barrier` (ok -> process 0's ok) are injectable for
  tests.
  """
  if process_index is None or process_count is None:
    import jax  # only when needed: single-process data code does not start JAX

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count == 1:
    return prepare()
  if barrier is None:
    name = f"diffusion_jax/prepare_once/{next(_call_index) if key is None else key}"
    barrier = lambda ok: _share_outcome(ok, is_source=process_index == 0, key=name,
                                        timeout_s=timeout_s)
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
