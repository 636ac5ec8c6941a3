"""Metric writing: TensorBoard event files, ``metrics.jsonl`` and the console.

Only process 0 writes. Metrics arrive per step as device scalars; ``MetricAccumulator``
sums them on the host between reports (one device->host transfer per report, not per
step), and turns the per-t-bucket sums and counts into per-bucket mean losses. Steps the
non-finite guard skipped are left out of every average but ``skipped`` (their loss is
NaN or Inf and changed nothing).

The workdir may be local or remote (``gs://...``; paths are ``etils.epath``). A resumed
run first drops the lines of ``metrics.jsonl`` (and hides the TensorBoard events) after
the step it resumed from, so a step is never reported twice.
"""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np
from etils import epath


class MetricAccumulator:
  def __init__(self):
    self._pending: list[dict] = []

  def add(self, metrics: dict) -> None:
    self._pending.append(metrics)

  def summarise(self) -> dict[str, float]:
    """Mean of every scalar over the pending steps that were not skipped (NaN if all
    were); ``skipped`` over all of them; ``loss_t{k}`` per t-bucket."""
    if not self._pending:
      return {}
    host = jax.device_get(self._pending)
    self._pending = []
    applied = [m for m in host if not m.get("skipped", 0.0)]
    out = {}
    for name in host[0]:
      if name.startswith("bucket_"):
        continue
      steps = host if name == "skipped" else applied
      out[name] = float(np.mean([m[name] for m in steps])) if steps else math.nan
    if "bucket_loss_sum" in host[0] and applied:
      sums = np.sum([m["bucket_loss_sum"] for m in applied], axis=0)
      counts = np.sum([m["bucket_count"] for m in applied], axis=0)
      for k, (s, c) in enumerate(zip(sums, counts, strict=True)):
        if c > 0:
          out[f"loss_t{k}"] = float(s / c)
    return out


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX), metrics.jsonl and the console.

  ``start_step``: the step the run starts (or resumes) from; records of later steps, left
  by a run that was killed after its last checkpoint, are dropped.
  """

  def __init__(self, workdir: str | epath.PathLike, total_steps: int | None = None,
               enabled: bool | None = None, start_step: int = 0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = epath.Path(workdir)
    self.total_steps = total_steps
    self._tb = None
    self._start_time = time.time()
    self._start_step: int | None = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      self.workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl_path = self.workdir / "metrics.jsonl"
      self._lines = self._kept_lines(start_step)
      # Object stores (gs://) cannot append: there the file is rewritten on each write.
      self._local = "://" not in str(self.workdir)
      self._rewrite()
      self._jsonl = open(self._jsonl_path, "a") if self._local else None  # noqa: SIM115
      # purge_step hides the events a killed run logged after start_step.
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"),
                               purge_step=start_step + 1 if start_step else None)

  def _kept_lines(self, start_step: int) -> list[str]:
    if not self._jsonl_path.exists():
      return []
    kept = []
    for line in self._jsonl_path.read_text().splitlines():
      try:
        if json.loads(line)["step"] <= start_step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        continue  # a line cut short by a crash
    return kept

  def _rewrite(self) -> None:
    text = "".join(line + "\n" for line in self._lines)
    if self._local:
      tmp = self._jsonl_path.parent / (self._jsonl_path.name + ".tmp")
      tmp.write_text(text)
      tmp.replace(self._jsonl_path)  # atomic: a crash never loses the kept lines
    else:
      self._jsonl_path.write_text(text)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    line = json.dumps({"step": step, "time": time.time(), **scalars})
    if self._local:
      self._jsonl.write(line + "\n")
      self._jsonl.flush()
    else:
      self._lines.append(line)
      self._rewrite()

  def console(self, step: int, scalars: dict[str, float], extra: str = "") -> None:
    if not self.enabled:
      return
    if self._start_step is None:
      self._start_step, self._start_time = step, time.time()
    shown = " ".join(f"{k}={_fmt(scalars[k])}" for k in
                     ("loss", "mse_x0", "grad_norm", "learning_rate", "images_per_s")
                     if k in scalars)
    progress = f"step {step}"
    if self.total_steps:
      progress += f"/{self.total_steps} ({100 * step / self.total_steps:.0f}%)"
      done = step - self._start_step
      if done > 0:
        eta = (time.time() - self._start_time) / done * (self.total_steps - step)
        progress += f" eta {_duration(eta)}"
    print(f"{progress} {shown} {extra}".rstrip(), flush=True)

  def write_image(self, step: int, name: str, image_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(name, image_uint8, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      if self._jsonl is not None:
        self._jsonl.close()


def _fmt(x: float) -> str:
  return f"{x:.3g}" if math.isfinite(x) else str(x)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")
