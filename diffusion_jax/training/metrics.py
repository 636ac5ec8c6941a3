"""Metric writing: TensorBoard event files, ``metrics.jsonl`` and the console.

Only process 0 writes. Metrics arrive per step as device scalars; ``MetricAccumulator``
sums them on the host between reports (one device->host transfer per report, not per
step), and turns the per-t-bucket sums and counts into per-bucket mean losses.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import numpy as np


class MetricAccumulator:
  def __init__(self):
    self._pending: list[dict] = []

  def add(self, metrics: dict) -> None:
    self._pending.append(metrics)

  def summarise(self) -> dict[str, float]:
    """Mean of every scalar over the pending steps; ``loss_t{k}`` per t-bucket."""
    if not self._pending:
      return {}
    host = jax.device_get(self._pending)
    self._pending = []
    out = {}
    for name in host[0]:
      if name.startswith("bucket_"):
        continue
      out[name] = float(np.mean([m[name] for m in host]))
    if "bucket_loss_sum" in host[0]:
      sums = np.sum([m["bucket_loss_sum"] for m in host], axis=0)
      counts = np.sum([m["bucket_count"] for m in host], axis=0)
      for k, (s, c) in enumerate(zip(sums, counts, strict=True)):
        if c > 0:
          out[f"loss_t{k}"] = float(s / c)
    return out


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX), metrics.jsonl and the console."""

  def __init__(self, workdir: str | pathlib.Path, total_steps: int | None = None,
               enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = pathlib.Path(workdir)
    self.total_steps = total_steps
    self._tb = None
    self._start_time = time.time()
    self._start_step: int | None = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      self.workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
      self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()

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
      self._jsonl.close()


def _fmt(x: float) -> str:
  return f"{x:.3g}" if math.isfinite(x) else str(x)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")
