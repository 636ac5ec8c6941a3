"""Orbax checkpoints of a run: train state, data-iterator states and config.

Each checkpoint is one step directory under ``<workdir>/checkpoints`` (local or remote,
e.g. ``gs://``: paths are ``etils.epath``) with three items: ``state`` (the TrainState,
sharded arrays written by every host), ``data`` (every process's input-iterator state as
JSON, ``{"process_count": P, "by_process": {"0": ..., ..., "P-1": ...}}``, so a resumed
run sees exactly the batches it would have seen) and ``config`` (the run's config as
JSON). Orbax writes JSON items from process 0 only, so the iterator states of all
processes are gathered to it first. Restoring takes the *current* abstract state with its
shardings, so a checkpoint written on 8 devices restores onto 1 and vice versa.

A checkpoint that cannot be read (a truncated or overwritten data file, a garbage
``_METADATA``) or written (a full disk) raises ``CheckpointError`` with one line naming the
file and the reason, instead of orbax's and TensorStore's tracebacks; a failed save removes
its temporary directory, so the previous checkpoint and the workdir stay usable.
"""

from __future__ import annotations

import errno
import json
import re
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

# orbax writes a step into "<step>.orbax-checkpoint-tmp-<n>" and renames it when complete.
_TMP_MARK = ".orbax-checkpoint-tmp"
# The JSON files of a step directory (orbax's own and the JSON items): checked by parsing.
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding",
               "state/array_metadatas/process_0", "data/metadata", "config/metadata")


class CheckpointError(ValueError):
  """A checkpoint cannot be read or written. ``str()`` is one line naming the step
  directory (or file) and the reason; ``step`` is the checkpoint's step."""

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step
    _drop_closed_event_loop_noise()


def _drop_closed_event_loop_noise() -> None:
  """After a failed read or write, TensorStore's callbacks still queued for orbax's
  asyncio loop fire once it is closed, and Python prints each as "Exception ignored ...
  RuntimeError: Event loop is closed" (dozens of lines after the one-line error). This
  hook drops exactly those; every other unraisable exception is reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._drops_closed_loop = True
  sys.unraisablehook = hook


class CheckpointMismatchError(CheckpointError):
  """The checkpoint is intact but holds another model's state (a different config)."""


def _local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip()
  return (text.splitlines()[0][:limit] if text else type(e).__name__)


def _chain(e: BaseException):
  """``e`` and its causes / contexts, outermost first."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def unreadable_json(step_dir: epath.Path) -> tuple[epath.Path, str] | None:
  """(the first JSON file of a step directory that does not parse, why) or None."""
  for name in _JSON_FILES:
    path = step_dir / name
    try:
      if path.exists():
        json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      return path, f"{type(e).__name__}: {_first_line(e, 120)}"
  return None


def describe_restore_error(e: BaseException, step_dir: epath.Path) -> tuple[str, bool]:
  """(what is wrong with a checkpoint that failed to restore, one line; whether it is
  damaged (True) rather than of another shape (False))."""
  garbage = unreadable_json(step_dir)
  if garbage is not None:
    return f"{garbage[0].name} is not valid JSON ({garbage[1]})", True
  for link in _chain(e):
    # TensorStore: 'Error reading "<array>" in OCDBT database at local file "<dir>": why'
    found = re.search(r'Error reading "([^"]+)" in \S+ database at .*?"([^"]+)": (.*)',
                      str(link))
    if found:
      array, where, why = found.groups()
      array = array.rsplit("/", 1)[0]
      return (f"a data file under {where.rstrip('/')} is truncated or corrupt (reading "
              f"{array}: {why.splitlines()[0][:200]})"), True
  if isinstance(e, (ValueError, KeyError)):  # orbax: the saved tree or shapes differ
    return f"{type(e).__name__}: {_first_line(e)}", False
  return f"it cannot be read ({type(e).__name__}: {_first_line(e)})", True


def restore_error(e: BaseException, step_dir: epath.Path, step: int,
                  mismatch: str = "does not match this run's state") -> CheckpointError:
  """The one-line CheckpointError (or CheckpointMismatchError) for a failed restore."""
  what, damaged = describe_restore_error(e, step_dir)
  if damaged:
    return CheckpointError(f"Checkpoint {step_dir} is unreadable: {what}.", step)
  return CheckpointMismatchError(
      f"Checkpoint {step_dir} {mismatch} ({type(e).__name__}: {_first_line(e)}); was it "
      "written with a different config?", step)


def describe_write_error(e: BaseException) -> str:
  """Why a write failed, one line: the OSError deepest in the chain if any (a full disk
  is otherwise buried under TensorStore's messages)."""
  for link in _chain(e):
    if isinstance(link, OSError) and link.errno is not None:
      where = f" ({link.filename})" if link.filename else ""
      return f"{link.strerror or errno.errorcode.get(link.errno, link.errno)}{where}"
  text = str(e)
  if "No space left on device" in text or "RESOURCE_EXHAUSTED" in text:
    return "No space left on device"
  return f"{type(e).__name__}: {_first_line(e)}"


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
    """Saves on every process (a collective): ``data_state`` is this process's own.

    A save that fails (a full disk, lost permissions) raises CheckpointError with one
    line; its temporary directory is removed and the previous checkpoints are untouched.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(gather_data_states(data_state))
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    try:
      self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (orbax / TensorStore raise many types)
      removed = self.remove_temporary()
      previous = [s for s in self.all_steps() if s != int(step)]
      raise CheckpointError(
          f"Could not write checkpoint step {step} to {self.directory}: "
          f"{describe_write_error(e)}. "
          + (f"{len(removed)} temporary director{'y' if len(removed) == 1 else 'ies'} "
             "removed; " if removed else "")
          + (f"the previous checkpoint (step {max(previous)}) is intact: " if previous else
             "no earlier checkpoint exists: ")
          + "free space (or fix the permissions) and rerun the same command to resume.",
          int(step)) from None

  def remove_temporary(self) -> list[epath.Path]:
    """Removes unfinished step directories a failed save left behind (process 0 only);
    returns them."""
    if jax.process_index() != 0 or not self.directory.exists():
      return []
    removed = []
    for path in self.directory.iterdir():
      if _TMP_MARK in path.name:
        try:
          path.rmtree()
          removed.append(path)
        except OSError:
          pass
    return removed

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def reload(self) -> None:
    """Re-reads the step list (after step directories were moved by hand or by
    ``set_aside``)."""
    self._manager.reload()

  def set_aside(self, step: int, reason_dir: str = "unreadable_checkpoints") -> epath.Path:
    """Moves step directory ``step`` to ``<workdir>/<reason_dir>/<step>`` (process 0; kept,
    not deleted, so nothing written is lost) and returns the new path."""
    target = self.directory.parent / reason_dir / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target = target.with_name(f"{step}.{len(list(target.parent.iterdir()))}")
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self.reload()
    return target

  def stored_json(self, item: str, step: int) -> Any:
    """A JSON item (``config``, ``data``) of checkpoint ``step`` read directly, or None
    when the step does not hold it or it does not parse."""
    path = self.directory / str(step) / item / "metadata"
    try:
      return json.loads(path.read_text()) if path.exists() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
      return None

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
    except Exception as e:  # noqa: BLE001  (TensorStore raises a bare Exception)
      raise restore_error(e, self.directory / str(step), step) from None
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
    except Exception as e:  # noqa: BLE001  (TensorStore raises a bare Exception)
      raise restore_error(e, self.directory / str(step), step,
                          f"does not hold {', '.join(targets)} of the expected shapes") from None

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


def stored_config(workdir: str | epath.PathLike,
                  step: int | None = None) -> tuple[dict | None, int | None]:
  """(the config saved with checkpoint ``step`` of ``workdir`` (None: the newest), that
  step), read without orbax; (None, step) when there is no such checkpoint or it holds no
  config. Raises CheckpointError when the saved config is not valid JSON."""
  directory = epath.Path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in directory.iterdir()
                 if p.name.isdigit()) if directory.exists() else []
  step = (steps[-1] if steps else None) if step is None else step
  if step not in steps:
    return None, step
  path = directory / str(step) / "config" / "metadata"
  if not path.exists():
    return None, step
  try:
    return json.loads(path.read_text()), step
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"Checkpoint {directory / str(step)} is unreadable: {path} is not "
                          f"valid JSON ({type(e).__name__}: {_first_line(e, 120)}).",
                          step) from None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` (arrays or structs) carrying ``shardings``."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
