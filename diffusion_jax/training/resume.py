"""Resuming a run: which checkpoint, and whether this run's config may continue it.

A run resumes from its newest checkpoint only if its config means the same weights as
the one stored in that checkpoint: ``config_changes`` compares the two JSON dicts field by
field (dotted names, e.g. ``diffusion.parameterization``) except the fields a
``ResumeRules`` lets change (the experiments' list is ``configs/common.py:
MAY_CHANGE_ON_RESUME``). A refused resume raises before anything is written.

A checkpoint that cannot be read is not silently skipped: the newest intact one is
found and named, and used only when the caller asks (``recover_from_intact``); the
unreadable newer ones are then moved to ``<workdir>/unreadable_checkpoints/`` (kept, not
deleted).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Callable
from typing import Any

from diffusion_jax.training import checkpoint as ckpt_lib


class DataRestartError(ValueError):
  """The checkpoint's data-iterator states do not fit this run's processes."""


class IncompatibleResumeError(ValueError):
  """The run's config differs from its checkpoint's in fields that change what the
  weights mean; the message (one line) names them."""


@dataclasses.dataclass(frozen=True)
class ResumeRules:
  """``may_change``: fnmatch patterns of dotted config fields that may differ from the
  checkpoint's (``"train.num_steps"``, ``"mesh.*"``). ``compared_whole``: dict-valued
  fields whose keys are free-form (schedule kwargs), compared as one value.
  ``defaults``: the config's defaults; a field the checkpoint's config lacks (added to
  the code since) is no change while it has its default value."""

  may_change: tuple[str, ...] = ()
  compared_whole: tuple[str, ...] = ()
  defaults: dict | None = None


def _flatten(tree: Any, whole: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict) or (prefix and prefix.rstrip(".") in whole):
    return {prefix.rstrip("."): tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, whole, f"{prefix}{key}."))
  return out


def _same(a: Any, b: Any) -> bool:
  # JSON round trip: tuples and lists, ints and equal floats compare alike.
  return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or a == b


def config_changes(stored: dict, current: dict, rules: ResumeRules) -> list[str]:
  """``"field: stored -> current"`` for every field that differs and may not, sorted."""
  old = _flatten(stored, rules.compared_whole)
  new = _flatten(current, rules.compared_whole)
  defaults = _flatten(rules.defaults or {}, rules.compared_whole)
  changes = []
  for name in sorted(set(old) | set(new)):
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in rules.may_change):
      continue
    if name not in old:  # a field the code added since the checkpoint was written
      if name in defaults and _same(new[name], defaults[name]):
        continue
      changes.append(f"{name}: (not set) -> {new[name]!r}")
    elif name not in new:  # a field the code no longer has: nothing to compare with
      if name in defaults:
        changes.append(f"{name}: {old[name]!r} -> (not set)")
    elif not _same(old[name], new[name]):
      changes.append(f"{name}: {old[name]!r} -> {new[name]!r}")
  return changes


def check_config(stored: dict | None, current: dict | None, rules: ResumeRules,
                 step_dir: str) -> None:
  """Raises IncompatibleResumeError unless ``current`` may resume from ``stored`` (the
  config saved in checkpoint ``step_dir``; None on either side: nothing to compare)."""
  if stored is None or current is None:
    return
  changes = config_changes(stored, current, rules)
  if changes:
    raise IncompatibleResumeError(
        f"This config cannot resume checkpoint {step_dir}: it changes what the weights "
        f"mean ({'; '.join(changes)}). Use the checkpoint's values (its config.json is "
        "unchanged) or a fresh --workdir.")


def restore_latest(checkpointer: ckpt_lib.Checkpointer, abstract_state: Any,
                   config: dict | None, rules: ResumeRules, *, recover: bool = False,
                   log: Callable[[str], None] = print) -> tuple[Any, Any] | None:
  """(state, saved data states) of the newest checkpoint this run may resume, or None
  when there is none.

  Raises IncompatibleResumeError (config), CheckpointMismatchError (intact, another
  model's state) or CheckpointError (unreadable: naming the newest intact checkpoint,
  which ``recover=True`` resumes instead), each with one line.
  """
  step = checkpointer.latest_step()
  if step is None:
    return None
  step_dir = checkpointer.directory / str(step)
  check_config(checkpointer.stored_json("config", step), config, rules, str(step_dir))
  try:
    return checkpointer.restore(abstract_state, step)
  except ckpt_lib.CheckpointMismatchError as e:
    raise ckpt_lib.CheckpointMismatchError(
        f"{e} Use a fresh --workdir or the config it was trained with.", step) from None
  except ckpt_lib.CheckpointError as damaged:
    error = damaged
  older = sorted((s for s in checkpointer.all_steps() if s < step), reverse=True)
  for candidate in older:
    try:
      check_config(checkpointer.stored_json("config", candidate), config, rules,
                   str(checkpointer.directory / str(candidate)))
      restored = checkpointer.restore(abstract_state, candidate)
    except (ckpt_lib.CheckpointError, IncompatibleResumeError):
      continue
    unreadable = [s for s in checkpointer.all_steps() if s > candidate]
    if not recover:
      raise ckpt_lib.CheckpointError(
          f"{error} The newest intact checkpoint is step {candidate}: rerun with "
          "recover_from_intact=True (train.py: --config.train.recover_from_intact=True) to "
          f"resume from it; step(s) {unreadable} are then moved to "
          f"{checkpointer.directory.parent / 'unreadable_checkpoints'}.", step) from None
    moved = [checkpointer.set_aside(s) for s in unreadable]
    log(f"{error} Resuming from the newest intact checkpoint, step {candidate}; the "
        f"unreadable step(s) were moved to {', '.join(map(str, moved))}.")
    return restored
  raise ckpt_lib.CheckpointError(
      f"{error} No older checkpoint is intact either ({len(older)} tried): restore the file "
      "from a copy, or start afresh in another --workdir.", step) from None


def data_state_to_restore(saved: Any, step: int, allow_restart: bool,
                          log: Callable[[str], None] = print) -> Any:
  """This process's data-iterator state from a checkpoint's saved ones; None (the stream
  restarts) only if ``allow_restart``, else DataRestartError saying why it cannot
  continue (another process count) and how to proceed."""
  import jax

  own, why_not = ckpt_lib.data_state_of_process(saved, jax.process_index(),
                                                jax.process_count())
  if own is not None:
    return own
  if allow_restart:
    log(f"The input pipeline starts afresh (allow_data_restart): {why_not}; examples "
        "already seen may come again.")
    return None
  raise DataRestartError(
      f"Cannot continue the input stream of checkpoint step {step}: {why_not}. Resume with "
      "the original number of processes, or rerun with allow_data_restart=True (train.py: "
      "--config.train.allow_data_restart=True) to restart the data stream from the "
      "beginning of its shuffle.")
