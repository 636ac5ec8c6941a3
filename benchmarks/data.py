"""Data throughput against what the train step consumes: shapes preparation (examples/s) and the
input pipeline of each demo stage (and of a 256 px stage), each row beside the train step it feeds.

  .venv/bin/python benchmarks/data.py                          # ~3-5 min on 2 cores, mostly
                                                               # compiling the three steps
  .venv/bin/python benchmarks/data.py --stages demo_base,demo_sr   # skip the 256 px step

Preparation = render + PNG-encode + TFDS array_record writing (all splits, worker processes
for large sizes). Pipeline = PNG decode + resize/crop + low-res downsample + batching for one
process with grain's reader threads, at the batch size of the stage it feeds. Step = the train
step experiments/train.py builds from the stage's config, on random batches (timed by
benchmarks/train.py; the text encoder is not part of it).

margin = pipeline examples/s / step images/s, each measured alone on the same machine. In
training both share the cores, so a margin of m means the pipeline needs about 1/m of the CPU
time; the pipeline must keep >= 10x ahead, and rows below that are flagged.

Each pipeline row is the input of one stage, read from its config (so a config change is
measured as it trains):
  demo_base                 configs/demo_base.py (32 px)
  demo_sr                   configs/demo_sr.py (random 32 px crops of 64 px scenes + 16 px
                            low-res, as Imagen's 1024 px stage trains on crops)
  demo_sr@256               demo_sr's U-Net run at 256 <- 64 px, full frame, batch 4: the
                            cheapest 256 px stage in the repo, so the strictest check; the
                            paper's sr256 preset consumes far fewer images per second.
  demo_base with buckets    demo_base's input with SDXL's aspect buckets (BUCKETS: each
                            scene re-laid out and rendered at its batch's bucket, no PNG
                            decode; data/buckets.py), beside demo_base's step (a bucket has
                            about the square's pixels, so about its step time).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

from diffusion_jax.data import shapes_tfds
from diffusion_jax.data.buckets import BucketedShapesPipeline
from diffusion_jax.data.pipeline import InputPipeline

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import cli  # noqa: E402  (experiments/cli.py: one error line, exit 2)

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAGES = ("demo_base", "demo_sr", "demo_sr@256")
BUCKETS = ((32, 32), (24, 40), (40, 24))
MARGIN = 10.0


def stage_config(stage: str, batch_256: int):
  """The experiment config of a stage (configs/demo_base.py, configs/demo_sr.py)."""
  sys.path.insert(0, str(ROOT))  # for configs/
  from configs import demo_base, demo_sr

  config = demo_base.get_config() if stage == "demo_base" else demo_sr.get_config()
  if stage == "demo_sr@256":
    config.data.resolution, config.data.lowres_resolution = 256, 64
    config.diffusion.schedule_kwargs.shifted_cosine.resolution = 256
    config.train.batch_size = batch_256
    config.data.shapes_resolution, config.data.crop = None, "center"
  config.text.cache_dir = None  # the step needs only the empty prompt's embedding
  return config


def pipeline_row(stage: str, config) -> tuple:
  """(label, dataset resolution, resolution, lowres resolution, crop, stage): the input
  pipeline exactly as the stage's config trains on it."""
  d = config.data
  data_res = d.shapes_resolution or d.resolution
  label = f"{d.resolution}px" + (f" crops of {data_res}px" if d.crop == "random" else "")
  label += (f" + lowres {d.lowres_resolution}px" if d.lowres_resolution else "") + f", {d.crop}"
  return label, data_res, d.resolution, d.lowres_resolution, d.crop, None, stage


def bucket_row() -> tuple:
  """pipeline_row's tuple for demo_base's input with BUCKETS."""
  label = "buckets " + ",".join(f"{h}x{w}" for h, w in BUCKETS) + ", rendered"
  return label, 32, 32, None, "center", BUCKETS, "demo_base"


def _cpu_seconds() -> float:
  """User + system CPU of this process and its finished children (the render workers)."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_preparation(data_dir, resolution, num_train):
  """(examples, wall s, CPU s) of preparing shapes at `resolution`, or None if already there."""
  builder = shapes_tfds.shapes_builder(data_dir, resolution, num_train)
  total = num_train + 2 * builder.builder_config.num_eval
  if builder.is_prepared():
    return None
  start, cpu = time.perf_counter(), _cpu_seconds()
  with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints two lines per dataset
    shapes_tfds.prepare_shapes(data_dir, resolution, num_train)
  return total, time.perf_counter() - start, _cpu_seconds() - cpu


def time_pipeline(data_dir, data_resolution, num_train, resolution, lowres, crop, buckets,
                  batch_size, num_examples):
  """Examples/s of the input pipeline over >= num_examples examples, after one warm-up batch."""
  name = "shapes/" + shapes_tfds.config_name(data_resolution, num_train)
  if buckets:
    pipeline = BucketedShapesPipeline(name, data_dir=data_dir, buckets=buckets, crop=crop,
                                      global_batch_size=batch_size, process_index=0,
                                      process_count=1)
  else:
    pipeline = InputPipeline(name, data_dir=data_dir, caption_key="caption",
                             resolution=resolution, lowres_resolution=lowres, crop=crop,
                             global_batch_size=batch_size, process_index=0, process_count=1)
  next(pipeline)  # threads start, files open
  batches = math.ceil(num_examples / batch_size)
  start = time.perf_counter()
  for _ in range(batches):
    next(pipeline)
  return batches * batch_size / (time.perf_counter() - start)


def time_train_steps(configs: dict, steps: int) -> dict:
  """stage -> benchmarks/train.py's measurement (step_s, batch, compile_s, ...)."""
  spec = importlib.util.spec_from_file_location("benchmark_train",
                                                ROOT / "benchmarks" / "train.py")
  bench_train = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench_train)
  bench_train.builders.setup_compilation_cache()  # a second run skips the compiles
  results = {}
  for stage, config in configs.items():
    results[stage] = bench_train.measure(config, steps)
    r = results[stage]
    print(f"{stage:<14}{r['resolution']:>5}px{r['batch']:>8}{r['step_s']:>10.2f}"
          f"{r['batch'] / r['step_s']:>10.2f}{r['compile_s']:>12.0f}", flush=True)
  return results


def parse_args(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_train", type=int, default=2000, help="examples prepared per size")
  parser.add_argument("--examples", type=int, default=960, help="timed examples per pipeline row")
  parser.add_argument("--steps", type=int, default=3, help="timed train steps per stage")
  parser.add_argument("--stages", default=",".join(STAGES),
                      help=f"train steps to time, from {', '.join(STAGES)} ('' for none)")
  parser.add_argument("--batch_256", type=int, default=4, help="batch of the demo_sr@256 step")
  parser.add_argument("--data_dir", default=None, help="default: a temporary directory, removed")
  args = parser.parse_args(argv)
  args.stages = [s for s in args.stages.split(",") if s]
  unknown = [s for s in args.stages if s not in STAGES]
  if unknown:
    parser.error(f"unknown stage {unknown[0]!r} in --stages; choose from {', '.join(STAGES)}")
  if min(args.num_train, args.examples, args.steps, args.batch_256) < 1:
    parser.error("--num_train, --examples, --steps and --batch_256 must be positive")
  return args


def main(argv=None):
  args = parse_args(argv)
  import tensorflow_datasets as tfds
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # TFDS logs every preparation at INFO
  tfds.disable_progress_bar()
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_tfds_")
  os.makedirs(data_dir, exist_ok=True)
  configs = {stage: stage_config(stage, args.batch_256) for stage in STAGES}
  rows = [pipeline_row(stage, config) for stage, config in configs.items()] + [bucket_row()]
  print(f"data_dir={data_dir}  cpus={os.cpu_count()}  "
        f"load average at start={os.getloadavg()[0]:.1f}")
  try:
    print(f"\n{'preparation':<28}{'examples':>10}{'wall s':>10}{'ex/s':>10}{'cpu s':>10}")
    for resolution in sorted({row[1] for row in rows}):
      result = time_preparation(data_dir, resolution, args.num_train)
      if result is None:
        print(f"shapes {resolution}px (already prepared, not timed)")
        continue
      total, wall, cpu = result
      print(f"shapes {resolution:>3}px{'':<18}{total:>10}{wall:>10.1f}{total / wall:>10.0f}"
            f"{cpu:>10.1f}", flush=True)

    print(f"\n{'pipeline':<40}{'batch':>7}{'ex/s':>10}")
    rates = []
    for label, data_res, res, lowres, crop, buckets, stage in rows:
      batch = configs[stage].train.batch_size
      rate = time_pipeline(data_dir, data_res, args.num_train, res, lowres, crop, buckets,
                           batch, args.examples)
      rates.append(rate)
      print(f"{label:<40}{batch:>7}{rate:>10.0f}", flush=True)
  finally:
    if args.data_dir is None:
      shutil.rmtree(data_dir, ignore_errors=True)

  if not args.stages:
    return
  print(f"\n{'train step':<14}{'res':>7}{'batch':>8}{'s/step':>10}{'img/s':>10}"
        f"{'compile s':>12}   (median of {args.steps})")
  steps = time_train_steps({s: configs[s] for s in args.stages}, args.steps)

  print(f"\n{'pipeline':<40}{'ex/s':>8}   {'feeds':<13}{'img/s':>8}{'margin':>9}")
  below = 0
  for (label, *_, stage), rate in zip(rows, rates, strict=True):
    if stage not in steps:
      print(f"{label:<40}{rate:>8.0f}   {stage:<13}{'-':>8}{'-':>9}")
      continue
    consumed = steps[stage]["batch"] / steps[stage]["step_s"]
    margin = rate / consumed
    flag = f"   < {MARGIN:.0f}x: the pipeline would slow training" if margin < MARGIN else ""
    below += margin < MARGIN
    print(f"{label:<40}{rate:>8.0f}   {stage:<13}{consumed:>8.2f}{margin:>8.0f}x{flag}")
  verdict = (f"{below} row(s) below {MARGIN:.0f}x" if below
             else f"every timed row is >= {MARGIN:.0f}x ahead of its train step")
  print(f"\n{verdict}; load average at end={os.getloadavg()[0]:.1f} (other jobs on the "
        "machine slow every row)")


if __name__ == "__main__":
  cli.call_main(main)
