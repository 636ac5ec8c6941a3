r"""Train-step throughput of any experiment config: steps/s, images/s, efficiency, memory.

  .venv/bin/python benchmarks/train.py --config=configs/demo_base.py
  .venv/bin/python benchmarks/train.py --config=configs/demo_sr.py --steps=5 \
      --config.train.batch_size=64 --config.model.remat=True
  .venv/bin/python benchmarks/train.py --config=configs/demo_base.py \
      --conv_impls=xla,matmul --steps=5 --rounds=3     # conv implementations side by side

Builds what experiments/train.py builds from the config (U-Net, optimizer, the train step
with its state sharded and donated, on the config's mesh; a frozen text encoder only, as
the demo and paper configs use), feeds it random batches
of the configured shapes (so the input pipeline and text encoder are not timed; see
benchmarks/data.py and benchmarks/text.py for those), and prints one table row:
median step time, steps/s, images/s, model GFLOP per step (benchmarks/common.py), achieved
GFLOP/s as a fraction of a float32 matmul's (measured in the same process, right after
the timed steps), and the process's peak RSS.

``--conv_impls`` builds one train step per ``config.model.conv_impl`` value and times them
in alternating rounds in one process, so that a shared machine's changing load slows them
alike; the ratio of steps/s to the first is printed with each one's range over rounds.
Measured so on 2026-12-01 (2-core Zen 5, jax 0.10.2, float32, a machine shared with three
other jobs: ratios only), matmul / xla steps/s: demo_base 0.40x (xla 0.79-0.88 steps/s,
matmul 0.31-0.44), demo_sr 0.47x (xla 1.22-1.31, matmul 0.49-0.90), the bench-peer preset
imagen_pytorch_cpu at 32 px, batch 16, 0.84x (bfloat16 with benchmarks/unet.py's YNN
XLA flag: 0.64x); 'shifted' 0.43x on demo_base. The model
FLOPs counted for matmul are 7-10% higher (XLA counts the patch concatenation's adds).

GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment lets glibc's malloc back large
allocations with transparent huge pages (this machine's THP mode is 'madvise'): XLA:CPU
allocates fresh buffers every step, and in this VM faulting them in 4 KiB at a time is slow
(a 37 MB copy: 43 ms without, 6 ms with, 148 k vs 0.3 k page faults). Alternating
processes with and without it (same day, contended): demo_base 1.13-1.28x steps/s over
three pairs, demo_sr 0.98-0.99x over two (no gain).
"""

from __future__ import annotations

import functools
import pathlib
import resource
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import builders  # noqa: E402
import cli  # noqa: E402
import common  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax.models import fast_conv  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step); per round with "
                     "--conv_impls.")
flags.DEFINE_string("conv_impls", None, "Comma-separated config.model.conv_impl values "
                    "(e.g. xla,matmul) to time side by side in one process, their steps "
                    "alternating round by round; ratios to the first are printed.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds with --conv_impls.")
flags.mark_flags_as_required(["config"])


def random_batch(key, batch_size: int, resolution: int, lowres: int | None, channels: int,
                 text_len: int, text_dim: int) -> dict:
  """A host batch of the shapes the train step takes, with random contents."""
  import jax
  import numpy as np
  keys = jax.random.split(key, 3)
  batch = {
      "image": np.asarray(jax.random.uniform(keys[0], (batch_size, resolution, resolution,
                                                       channels), minval=-1, maxval=1)),
      "text_emb": np.asarray(jax.random.normal(keys[1], (batch_size, text_len, text_dim))),
      "text_mask": np.ones((batch_size, text_len), bool)}
  if lowres is not None:
    batch["lowres"] = np.asarray(jax.random.uniform(
        keys[2], (batch_size, lowres, lowres, channels), minval=-1, maxval=1))
  return batch


def build(config):
  """The compiled train step of ``config`` and what it runs on: a dict with ``run()`` (one
  step, its metrics returned), the step's model GFLOP and the run's sizes."""
  import jax

  from diffusion_jax import sharding
  from diffusion_jax.models import unet as unet_lib
  from diffusion_jax.training import loop as loop_lib
  from diffusion_jax.training import state as state_lib
  from diffusion_jax.training.step import train_step

  if config.text.trainable:
    raise builders.UserError("benchmarks/train.py times steps on precomputed text embeddings; "
                             "config.text.trainable=True (the encoder inside the step) is not "
                             "supported here: time it with experiments/train.py's images_per_s.")
  model = unet_lib.UNet(builders.unet_config(config))
  step_settings = builders.step_settings(config)
  optimizer = builders.optimizer_settings(config)
  loop = builders.loop_settings(config)
  mesh = sharding.make_mesh(dict(loop.mesh_axes))
  null_cond = loop_lib.encode_null(builders.text_encoder(config))
  text_len, text_dim = null_cond["text_emb"].shape
  inputs = loop_lib.init_inputs(model.config, loop.resolution, loop.lowres_resolution,
                                text_len, text_dim)
  tx = state_lib.make_optimizer(optimizer)
  init_state, _, state_shardings = loop_lib.state_spec(model, tx, inputs, mesh, loop.rules)
  state, _ = sharding.init_sharded(init_state, mesh, loop.rules, jax.random.key(0))
  batch = sharding.host_local_to_global(
      random_batch(jax.random.key(1), loop.batch_size // jax.process_count(),
                   loop.resolution, loop.lowres_resolution, model.config.in_channels,
                   text_len, text_dim), mesh, loop.rules)
  null_cond = jax.device_put(null_cond, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, settings=step_settings),
                    out_shardings=(state_shardings, None), donate_argnums=0)
  with sharding.sharding_context(mesh, loop.rules):
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, null_cond).compile()
    compile_s = time.perf_counter() - start
    flops = common.model_gflop(step_fn, state, batch, null_cond) * 1e9

  carry = [state]

  def run():
    carry[0], metrics = compiled(carry[0], batch, null_cond)
    return metrics

  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(run=run, compiled=compiled, params=num_params, batch=loop.batch_size,
              resolution=loop.resolution, devices=mesh.size, compile_s=compile_s,
              gflop=flops / 1e9)


def measure(config, steps: int) -> dict:
  r = build(config)
  del r["compiled"]
  r["step_s"] = common.median_seconds(r.pop("run"), steps)
  r["peak_gflops"] = common.matmul_peak_gflops()
  r["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return r


def measure_alternating(configs: dict, steps: int, rounds: int) -> dict:
  """``measure`` of several configs in one process, their steps timed in turn: ``rounds``
  rounds, each timing ``steps`` steps of every config, so that a machine whose load changes
  slows them alike. Per config: the median over all its steps and the range of the rounds'
  medians (``step_s``, ``step_s_range``)."""
  import jax
  built = {name: build(config) for name, config in configs.items()}
  for r in built.values():
    jax.block_until_ready(r["run"]())
  times = {name: [] for name in built}
  for _ in range(rounds):
    for name, r in built.items():
      round_times = []
      for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(r["run"]())
        round_times.append(time.perf_counter() - start)
      times[name].append(round_times)
  peak = common.matmul_peak_gflops()
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  median = lambda xs: sorted(xs)[len(xs) // 2]
  for name, r in built.items():
    del r["run"], r["compiled"]
    r["step_s"] = median([t for ts in times[name] for t in ts])
    r["step_s_range"] = (min(map(median, times[name])), max(map(median, times[name])))
    r.update(peak_gflops=peak, rss_gb=rss_gb)
  return built


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  if FLAGS.steps < 1:
    raise cli.UserError(f"--steps={FLAGS.steps}; time at least 1 step.")
  impls = [x for x in FLAGS.conv_impls.split(",") if x] if FLAGS.conv_impls else []
  bad = [x for x in impls if x not in fast_conv.IMPLS]
  if bad:
    raise cli.UserError(f"--conv_impls={FLAGS.conv_impls}: {', '.join(bad)} unknown; use "
                        f"some of {', '.join(fast_conv.IMPLS)}, comma-separated.")
  if FLAGS.rounds < 1:
    raise cli.UserError(f"--rounds={FLAGS.rounds}; time at least 1 round.")
  if impls:
    configs = {}
    for impl in impls:
      configs[impl] = config.copy_and_resolve_references()
      with configs[impl].unlocked():
        configs[impl].model.conv_impl = impl
    results = measure_alternating(configs, FLAGS.steps, FLAGS.rounds)
    print(f"\nTrain step, {FLAGS.rounds} alternating rounds of {FLAGS.steps} steps per "
          "conv_impl in one process (random batches; pipeline not timed); range: the "
          "rounds' medians")
  else:
    results = {config.model.get("conv_impl", "xla"): measure(config, FLAGS.steps)}
    print(f"\nTrain step, median of {FLAGS.steps} steps (random batches; pipeline not timed)")
  header = ("config", "params", "batch", "res", "devices", "s/step", "steps/s", "img/s",
            "GFLOP/step", "GFLOP/s", "% of peak", "peak RSS GB", "compile s")
  rows = []
  for impl, r in results.items():
    achieved = r["gflop"] / r["step_s"]
    steps_s = f"{1 / r['step_s']:.2f}"
    if "step_s_range" in r:
      steps_s += f" [{1 / r['step_s_range'][1]:.2f}, {1 / r['step_s_range'][0]:.2f}]"
    rows.append((f"{config.model.preset} {config.model.dtype} conv={impl}"
                 f"{' remat' if config.model.remat else ''}",
                 f"{r['params'] / 1e6:.2f}M", r["batch"], r["resolution"], r["devices"],
                 f"{r['step_s']:.3f}", steps_s, f"{r['batch'] / r['step_s']:.1f}",
                 f"{r['gflop']:.1f}", f"{achieved:.0f}",
                 f"{100 * achieved / r['peak_gflops']:.0f}% of {r['peak_gflops']:.0f}",
                 f"{r['rss_gb']:.2f}", f"{r['compile_s']:.0f}"))
  widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
  print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
  for cells in rows:
    print(" | ".join(f"{str(c):>{w}}" for c, w in zip(cells, widths, strict=True)))
  if len(results) > 1:
    first, *others = results
    for other in others:
      print(f"steps/s {other} / {first}: "
            f"{results[first]['step_s'] / results[other]['step_s']:.2f}x")


if __name__ == "__main__":
  cli.run_main(main)
