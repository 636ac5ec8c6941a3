r"""Train-step throughput of any experiment config: steps/s, images/s, efficiency, memory.

  .venv/bin/python benchmarks/train.py --config=configs/demo_base.py
  .venv/bin/python benchmarks/train.py --config=configs/demo_sr.py --steps=5 \
      --config.train.batch_size=64 --config.model.remat=True

Builds what experiments/train.py builds from the config (U-Net, optimizer, the train step
with its state sharded and donated, on the config's mesh; a frozen text encoder only, as
the demo and paper configs use), feeds it random batches
of the configured shapes (so the input pipeline and text encoder are not timed; see
benchmarks/data.py and benchmarks/text.py for those), and prints one table row:
median step time, steps/s, images/s, model GFLOP per step (benchmarks/common.py), achieved
GFLOP/s as a fraction of a float32 matmul's (measured in the same process, right after
the timed steps), and the process's peak RSS.
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

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
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


def measure(config, steps: int) -> dict:
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

  def one_step():
    carry[0], metrics = compiled(carry[0], batch, null_cond)
    return metrics

  step_s = common.median_seconds(one_step, steps)
  state = carry[0]
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(params=num_params, batch=loop.batch_size,
              resolution=loop.resolution, devices=mesh.size, compile_s=compile_s,
              step_s=step_s, gflop=flops / 1e9, peak_gflops=common.matmul_peak_gflops(),
              rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  if FLAGS.steps < 1:
    raise cli.UserError(f"--steps={FLAGS.steps}; time at least 1 step.")
  r = measure(config, FLAGS.steps)
  achieved = r["gflop"] / r["step_s"]
  header = ("config", "params", "batch", "res", "devices", "s/step", "steps/s", "img/s",
            "GFLOP/step", "GFLOP/s", "% of peak", "peak RSS GB", "compile s")
  cells = (f"{config.model.preset} {config.model.dtype}{' remat' if config.model.remat else ''}",
           f"{r['params'] / 1e6:.2f}M", r["batch"], r["resolution"], r["devices"],
           f"{r['step_s']:.3f}", f"{1 / r['step_s']:.2f}", f"{r['batch'] / r['step_s']:.1f}",
           f"{r['gflop']:.1f}", f"{achieved:.0f}",
           f"{100 * achieved / r['peak_gflops']:.0f}% of {r['peak_gflops']:.0f}",
           f"{r['rss_gb']:.2f}", f"{r['compile_s']:.0f}")
  print(f"\nTrain step, median of {FLAGS.steps} steps (random batches; pipeline not timed)")
  widths = [max(len(str(h)), len(str(c))) for h, c in zip(header, cells, strict=True)]
  print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
  print(" | ".join(f"{str(c):>{w}}" for c, w in zip(cells, widths, strict=True)))


if __name__ == "__main__":
  cli.run_main(main)
