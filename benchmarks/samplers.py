"""Sampler overhead: compile time and time per step for 10, 50 and 250 steps.

With a trivial model_fn the time per step measures the sampler's own cost; because each
sampler is one `lax.scan`, it should stay flat as the number of steps grows (no
per-step Python or dispatch overhead), and compile time should not grow with the steps.
For contrast, the last rows run DDIM as a Python loop over a jitted single step, which
pays one dispatch per step.

  python benchmarks/samplers.py [--batch 8] [--resolution 32] [--repeats 5]
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import grids, samplers, schedules

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import cli  # noqa: E402  (experiments/cli.py: one error line, exit 2)


def trivial_model_fn(x_t, logsnr):
  """An eps prediction that costs one multiply-add per pixel."""
  return 0.1 * x_t + 0.01 * logsnr[:, None, None, None]


def time_sampler(name, x, grid, key, repeats):
  fn = jax.jit(functools.partial(samplers.sample, name, trivial_model_fn,
                                 parameterization="eps"))
  start = time.perf_counter()
  compiled = fn.lower(x, grid, key).compile()
  compile_s = time.perf_counter() - start
  compiled(x, grid, key).block_until_ready()  # warm-up
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(x, grid, key).block_until_ready()
    runs.append(time.perf_counter() - start)
  return compile_s, float(np.median(runs))


def time_python_loop_ddim(x, grid, repeats):
  @jax.jit
  def step(x, logsnr_s, logsnr_t):
    return samplers.ddim(trivial_model_fn, x, jnp.stack([logsnr_s, logsnr_t]))

  grid = jnp.asarray(grid)
  pairs = [(grid[i], grid[i + 1]) for i in range(grid.shape[0] - 1)]
  step(x, *pairs[0]).block_until_ready()
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    y = x
    for s, t in pairs:
      y = step(y, s, t)
    y.block_until_ready()
    runs.append(time.perf_counter() - start)
  return float(np.median(runs))


def main():
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 250])
  args = parser.parse_args()
  if min(args.batch, args.resolution, args.repeats, *args.steps) < 1:
    parser.error("--batch, --resolution, --repeats and --steps must be >= 1")

  key = jax.random.key(0)
  x = samplers.initial_noise(key, (args.batch, args.resolution, args.resolution, 3))
  schedule = schedules.ShiftedCosineSchedule()
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch}, "
        f"{args.resolution}x{args.resolution}x3, trivial eps model\n")
  print(f"{'sampler':<14}{'steps':>6}{'NFE':>6}{'compile s':>11}{'run ms':>10}"
        f"{'us/step':>10}")
  for name in samplers.SAMPLERS:
    for num_steps in args.steps:
      grid = grids.karras_for_schedule(schedule, num_steps)
      nfe = 2 * num_steps - 1 if name == "heun" else num_steps
      compile_s, run_s = time_sampler(name, x, grid, key, args.repeats)
      print(f"{name:<14}{num_steps:>6}{nfe:>6}{compile_s:>11.2f}{run_s * 1e3:>10.2f}"
            f"{run_s / num_steps * 1e6:>10.1f}")
  for num_steps in args.steps:
    grid = grids.karras_for_schedule(schedule, num_steps)
    run_s = time_python_loop_ddim(x, grid, args.repeats)
    print(f"{'ddim (py loop)':<14}{num_steps:>6}{num_steps:>6}{'':>11}{run_s * 1e3:>10.2f}"
          f"{run_s / num_steps * 1e6:>10.1f}")


if __name__ == "__main__":
  cli.call_main(main)
