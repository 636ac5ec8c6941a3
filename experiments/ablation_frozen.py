"""Frozen models a sweep trains once, before its arms: the autoencoder of a latent stage, the
(noise-aware) CLIP or attribute classifier of a guidance study.

Declared in the sweep file as ``frozen`` (name -> kind, config file, config overrides)::

  "frozen": {"ae": {"kind": "autoencoder", "config": "configs/autoencoder_shapes.py",
                    "overrides": {"train.num_steps": 1500}}}

and used by any override value ``"@<name>"`` (``"latent.autoencoder.directory": "@ae"``,
``"sample.clip_checkpoint": "@clip"``), which becomes the trained model's directory
``<root>/<sweep>/frozen/<name>/<output>``. Arm names keep the short ``@<name>``. Each model
is trained by its own script in a subprocess (its flags are parsed there, not in this
process), claimed like a training run so several workers train it once, and never again
once ``frozen_complete.json`` is written.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from builders import UserError

from diffusion_jax.ablation import claims

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPLETE = "frozen_complete.json"

# kind -> (trainer script, the directory it exports inside its workdir).
KINDS = {
    "autoencoder": ("experiments/train_autoencoder.py", "autoencoder"),
    "clip": ("experiments/train_clip.py", "clip"),
    "classifier": ("experiments/train_classifier.py", "classifier"),
}


@dataclasses.dataclass(frozen=True)
class Frozen:
  name: str
  kind: str
  config: str                     # path/to/config.py[:arg]
  overrides: tuple[tuple[str, Any], ...] = ()

  @property
  def script(self) -> str:
    return KINDS[self.kind][0]

  def workdir(self, sweep_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(sweep_dir) / "frozen" / self.name

  def output(self, sweep_dir: pathlib.Path) -> pathlib.Path:
    return self.workdir(sweep_dir) / KINDS[self.kind][1]

  def ready(self, sweep_dir: pathlib.Path) -> bool:
    return (self.workdir(sweep_dir) / COMPLETE).exists()


def parse(value, load_config: Callable, apply_override: Callable) -> dict[str, Frozen]:
  """The sweep's ``frozen`` entry, checked (kinds, config files, override fields) before
  anything runs; ``load_config(spec, what)`` / ``apply_override(config, path, value,
  shown)`` are the runner's."""
  if not value:
    return {}
  if not isinstance(value, Mapping):
    raise UserError(f"frozen={value!r}: give {{name: {{'kind': ..., 'config': ...}}}}.")
  models = {}
  for name, spec in value.items():
    shown = f"frozen[{name!r}]"
    if not isinstance(name, str) or not name.isidentifier():
      raise UserError(f"{shown}: a frozen model's name must be an identifier (used as @name).")
    if not isinstance(spec, Mapping) or set(spec) - {"kind", "config", "overrides"}:
      raise UserError(f"{shown}={spec!r}: give 'kind', 'config' and optional 'overrides'.")
    kind = spec.get("kind")
    if kind not in KINDS:
      raise UserError(f"{shown}: kind={kind!r}; choose one of {', '.join(sorted(KINDS))}.")
    if not isinstance(spec.get("config"), str):
      raise UserError(f"{shown}: 'config' must name a config file, e.g. "
                      "'configs/clip_shapes.py:noisy'.")
    overrides = dict(spec.get("overrides") or {})
    config = load_config(spec["config"], shown)
    import ml_collections
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    for path, v in overrides.items():
      apply_override(config, path, v, f"{name}.{path}")
    models[name] = Frozen(name, kind, spec["config"], tuple(overrides.items()))
  return models


def references(value: Any) -> set[str]:
  """The frozen-model names an override value refers to (``"@name"``)."""
  if isinstance(value, str) and value.startswith("@"):
    return {value[1:]}
  if isinstance(value, list | tuple):
    return set().union(*(references(v) for v in value)) if value else set()
  return set()


def resolver(models: Mapping[str, Frozen], sweep_dir: pathlib.Path) -> Callable[[Any], Any]:
  """value -> value with every ``"@name"`` replaced by that model's directory."""

  def resolve(value: Any, shown: str = "") -> Any:
    if isinstance(value, str) and value.startswith("@"):
      if value[1:] not in models:
        declared = ", ".join(f"@{n}" for n in models) or "none"
        raise UserError(f"{shown or 'override'}={value!r} names no frozen model of this sweep "
                        f"(declared: {declared}); add it to the sweep's 'frozen'.")
      return str(models[value[1:]].output(sweep_dir))
    if isinstance(value, list | tuple):
      return type(value)(resolve(v, shown) for v in value)
    return value

  return resolve


def _flag(path: str, value: Any) -> str:
  if isinstance(value, bool | int | float | str) or value is None:
    text = value if isinstance(value, str) else json.dumps(value)
  else:
    text = repr(value)
  return f"--config.{path}={text}"


def train(model: Frozen, sweep_dir: pathlib.Path, log) -> dict | None:
  """Trains ``model`` unless finished (its record), or None if another worker holds it."""
  workdir = model.workdir(sweep_dir)

  def build() -> dict:
    log(f"training frozen {model.kind} {model.name} -> {model.output(sweep_dir)}")
    command = [sys.executable, str(ROOT / model.script), f"--config={model.config}",
               f"--workdir={workdir}"] + [_flag(p, v) for p, v in model.overrides]
    start = time.time()
    with open(workdir / "train.log", "a") as out:
      r = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
      lines = (workdir / "train.log").read_text().strip().splitlines()
      raise UserError(f"frozen model {model.name!r} ({model.script}) failed: "
                      f"{lines[-1] if lines else f'exit {r.returncode}'} "
                      f"(log: {workdir / 'train.log'}).")
    if not model.output(sweep_dir).exists():
      raise UserError(f"frozen model {model.name!r}: {model.script} wrote no "
                      f"{model.output(sweep_dir)}.")
    record = {"name": model.name, "kind": model.kind, "config": model.config,
              "overrides": [list(o) for o in model.overrides],
              "directory": str(model.output(sweep_dir)), "minutes": (time.time() - start) / 60}
    eval_json = workdir / "eval.json"
    if eval_json.exists():
      record["eval"] = json.loads(eval_json.read_text())
    return record

  return claims.run_once(workdir, COMPLETE, build)


def train_all(models: Mapping[str, Frozen], sweep_dir: pathlib.Path, log) -> dict[str, dict]:
  """Every frozen model trained (waiting for those another worker holds)."""
  records: dict[str, dict] = {}
  while len(records) < len(models):
    waiting = False
    for name, model in models.items():
      if name not in records:
        record = train(model, sweep_dir, log)
        if record is None:
          waiting = True
        else:
          records[name] = record
    if waiting and len(records) < len(models):
      log("a frozen model is being trained by another worker; waiting 30 s")
      time.sleep(30)
  return records
