"""Result tables and plots of a sweep, regenerated from its arms' files at any time.

Every finished arm leaves ``arms/<name>/result.json``: its overrides, what its training
runs did (steps, minutes, images/s) and its evaluation's metrics, each metric a
``{"value", "low", "high"}`` triple (``low``/``high``: the confidence interval, or None).
``collect`` reads them; ``write_tables`` writes ``results.csv`` and ``results.md``;
``plot_metric_vs_axis``, ``plot_pareto`` and ``plot_curves`` write matplotlib PNGs.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

RESULT_FILE = "result.json"


def collect(sweep_dir: str | pathlib.Path) -> list[dict]:
  """Every finished arm's result record, in arm-name order."""
  arms = pathlib.Path(sweep_dir) / "arms"
  records = []
  for path in sorted(arms.glob(f"*/{RESULT_FILE}")):
    try:
      records.append(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); delete it to re-run that arm.") \
          from None
  return records


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return str(value)


def _metric_text(m: dict) -> str:
  if m.get("value") is None:
    return ""
  text = _format(float(m["value"]))
  if m.get("low") is not None and m.get("high") is not None:
    text += f" [{_format(float(m['low']))}, {_format(float(m['high']))}]"
  return text


def table_rows(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
  """(header, rows): one row per arm: its varying settings, training cost, every metric
  with its interval."""
  varying = list(dict.fromkeys(p for r in records for p in r.get("varying", [])))
  metrics = list(dict.fromkeys(m for r in records for m in r.get("metrics", {})))
  costs = _cost_columns(records)
  header = ["arm", *varying, *costs, *metrics]
  rows = []
  for r in records:
    overrides = dict((p, v) for p, v in r.get("overrides", []))
    train = r.get("train", {})
    steps = "+".join(str(t.get("steps", "")) for t in train.values())
    minutes = sum(float(t.get("minutes") or 0.0) for t in train.values())
    cost = [steps, f"{minutes:.1f}"]
    if _counted(records):  # equal-compute sweeps: the model FLOPs each arm's runs cost
      cost.append("+".join(f"{t['train_tflop']:.4g}" if "train_tflop" in t else "-"
                           for t in train.values()))
    if _sampled(records):  # the evaluation's own time: sampling and scoring
      cost.append(f"{r['sample_minutes']:.2f}" if "sample_minutes" in r else "-")
    rows.append([r["name"], *[_format(overrides.get(p, "")) for p in varying], *cost,
                 *[_metric_text(r.get("metrics", {}).get(m, {})) for m in metrics]])
  return header, rows


def within_reference(records: Sequence[dict], metric: str, reference: dict[str, Any],
                     group: str, cost: str, tolerance: float = 0.05) -> list[str]:
  """Markdown lines: per value of ``group`` (e.g. the sampler), the cheapest ``cost`` (e.g.
  steps) from which every tested larger cost keeps ``metric`` within ``tolerance``
  (relative) of the reference arm's (the arm whose overrides include ``reference``, e.g.
  250-step DDIM); arms are compared on their point values (their intervals are in the
  table above)."""
  def overrides(r):
    return dict((p, v) for p, v in r.get("overrides", []))

  def value(r):
    m = r.get("metrics", {}).get(metric) or {}
    return None if m.get("value") is None else float(m["value"])

  refs = [r for r in records if all(overrides(r).get(k) == v for k, v in reference.items())]
  if not refs or value(refs[0]) is None:
    return []
  ref = value(refs[0])
  bar = (1.0 - tolerance) * ref
  shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={_format(v)}" for k, v in reference.items())
  lines = [f"### Cheapest {cost.rsplit('.', 1)[-1]} within {tolerance:.0%} of the reference",
           "", f"Reference ({shown}): {metric} = {_format(ref)}; bar {_format(bar)}.", "",
           f"| {group.rsplit('.', 1)[-1]} | cheapest {cost.rsplit('.', 1)[-1]} | "
           f"{metric} there | tested |", "|---|---|---|---|"]
  by_group: dict[Any, list[tuple[float, float]]] = {}
  for r in records:
    o = overrides(r)
    if r in refs or group not in o or _numeric(o.get(cost)) is None or value(r) is None:
      continue
    by_group.setdefault(o[group], []).append((_numeric(o[cost]), value(r)))
  for name, points in by_group.items():
    points.sort()
    cheapest = None
    for i in range(len(points)):
      if all(v >= bar for _, v in points[i:]):
        cheapest = points[i]
        break
    tested = ", ".join(f"{_format(c)}: {_format(v)}" for c, v in points)
    lines.append(f"| {_format(name)} | {_format(cheapest[0]) if cheapest else 'none tested'} "
                 f"| {_format(cheapest[1]) if cheapest else '-'} | {tested} |")
  return lines


def _counted(records: Sequence[dict]) -> bool:
  return any("train_tflop" in t for r in records for t in r.get("train", {}).values())


def _sampled(records: Sequence[dict]) -> bool:
  return any("sample_minutes" in r for r in records)


def _cost_columns(records: Sequence[dict]) -> list[str]:
  return (["train_steps", "train_minutes"] + (["train_tflop"] if _counted(records) else [])
          + (["sample_minutes"] if _sampled(records) else []))


def write_tables(sweep_dir: str | pathlib.Path, records: Sequence[dict],
                 sections: Sequence[str] = ()) -> list[pathlib.Path]:
  """results.csv (values and interval bounds in their own columns) and results.md (the
  table, then ``sections``: more Markdown lines)."""
  sweep_dir = pathlib.Path(sweep_dir)
  header, rows = table_rows(records)
  md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  md += ["| " + " | ".join(row) + " |" for row in rows]
  if sections:
    md += ["", *sections]
  (sweep_dir / "results.md").write_text("\n".join(md) + "\n")
  metrics = list(dict.fromkeys(m for r in records for m in r.get("metrics", {})))
  varying = list(dict.fromkeys(p for r in records for p in r.get("varying", [])))
  with open(sweep_dir / "results.csv", "w", newline="") as f:
    writer = csv.writer(f)
    costs = _cost_columns(records)
    writer.writerow(["arm", *varying, *costs,
                     *[f"{m}{suffix}" for m in metrics for suffix in ("", "_low", "_high")]])
    for r, row in zip(records, rows, strict=True):
      values = []
      for m in metrics:
        entry = r.get("metrics", {}).get(m, {})
        values += [entry.get("value"), entry.get("low"), entry.get("high")]
      writer.writerow([*row[:1 + len(varying) + len(costs)],
                       *["" if v is None else v for v in values]])
  return [sweep_dir / "results.md", sweep_dir / "results.csv"]


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _numeric(value: Any) -> float | None:
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _groups(records, axis: str):
  """Records grouped by every varying setting except ``axis`` (one line per group)."""
  groups: dict[str, list[dict]] = {}
  for r in records:
    overrides = dict((p, v) for p, v in r.get("overrides", []))
    key = ", ".join(f"{p.rsplit('.', 1)[-1]}={_format(overrides.get(p))}"
                    for p in r.get("varying", []) if p != axis)
    groups.setdefault(key, []).append(r)
  return groups


def plot_metric_vs_axis(records: Sequence[dict], axis: str, metric: str,
                        path: str | pathlib.Path) -> pathlib.Path:
  """``metric`` (with its interval as error bars) against the values of ``axis``, one
  line per combination of the other varying settings."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, group in _groups(records, axis).items():
    points = []
    for r in group:
      value = dict((p, v) for p, v in r["overrides"]).get(axis)
      m = r.get("metrics", {}).get(metric)
      if m and m.get("value") is not None:
        points.append((value, m))
    numeric = all(_numeric(v) is not None for v, _ in points)
    points.sort(key=lambda p: _numeric(p[0]) if numeric else str(p[0]))
    xs = [_numeric(v) if numeric else str(v) for v, _ in points]
    ys = [float(m["value"]) for _, m in points]
    # (clipped at 0: a Wilson bound can sit a rounding error past the value at 0 or 1)
    errs = [[max(0.0, y - float(m["low"])) if m.get("low") is not None else 0.0
             for y, (_, m) in zip(ys, points, strict=True)],
            [max(0.0, float(m["high"]) - y) if m.get("high") is not None else 0.0
             for y, (_, m) in zip(ys, points, strict=True)]]
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label or None)
  ax.set_xlabel(axis)
  ax.set_ylabel(metric)
  if any(_groups(records, axis)):
    ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _save(fig, plt, path)


def plot_pareto(records: Sequence[dict], x_metric: str, y_metric: str, label_axis: str,
                path: str | pathlib.Path, *, lower_x_is_better: bool = True) -> pathlib.Path:
  """Every arm as a point (x_metric, y_metric), labelled by ``label_axis``'s value, with
  the Pareto front drawn (low x and high y are better by default, e.g. FD-probe against
  ShapesEval accuracy across guidance scales, as Imagen's guidance sweeps)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  points = []
  for r in records:
    x, y = r.get("metrics", {}).get(x_metric), r.get("metrics", {}).get(y_metric)
    if x and y and x.get("value") is not None and y.get("value") is not None:
      label = dict((p, v) for p, v in r["overrides"]).get(label_axis, r["name"])
      points.append((float(x["value"]), float(y["value"]), label))
  for x, y, label in points:
    ax.scatter([x], [y], color="tab:blue")
    ax.annotate(_format(label), (x, y), fontsize=7, xytext=(3, 3),
                textcoords="offset points")
  front = pareto_front([(x, y) for x, y, _ in points], lower_x_is_better)
  if front:
    ax.plot(*zip(*front, strict=True), color="tab:red", alpha=0.6, label="Pareto front")
    ax.legend(fontsize=7)
  ax.set_xlabel(x_metric + (" (lower is better)" if lower_x_is_better else ""))
  ax.set_ylabel(y_metric)
  ax.grid(alpha=0.3)
  return _save(fig, plt, path)


def pareto_front(points: Sequence[tuple[float, float]],
                 lower_x_is_better: bool = True) -> list[tuple[float, float]]:
  """The non-dominated points (better x and better y; higher y is better), sorted by x."""
  sign = 1.0 if lower_x_is_better else -1.0
  ordered = sorted(points, key=lambda p: (sign * p[0], -p[1]))
  front, best_y = [], -math.inf
  for x, y in ordered:
    if y > best_y:
      front.append((x, y))
      best_y = y
  return sorted(front)


def plot_curves(series: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str,
                path: str | pathlib.Path) -> pathlib.Path:
  """One line per arm: e.g. training loss or a score against steps or minutes."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, points in series.items():
    if points:
      xs, ys = zip(*points, strict=True)
      ax.plot(xs, ys, marker="." if len(points) < 30 else None, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if series:
    ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _save(fig, plt, path)


def _save(fig, plt, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
