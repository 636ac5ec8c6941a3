"""Orbax checkpoints of a run: train state, data-iterator states and config.

Each checkpoint is one step directory under ``<workdir>/checkpoints`` (local or remote,
e.g. ``gs://``: paths are ``etils.epath``) with three items: ``state`` (the TrainState,
sharded arrays written by every host), ``data`` (every process's input-iterator state as
JSON, ``{"process_count": P, "by_process": {"0": ..., ..., "P-1": ...}}``, so a resumed
run sees exactly the batches it would have seen) and ``config`` (the run's config as
JSON). Orbax writes JSON items from process 0 only, so the iterator states of all
processes are gathered to it first. Restoring takes the *current* abstract state with its
shardings, so a checkpoint written on 8 devices restores onto 1 and vice versa.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def _local(path: epath.Path) -> bool:
  return "://" not in str(path)


class Checkpointer:
  """A thin wrapper of ``ocp.CheckpointManager`` keeping the last ``max_to_keep``."""

  def __init__(self, workdir: str | epath.PathLike, max_to_keep: int = 3,
               async_save: bool = False, create: bool = True):
    """``create=False`` for readers: a wrong workdir is then not left with an empty
    ``checkpoints/``."""
    directory = epath.Path(workdir) / "checkpoints"
    # resolve() only means something for local paths ('gs://b/x' has no cwd).
    self.directory = directory.resolve() if _local(directory) else directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any = None,
           config: dict | None = None, force: bool = True) -> None:
    """Saves on every process (a collective): ``data_state`` is this process's own."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(gather_data_states(data_state))
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any]:
    """(state placed on ``abstract_state``'s shardings, the saved data states or None).

    ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (see
    ``abstract_with_shardings``). The data states are the ``data`` item; pick this
    process's with ``data_state_of_process``.
    """
    step = self._step(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = (self.directory / str(step) / "data").exists()
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(
          f"Checkpoint {self.directory / str(step)} does not match this run's state "
          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Was it written with a "
          "different config? Use a fresh --workdir or the original config.") from None
    return restored["state"], (restored["data"] if has_data else None)

  def restore_fields(self, targets: dict[str, Any], step: int | None = None) -> dict:
    """Only some fields of a saved TrainState, e.g. {"ema_params": abstract tree}: the
    rest (optimizer state, ...) is never read. Targets are ShapeDtypeStructs with
    shardings."""
    step = self._step(step)
    path = self.directory / str(step) / "state"
    try:
      with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=targets, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(targets)))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(
          f"Checkpoint {path} does not hold {', '.join(targets)} of the expected shapes "
          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Was it written with a "
          "different config?") from None

  def saved_fields(self, step: int | None = None) -> dict:
    """The saved TrainState's tree of array metadata (shapes, dtypes), nothing read."""
    step = self._step(step)
    return ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / "state").tree

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    return step

  def close(self) -> None:
    self._manager.close()


def gather_data_states(own: Any) -> dict:
  """Every process's data-iterator state, keyed by process index (a collective when
  there are several processes)."""
  count = jax.process_count()
  if count == 1:
    return {"process_count": 1, "by_process": {"0": own}}
  from jax.experimental import multihost_utils

  encoded = np.frombuffer(json.dumps(own).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(encoded.size))).ravel()
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:encoded.size] = encoded
  rows = np.asarray(multihost_utils.process_allgather(padded))  # [P, max length]
  return {"process_count": count,
          "by_process": {str(i): json.loads(bytes(rows[i, :n]).decode())
                         for i, n in enumerate(lengths)}}


def data_state_of_process(saved: Any, process_index: int,
                          process_count: int) -> tuple[Any, str | None]:
  """(this process's saved data state, None) or (None, why it cannot be restored)."""
  if saved is None:
    return None, "the checkpoint holds no data-iterator state"
  if saved.get("process_count") != process_count:
    return None, (f"the data-iterator states were written by {saved.get('process_count')} "
                  f"process(es), this run has {process_count}")
  return saved["by_process"][str(process_index)], None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` (arrays or structs) carrying ``shardings``."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
