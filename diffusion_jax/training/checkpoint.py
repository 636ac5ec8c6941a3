"""Orbax checkpoints of a run: train state, data-iterator state and config.

Each checkpoint is one step directory under ``<workdir>/checkpoints`` with three items:
``state`` (the TrainState, sharded arrays written by every host), ``data`` (the input
iterator's JSON state, so a resumed run sees exactly the batches it would have seen) and
``config`` (the run's config as JSON). Restoring takes the *current* abstract state with
its shardings, so a checkpoint written on 8 devices restores onto 1 and vice versa.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper of ``ocp.CheckpointManager`` keeping the last ``max_to_keep``."""

  def __init__(self, workdir: str | pathlib.Path, max_to_keep: int = 3,
               async_save: bool = False):
    self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any = None,
           config: dict | None = None, force: bool = True) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any]:
    """(state placed on ``abstract_state``'s shardings, data-iterator state or None).

    ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (see
    ``abstract_with_shardings``).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
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

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` (arrays or structs) carrying ``shardings``."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
