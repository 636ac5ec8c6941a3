"""Sweeps: a declaration (stages, axes, fixed overrides) -> the arms it runs.

An *override* is a dotted path and a value. Paths name either a training setting of one
stage, ``"<stage>.<config path>"`` (``"base.diffusion.weighting"``), or a sampling /
evaluation setting, ``"sample.<name>"`` (``"sample.guidance_scale"``). The special path
``"stages"`` picks one of the declaration's named stage sets (``{"cascade": ("base",
"sr"), "single": ("base64",)}``), so a sweep can compare a cascade with a single stage.

An arm is one point of the sweep: its training overrides name the *training run* it
needs, and arms whose training overrides are equal share that run (a guidance-scale
sweep trains once and evaluates many times). Names are made from the overrides that
vary across the sweep, so an arm's directory says what it is.

This module is pure: it never reads a config. ``experiments/ablate.py`` checks every
path and value against the stages' configs before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

SAMPLE = "sample"
STAGES = "stages"

Override = tuple[str, Any]


class SweepError(ValueError):
  """A sweep declaration is wrong; the message names the axis or value."""


def _freeze(value: Any) -> Any:
  if isinstance(value, list | tuple):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value


def is_sampling(path: str) -> bool:
  return path.split(".", 1)[0] == SAMPLE


def _value_text(value: Any) -> str:
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  text = json.dumps(value) if not isinstance(value, str) else value
  return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "none"


def _name(overrides: Sequence[Override]) -> str:
  """A directory name from overrides: ``weighting=min_snr,guidance_scale=3``. Long
  names keep a hash of the full text, so two arms never share a directory."""
  if not overrides:
    return "default"
  parts = [f"{path.rsplit('.', 1)[-1]}={_value_text(value)}" for path, value in overrides]
  name = ",".join(parts)
  if len(name) > 80 or len({p.split("=")[0] for p in parts}) < len(parts):
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode())
    name = f"{name[:60]}-{digest.hexdigest()[:8]}"
  return name


@dataclasses.dataclass(frozen=True)
class Arm:
  """One point of a sweep.

  ``overrides``: every override of this arm, the sweep's fixed ones included, in
  declaration order. ``varying``: the paths that differ across the sweep (they name it).
  """

  overrides: tuple[Override, ...]
  varying: tuple[str, ...]

  @property
  def train_overrides(self) -> tuple[Override, ...]:
    return tuple((p, v) for p, v in self.overrides if not is_sampling(p))

  @property
  def sample_overrides(self) -> dict[str, Any]:
    return {p.split(".", 1)[1]: v for p, v in self.overrides if is_sampling(p)}

  @property
  def name(self) -> str:
    return _name([(p, v) for p, v in self.overrides if p in self.varying])

  @property
  def train_name(self) -> str:
    """The name of the training run this arm needs (shared with arms that differ only in
    sampling settings)."""
    return _name([(p, v) for p, v in self.train_overrides if p in self.varying])

  def value(self, path: str, default: Any = None) -> Any:
    return dict(self.overrides).get(path, default)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep declaration.

  Attributes:
    name: the sweep's name (its directory under the sweeps root).
    stage_sets: named stage lists, base first; each stage name maps to a config file in
      ``stage_configs``. The first set is the default.
    stage_configs: stage name -> config file (``configs/demo_base.py[:arg]``).
    axes: path -> values; the arms are their product (in declaration order).
    arms: an explicit list of override dicts instead of (or after) the product.
    fixed: overrides applied to every arm first (an axis or arm may override them).
  """

  name: str
  stage_sets: tuple[tuple[str, tuple[str, ...]], ...]
  stage_configs: tuple[tuple[str, str], ...]
  axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()
  arms: tuple[tuple[Override, ...], ...] = ()
  fixed: tuple[Override, ...] = ()

  @classmethod
  def create(cls, name: str, stage_configs: Mapping[str, str],
             stage_sets: Mapping[str, Sequence[str]] | None = None,
             axes: Mapping[str, Sequence[Any]] | None = None,
             arms: Sequence[Mapping[str, Any]] = (),
             fixed: Mapping[str, Any] | None = None) -> Sweep:
    """Builds and checks a sweep from plain dicts (what a sweep config file holds)."""
    if not stage_configs:
      raise SweepError("A sweep needs at least one stage (stage name -> config file).")
    stage_sets = dict(stage_sets or {"default": tuple(stage_configs)})
    sweep = cls(
        name=name,
        stage_sets=tuple((k, tuple(v)) for k, v in stage_sets.items()),
        stage_configs=tuple(stage_configs.items()),
        axes=tuple((path, tuple(_freeze(v) for v in values))
                   for path, values in (axes or {}).items()),
        arms=tuple(tuple((p, _freeze(v)) for p, v in arm.items()) for arm in arms),
        fixed=tuple((p, _freeze(v)) for p, v in (fixed or {}).items()))
    sweep.check()
    return sweep

  def check(self) -> None:
    """Refuses a malformed declaration with one line naming the axis or value."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
      raise SweepError(f"sweep name {self.name!r}: use letters, digits, '_', '-', '.'.")
    configs = dict(self.stage_configs)
    for set_name, stages in self.stage_sets:
      if not stages:
        raise SweepError(f"stage set {set_name!r} is empty.")
      unknown = [s for s in stages if s not in configs]
      if unknown:
        raise SweepError(f"stage set {set_name!r} names stages {unknown} that have no "
                         f"config; stages: {', '.join(configs)}.")
    for path, values in self.axes:
      if not values:
        raise SweepError(f"axis {path!r} has no values.")
      if len(set(map(repr, values))) != len(values):
        raise SweepError(f"axis {path!r} repeats a value: {list(values)}.")
    overrides = [o for o in self.fixed] + [o for arm in self.arms for o in arm] + [
        (path, v) for path, values in self.axes for v in values]
    for path, value in overrides:
      self._check_path(path, value)
    if not self.axes and not self.arms:
      raise SweepError(f"sweep {self.name!r} declares no axes and no arms.")

  def _check_path(self, path: str, value: Any) -> None:
    head = path.split(".", 1)[0]
    configs = dict(self.stage_configs)
    if path == STAGES:
      if value not in dict(self.stage_sets):
        raise SweepError(f"stages={value!r} is not a stage set; choose one of "
                         f"{', '.join(dict(self.stage_sets))}.")
      return
    if "." not in path or not path.split(".", 1)[1]:
      raise SweepError(f"axis {path!r} must be '<stage>.<config field>' or "
                       "'sample.<setting>'.")
    if head != SAMPLE and head not in configs:
      raise SweepError(f"axis {path!r}: {head!r} is not a stage of this sweep (stages: "
                       f"{', '.join(configs)}) nor 'sample'.")

  def expand(self) -> list[Arm]:
    """Every arm, in order: the product of the axes, then the explicit arms."""
    points: list[dict[str, Any]] = []
    if self.axes:
      paths = [p for p, _ in self.axes]
      for combo in itertools.product(*(values for _, values in self.axes)):
        points.append(dict(zip(paths, combo, strict=True)))
    points += [dict(arm) for arm in self.arms]
    # The arm's own values first (they name it, in declaration order), then the fixed ones.
    merged = [{**point, **{p: v for p, v in self.fixed if p not in point}}
              for point in points]
    paths_seen = list(dict.fromkeys(p for m in merged for p in m))
    varying = tuple(p for p in paths_seen
                    if len({repr(m.get(p)) for m in merged}) > 1)
    arms = [Arm(tuple(m.items()), varying) for m in merged]
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise SweepError(f"sweep {self.name!r} declares the arm {duplicates[0]!r} twice.")
    return arms

  def stages_of(self, arm: Arm) -> tuple[str, ...]:
    """The stages (base first) the arm trains and samples through."""
    sets = dict(self.stage_sets)
    return sets[arm.value(STAGES, self.stage_sets[0][0])]

  def config_file(self, stage: str) -> str:
    return dict(self.stage_configs)[stage]

  def stage_run_name(self, arm: Arm, stage: str) -> str:
    """The directory name of the training run of ``stage`` that ``arm`` needs. Stages
    train independently (a super-resolution stage learns from real low-res images), so
    it depends on that stage's own overrides only: a sweep over the base stage's loss
    weighting trains its super-resolution stage once."""
    prefix = stage + "."
    return _name([(p, v) for p, v in arm.train_overrides
                  if p.startswith(prefix) and p in arm.varying])

  def stage_overrides(self, arm: Arm, stage: str) -> dict[str, Any]:
    """The arm's training overrides of one stage, as config paths (no stage prefix)."""
    prefix = stage + "."
    return {p[len(prefix):]: v for p, v in arm.train_overrides if p.startswith(prefix)}
