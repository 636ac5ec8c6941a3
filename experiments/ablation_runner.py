"""The body of experiments/ablate.py: a sweep config -> checked arms -> training runs and
evaluations claimed one at a time -> result.json per arm -> tables and plots.

Every check (axis paths and values against the stages' configs, the evaluation
settings) runs before anything trains, raising builders.UserError with one line.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import time
from typing import Any

import ablation_frozen
import builders
import ml_collections
from builders import UserError

from diffusion_jax.ablation import claims, report
from diffusion_jax.ablation import sweep as sweep_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN_COMPLETE = "train_complete.json"


def load_python_config(spec: str, what: str) -> ml_collections.ConfigDict:
  """``path/to/file.py[:arg]`` -> its get_config(arg) (relative paths from the repo)."""
  path_text, _, arg = spec.partition(":")
  path = pathlib.Path(path_text)
  if not path.is_absolute() and not path.exists():
    path = ROOT / path
  if not path.is_file():
    raise UserError(f"{what} {spec!r}: no such config file.")
  module_spec = importlib.util.spec_from_file_location(f"_sweep_cfg_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None) if arg else module.get_config()
  except Exception as e:  # a config file's own error, reported in one line
    raise UserError(f"{what} {spec!r}: {type(e).__name__}: {e}") from None


def load_sweep(spec: str) -> tuple[sweep_lib.Sweep, dict]:
  """A sweep file's get_config(): a plain dict (its override paths have dots, which
  ConfigDict keys cannot)."""
  c = load_python_config(spec, "--sweep")
  if isinstance(c, ml_collections.ConfigDict):
    c = c.to_dict()
  if not isinstance(c, dict) or "stages" not in c:
    raise UserError(f"--sweep {spec}: get_config() must return a dict with 'stages' (stage "
                    "name -> config file) and 'axes' and/or 'arms'.")
  as_dict = dict
  try:
    sweep = sweep_lib.Sweep.create(
        name=c.get("name", pathlib.Path(spec.partition(":")[0]).stem),
        stage_configs=as_dict(c["stages"]), stage_sets=as_dict(c.get("stage_sets", {})) or None,
        axes=as_dict(c.get("axes", {})), arms=[as_dict(a) for a in c.get("arms", ())],
        fixed=as_dict(c.get("fixed", {})))
  except sweep_lib.SweepError as e:
    raise UserError(f"--sweep {spec}: {e}") from None
  for within in dict(c.get("report", {})).get("within", ()):
    keys, required = set(within), {"metric", "reference", "group", "cost"}
    if not required <= keys or keys - required - {"tolerance"}:
      raise UserError(f"--sweep {spec}: report 'within' entry {within!r} needs exactly "
                      "metric, reference, group, cost and optional tolerance.")
  return sweep, c


def _identity(value, shown=""):
  del shown
  return value


def stage_config(sweep: sweep_lib.Sweep, arm: sweep_lib.Arm, stage: str,
                 cache: dict, resolve=_identity) -> ml_collections.ConfigDict:
  """The stage's config file with the arm's overrides of that stage applied (checked);
  ``resolve`` turns ``"@name"`` values into frozen models' directories."""
  spec = sweep.config_file(stage)
  if spec not in cache:
    cache[spec] = load_python_config(spec, f"stage {stage!r}")
  config = ml_collections.ConfigDict(cache[spec].to_dict())  # a copy, unlocked
  for path, value in sweep.stage_overrides(arm, stage).items():
    shown = f"{stage}.{path}"
    apply_override(config, path, resolve(value, shown), shown)
  return config


def apply_override(config: ml_collections.ConfigDict, path: str, value: Any,
                   shown: str) -> None:
  *parents, leaf = path.split(".")
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise UserError(f"axis {shown!r}: the config has no field "
                      f"{'.'.join(parents[:i + 1])!r}.")
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise UserError(f"axis {shown!r}: the config has no field {path!r}.")
  if isinstance(value, tuple) and not isinstance(node[leaf], tuple):
    value = list(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise UserError(f"axis {shown!r}: value {value!r} does not fit the field ({e}).") \
        from None


def check_stage_config(config: ml_collections.ConfigDict, shown: str) -> None:
  """The config-only checks of builders (no data, no encoder, nothing compiled)."""
  try:
    builders.unet_config(config)
    builders.step_settings(config)
    builders.optimizer_settings(config)
    builders.loop_settings(config)
  except UserError as e:
    raise UserError(f"{shown}: {e}") from None


def equal_compute_budgets(sweep: sweep_lib.Sweep, value) -> dict[str, float]:
  """A sweep's ``equal_compute`` ({stage: TFLOP of each of its training runs}), checked."""
  if value is None:
    return {}
  stages = dict(sweep.stage_configs)
  if not isinstance(value, dict):
    raise UserError(f"equal_compute={value!r}: give {{stage: TFLOP per training run}}, e.g. "
                    "{'base': 100.0}.")
  for stage, tflop in value.items():
    if stage not in stages:
      raise UserError(f"equal_compute: {stage!r} is not a stage of this sweep (stages: "
                      f"{', '.join(stages)}).")
    if isinstance(tflop, bool) or not isinstance(tflop, int | float) or not tflop > 0:
      raise UserError(f"equal_compute[{stage!r}]={tflop!r}: give a positive number of TFLOP.")
  return {k: float(v) for k, v in value.items()}


def apply_compute_budget(config, tflop: float, shown: str) -> dict:
  """Sets ``config.train.num_steps`` so the run's train steps cost ``tflop`` (model FLOPs,
  experiments/train_flops.py), its time budget off; returns what was counted."""
  import train_flops

  gflop = train_flops.step_gflop(config)
  steps = int(tflop * 1e3 // gflop)
  if steps < 1:
    raise UserError(f"{shown}: equal_compute gives {tflop:g} TFLOP, less than one train step "
                    f"({gflop / 1e3:.3g} TFLOP).")
  config.train.num_steps, config.train.time_budget_s = steps, None
  return {"gflop_per_step": gflop, "budget_tflop": tflop}


def plan(sweep: sweep_lib.Sweep, evaluator, equal_compute=None, resolve=_identity,
         count_flops: bool = True) -> list[dict]:
  """Every arm with its stages' configs and training-run directories, all checked;
  ``equal_compute`` ({stage: TFLOP}) sets each such stage's steps from its step's FLOPs
  (``count_flops=False`` defers that count, for stages whose frozen models are not trained
  yet); ``resolve`` replaces ``"@name"`` override values (ablation_frozen)."""
  budgets = equal_compute_budgets(sweep, equal_compute)
  cache: dict = {}
  planned = []
  for arm in sweep.expand():
    stages = sweep.stages_of(arm)
    configs, compute = {}, {}
    for stage in stages:
      config = stage_config(sweep, arm, stage, cache, resolve)
      shown = f"arm {arm.name}, stage {stage!r}"
      check_stage_config(config, shown)
      if stage in budgets and count_flops:
        compute[stage] = apply_compute_budget(config, budgets[stage], shown)
      configs[stage] = config
    sample = {k: resolve(v, f"sample.{k}") for k, v in arm.sample_overrides.items()}
    evaluator.check(sample, num_stages=len(stages), shown=f"arm {arm.name}")
    planned.append({"arm": arm, "stages": stages, "configs": configs, "compute": compute,
                    "sample": sample,
                    "runs": {s: sweep.stage_run_name(arm, s) for s in stages}})
  return planned


def _train_run(workdir: pathlib.Path, config: ml_collections.ConfigDict, log,
               compute: dict | None = None) -> dict | None:
  """Trains one stage's run unless finished; None if another worker holds it. ``compute``
  (apply_compute_budget's): the record gets the run's model FLOPs."""

  def build() -> dict:
    log(f"training {workdir}")
    start = time.time()
    _, summary = builders.run_training(config, str(workdir))
    steps = _last_step(workdir)
    record = {"workdir": str(workdir), "steps": steps,
              "minutes": (time.time() - start) / 60,
              "images_per_s": summary.get("images_per_s")}
    if compute:
      record.update(compute, train_tflop=(steps or 0) * compute["gflop_per_step"] / 1e3)
    return record

  return claims.run_once(workdir, TRAIN_COMPLETE, build)


def _last_step(workdir: pathlib.Path) -> int | None:
  metrics = workdir / "metrics.jsonl"
  if not metrics.exists():
    return None
  lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
  return lines[-1]["step"] if lines else None


def _progress(done: int, running: int, left: int, durations: list[float], log) -> None:
  eta = ""
  if durations and left:
    eta = f", ETA {sum(durations) / len(durations) * left / 60:.1f} min (this worker)"
  log(f"arms: {done} done, {running} running elsewhere, {left} left{eta}")


def run(sweep_spec: str, root: str, *, report_only: bool = False, dry_run: bool = False,
        worker: str = "", max_arms: int | None = None, evaluator=None, log=None,
        export: str | None = None) -> list[dict]:
  """Runs (or reports) a sweep; returns the finished arms' result records. ``export``: a
  directory (e.g. docs/ablations/<sweep>) that gets a copy of the report."""
  import evaluation_adapter

  log = log or (lambda msg: print(f"[ablate{':' + worker if worker else ''}] {msg}",
                                  flush=True))
  sweep, c = load_sweep(sweep_spec)
  sweep_dir = pathlib.Path(root) / sweep.name
  evaluator = evaluator or evaluation_adapter.ShapesEvaluator(dict(c.get("evaluate", {})))
  frozen = ablation_frozen.parse(c.get("frozen"), load_python_config, apply_override)
  resolve = ablation_frozen.resolver(frozen, sweep_dir)
  ready = all(m.ready(sweep_dir) for m in frozen.values())
  # Every check before anything runs; FLOP counts that need an untrained frozen model (a
  # latent stage's autoencoder) wait until it is trained.
  planned = plan(sweep, evaluator, c.get("equal_compute"), resolve, count_flops=ready)
  if dry_run:
    for m in frozen.values():
      log(f"frozen {m.kind} {m.name} ({m.config}) -> frozen/{m.name}"
          + (" (trained)" if m.ready(sweep_dir) else ""))
    for p in planned:
      log(f"{p['arm'].name}: " + ", ".join(f"{s} <- train/{s}/{r}" for s, r in
                                           p["runs"].items()))
    return []
  if not report_only:
    frozen_records = ablation_frozen.train_all(frozen, sweep_dir, log)
    if not ready:
      planned = plan(sweep, evaluator, c.get("equal_compute"), resolve)
    _run_arms(sweep_dir, planned, evaluator, worker, max_arms, log, frozen_records)
  records = report.collect(sweep_dir)
  if records:
    write_report(sweep_dir, records, c.get("report", {}))
    log(f"wrote {sweep_dir / 'results.md'}, results.csv and plots/ ({len(records)} arms)")
    if export:
      export_report(sweep_dir, pathlib.Path(export))
      log(f"copied the report to {export}")
  return records


def export_report(sweep_dir: pathlib.Path, dest: pathlib.Path) -> None:
  """The tables, plots and each arm's result.json and examples.png (no checkpoints) copied
  to ``dest``, for docs/."""
  import shutil

  dest.mkdir(parents=True, exist_ok=True)
  for name in ("results.md", "results.csv"):
    shutil.copy2(sweep_dir / name, dest / name)
  if (sweep_dir / "plots").is_dir():
    shutil.copytree(sweep_dir / "plots", dest / "plots", dirs_exist_ok=True)
  for arm in sorted((sweep_dir / "arms").glob(f"*/{report.RESULT_FILE}")):
    out = dest / "arms" / arm.parent.name
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(arm, out / arm.name)
    if (arm.parent / "examples.png").exists():
      shutil.copy2(arm.parent / "examples.png", out / "examples.png")


def _run_arms(sweep_dir, planned, evaluator, worker, max_arms, log, frozen=None) -> None:
  finished_here, durations = 0, []
  while True:
    pending = [p for p in planned
               if not (sweep_dir / "arms" / p["arm"].name / report.RESULT_FILE).exists()]
    done = len(planned) - len(pending)
    running = sum(1 for p in pending if claims.read_claim(
        sweep_dir / "arms" / p["arm"].name) is not None)
    _progress(done, running, len(pending) - running, durations, log)
    if not pending or (max_arms is not None and finished_here >= max_arms):
      return
    progressed = False
    for p in pending:
      arm_dir = sweep_dir / "arms" / p["arm"].name
      claim = claims.try_claim(arm_dir, worker=worker)
      if claim is None:
        continue
      with claim:
        if (arm_dir / report.RESULT_FILE).exists():
          continue
        start = time.time()
        train = {}
        for stage in p["stages"]:
          workdir = sweep_dir / "train" / stage / p["runs"][stage]
          record = _train_run(workdir, p["configs"][stage], log, p["compute"].get(stage))
          if record is None:
            break  # another worker trains it; try another arm meanwhile
          train[stage] = record
        if len(train) < len(p["stages"]):
          continue
        log(f"evaluating {p['arm'].name}")
        sample_start = time.time()
        metrics = evaluator.evaluate([train[s]["workdir"] for s in p["stages"]], arm_dir,
                                     p["sample"])
        arm = p["arm"]
        record = {"name": arm.name, "overrides": list(arm.overrides),
                  "varying": list(arm.varying), "stages": list(p["stages"]), "train": train,
                  "metrics": metrics, "eval_minutes": (time.time() - start) / 60,
                  "sample_minutes": (time.time() - sample_start) / 60}
        if frozen:
          record["frozen"] = frozen
        claims.write_json(arm_dir / report.RESULT_FILE, record)
      durations.append(time.time() - start)
      finished_here += 1
      progressed = True
      break
    if not progressed:
      log("every pending arm is claimed by another worker; waiting 30 s")
      time.sleep(30)


def write_report(sweep_dir: pathlib.Path, records: list[dict], spec) -> None:
  """Tables, then plots: every metric against every varying axis; the Pareto fronts and
  training curves the sweep's ``report`` asks for."""
  spec = dict(spec)
  sections = []
  for within in spec.get("within", ()):  # e.g. the cheapest steps near 250-step DDIM
    sections += report.within_reference(records, **within) + [""]
  report.write_tables(sweep_dir, records, sections)
  plots = sweep_dir / "plots"
  metrics = spec.get("metrics") or sorted({m for r in records for m in r.get("metrics", {})})
  axes = list(dict.fromkeys(p for r in records for p in r.get("varying", [])))
  for axis in axes:
    for metric in metrics:
      name = f"{metric}_vs_{axis.rsplit('.', 1)[-1]}.png".replace("/", "_")
      report.plot_metric_vs_axis(records, axis, metric, plots / name)
  for x_metric, y_metric, label_axis in spec.get("pareto", ()):
    report.plot_pareto(records, x_metric, y_metric, label_axis,
                       plots / f"pareto_{y_metric}_vs_{x_metric}.png")
  series = {}
  for r in records:
    for stage, t in r.get("train", {}).items():
      path = pathlib.Path(t["workdir"]) / "metrics.jsonl"
      if path.exists():
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        series[f"{stage}/{pathlib.Path(t['workdir']).name}"] = [
            (x["step"], x["loss"]) for x in lines if "loss" in x]
  if series:
    report.plot_curves(series, "step", "training loss", plots / "loss_curves.png")
