"""Data throughput: examples/s of shapes preparation and of the input pipeline at 64 and 256 px.

Preparation = render + PNG-encode + TFDS array_record writing (all splits, worker processes
for large sizes). Pipeline = PNG decode + resize/crop + low-res downsample + batching, for
one process with grain's reader threads. The train step of the 32 px demo U-Net takes
~30-100 images/s on 2 CPU cores; the pipeline should stay >= 10x ahead.

  python benchmarks/data.py [--num_train 2000] [--batches 30] [--data_dir /tmp/bench_tfds]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

from diffusion_jax.data import shapes_tfds
from diffusion_jax.data.pipeline import InputPipeline


def _cpu_seconds() -> float:
  """User + system CPU of this process and its finished children (the render workers)."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_preparation(data_dir, resolution, num_train):
  builder = shapes_tfds.shapes_builder(data_dir, resolution, num_train)
  total = num_train + 2 * builder.builder_config.num_eval
  if builder.is_prepared():
    return None
  start, cpu = time.perf_counter(), _cpu_seconds()
  shapes_tfds.prepare_shapes(data_dir, resolution, num_train)
  return total, time.perf_counter() - start, _cpu_seconds() - cpu


def time_pipeline(data_dir, resolution, num_train, lowres, batch_size, batches, crop):
  name = "shapes/" + shapes_tfds.config_name(resolution, num_train)
  pipeline = InputPipeline(name, data_dir=data_dir, caption_key="caption", resolution=resolution,
                           lowres_resolution=lowres, crop=crop, global_batch_size=batch_size,
                           process_index=0, process_count=1)
  next(pipeline)  # warm-up: threads start, files open
  start = time.perf_counter()
  for _ in range(batches):
    next(pipeline)
  return batches * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--data_dir", default=None, help="default: a fresh temporary directory")
  args = parser.parse_args()
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_tfds_")
  os.makedirs(data_dir, exist_ok=True)
  load = os.getloadavg()[0]
  print(f"data_dir={data_dir}  cpus={os.cpu_count()}  load average at start={load:.1f}")

  print(f"\n{'preparation':<28}{'examples':>10}{'wall s':>10}{'ex/s':>10}{'cpu s':>10}")
  for resolution in (32, 64, 256):
    result = time_preparation(data_dir, resolution, args.num_train)
    if result is None:
      print(f"shapes {resolution}px (already prepared, not timed)")
      continue
    total, wall, cpu = result
    print(f"shapes {resolution:>3}px{'':<18}{total:>10}{wall:>10.1f}{total / wall:>10.0f}"
          f"{cpu:>10.1f}")

  print(f"\n{'pipeline (batch ' + str(args.batch_size) + ')':<40}{'ex/s':>10}")
  for resolution, lowres, crop in ((64, None, "center"), (64, 16, "center"),
                                   (256, 64, "center"), (256, 64, "random")):
    rate = time_pipeline(data_dir, resolution, args.num_train, lowres, args.batch_size,
                         args.batches, crop)
    label = f"{resolution}px" + (f" + lowres {lowres}px" if lowres else "") + f", {crop}"
    print(f"{label:<40}{rate:>10.0f}")
  print(f"\nload average at end={os.getloadavg()[0]:.1f} (other jobs on the machine slow all rows)")


if __name__ == "__main__":
  main()
