r"""ShapesEval colour x shape score (or a labelled real set's judge accuracy) against training
minutes and steps, one line per arm.

  python benchmarks/convergence.py --arm=old=configs/demo_base.py:previous \
      --arm=new=configs/demo_base.py --minutes=15 --eval_every=250 --images_per_prompt=2 \
      --out=docs/convergence [--override=new.train.batch_size=64 ...]

An arm is ``label=path/to/config.py[:arg]`` (a base stage). Each arm trains in turn, one at a
time, in ``<runs>/<label>`` (default runs/convergence/<name of --out>: checkpoints stay out
of docs/ and git) with the config's own recipe, and every ``--eval_every``
steps the training loop's ShapesEval evaluator (experiments/evaluating.py:
``training_evaluator``) scores the EMA params on the 48 colour x shape prompts,
``--images_per_prompt`` images each, judged by one probe shared by all arms (the cached one,
trained once on first use, or ``--probe_path``). An arm stops at the first evaluation at or
after ``--minutes`` of training (or at its config's ``train.num_steps``; ``--steps`` sets
that), so its last point may lie up to one ``--eval_every`` interval past the budget.
An arm trained on a labelled real-data set (configs/fashion_mnist.py, configs/emoji.py:base)
is scored by that set's classifier judge instead (experiments/evaluating_labelled.py: the
class accuracy over the class captions, or the emoji group over seen and held-out emoji
captions); the arms of one --out must share one score.

Training minutes are the loop's own step time (from ``metrics.jsonl``: steps x batch /
images_per_s per logged interval): evaluations, checkpoints and previews are excluded; the
first step's compilation is included, as in a training run's time budget (short when
.cache/jax holds the program; ``--cold_compile`` turns that cache off, so every arm compiles
as a fresh clone's demo does; the table's notes give each arm's first interval).
Dataset preparation and text-encoder set-up are not included.

``--override=<label>.<dotted.config.field>=<value>`` (repeatable) changes one arm's config
after the benchmark's own settings (so ``new.eval.num_steps=25`` works too); values are
Python literals (``64``, ``1e-3``, ``'sigmoid'``, ``(1, 2)``) or else plain strings.

Output in ``--out``: arms/<label>.json (each arm's settings and points), convergence.md and
convergence.csv (one row per arm and evaluation:
step, training minutes, colour x shape right / images, accuracy, Wilson 95% CI, held-out
right / images, evaluation seconds) and convergence.png (score against minutes and against
steps, 95% bands). A finished arm (its arms/<label>.json) is not run again: a rerun with the
same arms only rewrites the table and plot; an arm whose settings changed is refused (use
another --out or delete that file); an interrupted arm is restarted (its workdir moved to
``<label>.interrupted``), because a resumed run would count a second compilation as
training time. Relative paths in a config (data.data_dir, text.cache_dir) are from the
current directory, as for experiments/train.py: run from the repository root.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import math
import pathlib
import re
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import cli  # noqa: E402
from cli import UserError  # noqa: E402

CATEGORY = "colour_shape"
# What each score is called in the table and the plot.
TITLES = {"colour_shape": "ShapesEval colour x shape", "class": "The judge's class accuracy",
          "emoji_group": "The judge's emoji-group accuracy"}
LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")
COLUMNS = ("arm", "step", "train_minutes", "correct", "n", "accuracy", "ci_low", "ci_high",
           "held_out_correct", "held_out_n", "held_out_accuracy", "eval_seconds")


@dataclasses.dataclass(frozen=True)
class Arm:
  label: str
  spec: str
  overrides: tuple[tuple[str, str], ...] = ()


class BudgetReached(Exception):  # noqa: N818  (not an error: how an arm's training stops)
  """Raised by the recording evaluator after the evaluation that reached the time budget:
  the loop's own ``time_budget_s`` would count the evaluations' time as training time. (That
  last point is in the arm's record, not in the run's metrics.jsonl.)"""


# ----------------------------------------------------------------------------------------------
# Arguments -> arms and their configs (every check before anything trains).


def parse_arms(arm_args: list[str], override_args: list[str]) -> list[Arm]:
  if not arm_args:
    raise UserError("give at least one --arm=<label>=<config.py[:arg]>.")
  arms: dict[str, Arm] = {}
  for text in arm_args:
    label, sep, spec = text.partition("=")
    if not sep or not label or not spec:
      raise UserError(f"--arm={text!r}: write --arm=<label>=<config.py[:arg]>, e.g. "
                      "--arm=new=configs/demo_base.py.")
    if not LABEL.match(label):
      raise UserError(f"--arm={text!r}: the label {label!r} may use letters, digits and "
                      "_ . + - only (it names a directory).")
    if label in arms:
      raise UserError(f"--arm={text!r}: label {label!r} is given twice.")
    arms[label] = Arm(label, spec)
  for text in override_args:
    target, sep, value = text.partition("=")
    label, dot, path = target.partition(".")
    if not sep or not dot or not path:
      raise UserError(f"--override={text!r}: write --override=<label>.<config.field>=<value>, "
                      "e.g. --override=new.train.batch_size=64.")
    if label not in arms:
      raise UserError(f"--override={text!r}: no arm is labelled {label!r} (arms: "
                      f"{', '.join(arms)}).")
    arm = arms[label]
    arms[label] = dataclasses.replace(arm, overrides=arm.overrides + ((path, value),))
  return list(arms.values())


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def arm_config(arm: Arm, *, eval_every: int, images_per_prompt: int, eval_steps: int | None,
               steps: int | None):
  """The arm's config with the benchmark's settings, then the arm's overrides (checked)."""
  import ablation_runner

  config = ablation_runner.load_python_config(arm.spec, f"--arm {arm.label}")
  config = type(config)(config.to_dict())  # a copy, unlocked
  config.eval.every = eval_every
  config.eval.categories = (CATEGORY,)
  config.eval.images_per_prompt = images_per_prompt
  if eval_steps is not None:
    config.eval.num_steps = eval_steps
  if steps is not None:
    config.train.num_steps = steps
  config.train.time_budget_s = None  # the recording evaluator stops the arm (BudgetReached)
  config.train.preview_every = 0
  for path, value in arm.overrides:
    try:
      ablation_runner.apply_override(config, path, _literal(value), f"{arm.label}.{path}")
    except UserError as e:
      raise UserError(str(e).replace("axis ", "--override ", 1)) from None
  every = config.eval.every
  if not isinstance(every, int) or every < 1:
    raise UserError(f"arm {arm.label}: eval.every={every!r}; it must be an integer >= 1.")
  # Every evaluation step needs its own log line (its training time) and checkpoint.
  config.train.log_every = math.gcd(config.train.log_every, every)
  config.train.checkpoint_every = every
  ablation_runner.check_stage_config(config, f"arm {arm.label}")
  import builders

  if builders.unet_config(config).super_resolution:
    raise UserError(f"arm {arm.label}: {arm.spec} is a super-resolution stage; ShapesEval "
                    "scores a base (text-to-image) stage alone.")
  if config.text.trainable:
    raise UserError(f"arm {arm.label}: in-training ShapesEval does not support a trainable "
                    "text encoder (config.text.trainable=True).")
  return config


# ----------------------------------------------------------------------------------------------
# One arm: train with a recording evaluator.


def training_seconds(metrics_path: pathlib.Path, batch_size: int, upto: int) -> float:
  """Step time up to step ``upto`` from the loop's log lines: each logged interval took
  (its steps x batch_size / images_per_s) seconds, pauses (evaluations, checkpoints,
  previews) excluded by the loop. Needs a log line at ``upto``."""
  seconds, previous, found = 0.0, 0, False
  lines = [json.loads(s) for s in metrics_path.read_text().splitlines() if s.strip()]
  for record in sorted((r for r in lines if "images_per_s" in r), key=lambda r: r["step"]):
    if record["step"] > upto:
      break
    seconds += (record["step"] - previous) * batch_size / record["images_per_s"]
    previous, found = record["step"], record["step"] == upto
  if not found:
    raise RuntimeError(f"{metrics_path} has no log line at step {upto} (log_every must "
                       "divide eval_every).")
  return seconds


def first_interval(metrics_path: pathlib.Path, batch_size: int) -> dict:
  """{"steps", "seconds"} of the first logged interval (it holds the compilation)."""
  lines = [json.loads(s) for s in metrics_path.read_text().splitlines() if s.strip()]
  first = min((r for r in lines if "images_per_s" in r), key=lambda r: r["step"])
  return {"steps": first["step"], "seconds": first["step"] * batch_size / first["images_per_s"]}


def scored_layout(config) -> tuple[str, int, int]:
  """(category, images scored, held-out images scored) by the arm's in-training evaluator."""
  import evaluating_labelled

  from diffusion_jax.evaluation import shapes_eval

  if evaluating_labelled.labelled_dataset(config):
    return evaluating_labelled.scored_counts(config)
  prompts = shapes_eval.suite([CATEGORY])
  ipp = int(config.eval.images_per_prompt)
  return CATEGORY, len(prompts) * ipp, sum(p.held_out for p in prompts) * ipp


def _point(step: int, seconds: float, eval_seconds: float, scalars: dict,
           layout: tuple[str, int, int]) -> dict:
  from diffusion_jax.evaluation import shapes_eval

  category, n, n_held = layout
  # The evaluator reports fractions k / n of a known n: k back exactly by rounding.
  correct = round(scalars[f"eval/{category}/all"] * n)
  held = round(scalars[f"eval/{category}/held_out"] * n_held) if n_held else 0
  low, high = shapes_eval.wilson_interval(correct, n)
  return {"step": step, "train_minutes": seconds / 60, "correct": correct, "n": n,
          "accuracy": correct / n, "ci_low": low, "ci_high": high,
          "held_out_correct": held, "held_out_n": n_held,
          "held_out_accuracy": held / n_held if n_held else math.nan,
          "eval_seconds": eval_seconds}


def recording_evaluator(inner, workdir: pathlib.Path, points: list, budget_s: float | None,
                        batch_size: int, layout: tuple[str, int, int], log):
  """``inner`` (the loop's evaluator) timed; each point appended to ``points``; raises
  BudgetReached after the evaluation at or past ``budget_s`` seconds of training."""

  def evaluate(state, step):
    seconds = training_seconds(workdir / "metrics.jsonl", batch_size, step)
    start = time.perf_counter()
    scalars = inner(state, step)
    point = _point(step, seconds, time.perf_counter() - start, scalars, layout)
    points.append(point)
    log(f"[convergence] step {step}, {point['train_minutes']:.2f} training min: "
        f"{layout[0]} {point['correct']}/{point['n']} = {point['accuracy']:.3f} "
        f"[{point['ci_low']:.3f}, {point['ci_high']:.3f}], held-out "
        f"{point['held_out_correct']}/{point['held_out_n']} "
        f"(evaluation {point['eval_seconds']:.0f} s)")
    if budget_s is not None and seconds >= budget_s:
      raise BudgetReached(step)
    return scalars

  return evaluate


# Where files live, not what is trained: a rerun from another checkout or data directory
# reuses the arm.
_WHERE_FILES_LIVE = (("data", "data_dir"), ("data", "source_dir"), ("data", "prepare"),
                     ("text", "cache_dir"))


def settings_record(arm: Arm, config, minutes: float | None) -> dict:
  """What an arm's result depends on, compared when a rerun finds the arm finished."""
  record = json.loads(json.dumps({"spec": arm.spec, "minutes": minutes,
                                  "config": config.to_dict()}, default=str))
  for section, field in _WHERE_FILES_LIVE:
    record["config"].get(section, {}).pop(field, None)
  return record


def run_arm(arm: Arm, config, done: pathlib.Path, workdir: pathlib.Path,
            minutes: float | None, probe, log=print) -> dict:
  """The arm's record, stored in ``done`` (``<out>/arms/<label>.json``), from its training
  run in ``workdir``; a finished record is reused if its settings match."""
  import builders
  import evaluating

  settings = settings_record(arm, config, minutes)
  if done.exists():
    stored = json.loads(done.read_text())
    compared = _without_added(stored["settings"], settings, _default_settings())
    if stored["settings"] != compared:
      raise UserError(f"arm {arm.label}: {done} is a finished arm measured with other "
                      f"settings ({_first_difference(stored['settings'], compared)}); use "
                      "another --out or delete that file.")
    log(f"[convergence] arm {arm.label}: finished ({done}), not rerun.")
    return stored
  if workdir.exists():
    aside = workdir.with_name(workdir.name + ".interrupted")
    shutil.rmtree(aside, ignore_errors=True)
    workdir.rename(aside)
    log(f"[convergence] arm {arm.label}: an unfinished run was moved to {aside}; "
        "restarting it.")
  points: list[dict] = []
  layout = []  # known once the data is prepared (a labelled set's prompts are read from it)

  def make_evaluator(config, model_cfg, text_encoder, kind):
    layout.append(scored_layout(config))
    inner = evaluating.training_evaluator(config, model_cfg, text_encoder, kind, log=log,
                                          probe=probe)
    return recording_evaluator(inner, workdir, points, None if minutes is None else
                               minutes * 60, config.train.batch_size, layout[0], log)

  log(f"[convergence] arm {arm.label}: training {arm.spec} in {workdir} "
      f"({f'{minutes:g} min' if minutes else 'no time budget'}, at most "
      f"{config.train.num_steps} steps, scored every {config.eval.every} steps) ...")
  start = time.time()
  try:
    builders.run_training(config, str(workdir), make_evaluator=make_evaluator)
    # (the loop's own time budget only if an --override set train.time_budget_s)
    stopped = ("train.num_steps" if points and points[-1]["step"] >= config.train.num_steps
               else "train.time_budget_s")
  except BudgetReached:
    stopped = "--minutes"
  record = {"label": arm.label, "metric": layout[0][0], "settings": settings,
            "stopped_by": stopped,
            "wall_minutes": (time.time() - start) / 60, "points": points,
            # The first interval holds the compilation (short if .cache/jax has it).
            "first_interval": first_interval(workdir / "metrics.jsonl",
                                             config.train.batch_size)}
  tmp = done.with_name(f".{done.name}.tmp")
  tmp.write_text(json.dumps(record, indent=2))
  tmp.replace(done)
  return record


def _default_settings() -> dict:
  """The settings record's config part for the configs' defaults (configs/common.py)."""
  from configs import common

  config = json.loads(json.dumps(common.get_config().to_dict(), default=str))
  for section, field in _WHERE_FILES_LIVE:
    config.get(section, {}).pop(field, None)
  return {"config": config}


def _without_added(stored, now, default):
  """``now`` without the fields ``stored`` lacks that are unset (None) or at their default:
  a config field added after an arm finished, left so, keeps that arm's behaviour (the
  codebase's rule for new fields), so the arm need not be rerun."""
  if not isinstance(stored, dict) or not isinstance(now, dict):
    return now
  default = default if isinstance(default, dict) else {}
  out = {}
  for key, value in now.items():
    if key in stored:
      out[key] = _without_added(stored[key], value, default.get(key))
    elif isinstance(value, dict):  # a section added since: only its changed fields count
      if changed := _without_added({}, value, default.get(key)):
        out[key] = changed
    elif not (value is None or value == default.get(key)):
      out[key] = value
  return out


def _first_difference(a, b, path="") -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
  return f"{path or 'value'}: {a!r} then, {b!r} now"


# ----------------------------------------------------------------------------------------------
# Table and plot.


def rows(records: list[dict]) -> list[dict]:
  return [{"arm": r["label"], **{k: p[k] for k in COLUMNS[1:]}}
          for r in records for p in r["points"]]


def _title(records: list[dict]) -> str:
  # (records of an earlier version have no "metric": they were all ShapesEval's)
  return TITLES[records[0].get("metric", CATEGORY)] if records else TITLES[CATEGORY]


def markdown(records: list[dict], note: str = "") -> str:
  lines = [f"{_title(records)} against training time" + (f" ({note})" if note else ""),
           "", "| arm | step | train min | right / images | accuracy | 95% CI | held-out "
           "right | eval s |", "|---|---|---|---|---|---|---|---|"]
  for row in rows(records):
    held = (f"{row['held_out_correct']} / {row['held_out_n']}" if row["held_out_n"]
            else "-")  # (a class set holds no prompt out)
    lines.append(f"| {row['arm']} | {row['step']} | {row['train_minutes']:.2f} | "
                 f"{row['correct']} / {row['n']} | {row['accuracy']:.3f} | "
                 f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] | {held} | "
                 f"{row['eval_seconds']:.0f} |")
  for r in records:
    s = r["settings"]
    first = r.get("first_interval")  # (absent from records of an earlier version)
    lines.append(f"\n{r['label']}: {s['spec']}, stopped by {r['stopped_by']}; "
                 f"{r['wall_minutes']:.1f} wall minutes with evaluations" + (
                     f"; its first {first['steps']} step(s), compilation included, took "
                     f"{first['seconds']:.1f} s." if first else "."))
  return "\n".join(lines) + "\n"


def write_csv(records: list[dict], path: pathlib.Path) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows(records))


def plot(records: list[dict], path: pathlib.Path, note: str = "") -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, x_key, x_label in ((axes[0], "train_minutes", "training minutes (evaluation "
                              "excluded)"), (axes[1], "step", "training steps")):
    for r in records:
      points = r["points"]
      if not points:
        continue
      xs = [p[x_key] for p in points]
      line, = ax.plot(xs, [p["accuracy"] for p in points], marker="o", label=r["label"])
      ax.fill_between(xs, [p["ci_low"] for p in points], [p["ci_high"] for p in points],
                      color=line.get_color(), alpha=0.18, linewidth=0)
      if any(p["held_out_n"] for p in points):
        ax.plot(xs, [p["held_out_accuracy"] for p in points], linestyle=":", marker=".",
                color=line.get_color(), label=f"{r['label']} held-out")
    if _title(records) == TITLES[CATEGORY]:
      ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)  # issue 16's target
    ax.set_xlim(left=0)
    ax.set_xlabel(x_label)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"{_title(records)} (95% Wilson band)")
  axes[1].legend(fontsize=7, loc="upper left")  # scores start low: keep them visible
  fig.suptitle(f"{_title(records)} against training" + (f" — {note}" if note else ""),
               fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(records: list[dict], out: pathlib.Path, note: str = "", log=print) -> None:
  (out / "convergence.md").write_text(markdown(records, note))
  write_csv(records, out / "convergence.csv")
  plot(records, out / "convergence.png", note)
  log(markdown(records, note))
  log(f"[convergence] wrote {out / 'convergence.md'}, {out / 'convergence.csv'} and "
      f"{out / 'convergence.png'}")


# ----------------------------------------------------------------------------------------------


def run(*, arms: list[Arm], out, minutes: float | None, eval_every: int,
        images_per_prompt: int, eval_steps: int | None = None, steps: int | None = None,
        probe_path=None, note: str = "", cold_compile: bool = False, runs=None,
        log=print) -> list[dict]:
  """Every arm checked, then trained (in ``runs``/<label>) and scored in turn (finished
  ones reused); the records, table and plot written into ``out``. Returns the records."""
  if minutes is not None and minutes <= 0:
    raise UserError(f"--minutes={minutes}; it must be positive.")
  for name, value in (("eval_every", eval_every), ("images_per_prompt", images_per_prompt),
                      ("eval_steps", eval_steps), ("steps", steps)):
    if value is not None and value < 1:
      raise UserError(f"--{name}={value}; it must be >= 1.")
  if minutes is None and steps is None:
    raise UserError("give --minutes (a training-time budget per arm) and/or --steps.")
  if probe_path and not pathlib.Path(probe_path).is_file():
    raise UserError(f"--probe_path {probe_path} does not exist; omit it to use (and on first "
                    "use train) the cached probe.")
  configs = {a.label: arm_config(a, eval_every=eval_every, images_per_prompt=images_per_prompt,
                                 eval_steps=eval_steps, steps=steps) for a in arms}
  import evaluating_labelled

  scored_by = {a.label: evaluating_labelled.labelled_dataset(configs[a.label]) or "shapes"
               for a in arms}
  if len(set(scored_by.values())) > 1:
    raise UserError("the arms train on different data sets "
                    f"({', '.join(f'{k}: {v}' for k, v in scored_by.items())}), so their "
                    "scores differ; give each data set its own --out.")
  out = pathlib.Path(out)
  runs = pathlib.Path(runs) if runs else ROOT / "runs" / "convergence" / out.resolve().name
  for flag, path in (("--out", out / "arms"), ("--runs", runs)):
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UserError(f"{flag}={path}: cannot create it ({e.strerror}).") from None
  import builders

  builders.setup_compilation_cache()
  if cold_compile:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
  probe = None
  records = []
  for arm in arms:
    done = out / "arms" / f"{arm.label}.json"
    if probe is None and not done.exists() and scored_by[arm.label] == "shapes":  # once
      from diffusion_jax.evaluation import probe as probe_lib

      probe = (probe_lib.load(probe_path) if probe_path else
               probe_lib.load_or_train(log=log))
    records.append(run_arm(arm, configs[arm.label], done, runs / arm.label, minutes, probe,
                           log))
  write_report(records, out, note, log)
  return records


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arm", action="append", default=[],
                      help="label=path/to/config.py[:arg] (repeat for several arms)")
  parser.add_argument("--override", action="append", default=[],
                      help="label.dotted.config.field=value (repeatable)")
  parser.add_argument("--minutes", type=float, default=None,
                      help="training minutes per arm (evaluation excluded)")
  parser.add_argument("--steps", type=int, default=None,
                      help="train.num_steps of every arm (default: the config's)")
  parser.add_argument("--eval_every", type=int, default=250)
  parser.add_argument("--images_per_prompt", type=int, default=2)
  parser.add_argument("--eval_steps", type=int, default=50,
                      help="DDIM steps of the evaluation samples (50: like the demo's score)")
  parser.add_argument("--probe_path", default=None, help="a saved probe (default: the cached)")
  parser.add_argument("--cold_compile", action="store_true",
                      help="no persistent compilation cache: every arm's time includes a "
                      "full compilation, as in a fresh clone's demo")
  parser.add_argument("--out", default=str(ROOT / "docs" / "convergence"),
                      help="table, plot and arms/<label>.json records (small files)")
  parser.add_argument("--runs", default=None, help="the arms' training workdirs "
                      "(default runs/convergence/<name of --out>, outside git)")
  parser.add_argument("--note", default="", help="shown in the plot title and table, e.g. "
                      "'contended machine'")
  args = parser.parse_args(argv)
  cli.call_main(lambda: run(arms=parse_arms(args.arm, args.override), out=args.out,
                            minutes=args.minutes, eval_every=args.eval_every,
                            images_per_prompt=args.images_per_prompt,
                            eval_steps=args.eval_steps, steps=args.steps,
                            probe_path=args.probe_path, note=args.note,
                            cold_compile=args.cold_compile, runs=args.runs))


if __name__ == "__main__":
  main()
