"""Cascade sampling throughput: images/s through a base + super-resolution cascade for
each sampler at its usual step count, without and with classifier-free guidance, and
compile time separately.

The cascade is the CPU demo's: ``demo_base`` (text -> 32 px, 1.1M params) then
``demo_sr`` (32 -> 64 px), random params of the right shapes (speed does not depend on
the values), dynamic thresholding, conditioned on the default text encoder
(``minilm-l6-offline``; ``--text=random`` uses random [B, 16, 384] embeddings instead).

Step counts (``--steps`` changes them) are the usual ones, trimmed to keep the default run
near 5 minutes on 2 CPU cores: ddim 50 (DDIM paper's quality/speed point), dpmpp_2m 25
(DPM-Solver++ reaches DDIM-50 quality in ~20-25), euler 50 and heun 25 (49 network
evaluations: Karras et al.'s ~35-80 NFE range), ddpm 100 (ancestral sampling needs the
most; the original 1000 would take ~10x longer). Both stages use the same sampler and
steps. "cfg" rows use guidance scale ``--guidance`` on both stages: one batched network
call of 2B rows per step.

Timing: each (sampler, guidance) cascade is a fresh pair of compiled programs (the
persistent compilation cache is off). "compile s" is the first call minus a steady
call (tracing + XLA compile of both stages); "run s" is the median of ``--repeats``
steady calls of ``Cascade.sample`` (text encoding, both stages, copy to host);
images/s = batch / run s.

  python benchmarks/sample.py [--batch 2] [--repeats 1] [--samplers ddim heun]
      [--steps ddim=50 ddpm=100] [--guidance 3] [--text random]
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from diffusion_jax import cascade as cascade_lib
from diffusion_jax.models import unet as unet_lib
from diffusion_jax.training import loop as loop_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import cli  # noqa: E402  (experiments/cli.py: one error line, exit 2)

STEPS = {"ddim": 50, "dpmpp_2m": 25, "euler": 50, "heun": 25, "ddpm": 100}
TEXT_LEN, TEXT_DIM = 16, 384
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star",
           "a purple hexagon", "an orange heart", "a white circle", "a black square"]


class RandomText:
  """Random text embeddings [B, 16, 384] (MiniLM's width), all tokens valid."""

  def encode(self, prompts):
    rng = np.random.default_rng(len(prompts))
    return (rng.standard_normal((len(prompts), TEXT_LEN, TEXT_DIM)).astype(np.float32),
            np.ones((len(prompts), TEXT_LEN), bool))


def random_params(config: unet_lib.UNetConfig, resolution: int, lowres: int | None,
                  text_dim: int, seed: int):
  """Params of the U-Net's shapes, N(0, 1/fan_in) kernels, zero biases, unit scales
  (from jax.eval_shape: nothing is compiled)."""
  model = unet_lib.UNet(config)
  inputs = loop_lib.init_inputs(config, resolution, lowres, TEXT_LEN, text_dim)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs)))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "bias" in name:
      return np.zeros(leaf.shape, leaf.dtype)
    if "scale" in name:
      return np.ones(leaf.shape, leaf.dtype)
    fan_in = max(1, math.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(leaf.dtype)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def make_text(name: str):
  if name == "random":
    return RandomText(), TEXT_DIM
  from diffusion_jax.text import TextEncoder

  encoder = TextEncoder.from_pretrained(name, max_length=TEXT_LEN)
  return encoder, encoder.width


def time_cascade(cascade, prompts, repeats: int) -> tuple[float, float]:
  key = jax.random.key(0)
  start = time.perf_counter()
  cascade.sample(prompts, key)  # compiles both stages
  first = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    cascade.sample(prompts, key)
    runs.append(time.perf_counter() - start)
  run = float(np.median(runs))
  return max(0.0, first - run), run


def parse_steps(items: list[str]) -> dict[str, int]:
  steps = dict(STEPS)
  for item in items:
    name, _, value = item.partition("=")
    if name not in STEPS or not value.isdigit() or int(value) < 1:
      raise cli.UserError(f"--steps {item!r}: use sampler=N with N >= 1 and a sampler "
                       f"from {', '.join(STEPS)}.")
    steps[name] = int(value)
  return steps


def main():
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--samplers", nargs="+", default=list(STEPS), choices=list(STEPS))
  parser.add_argument("--steps", nargs="*", default=[], help="sampler=N overrides")
  parser.add_argument("--guidance", type=float, default=3.0,
                      help="classifier-free guidance scale of the cfg rows")
  parser.add_argument("--text", default="minilm-l6-offline",
                      help="a text encoder id/directory, or 'random' embeddings")
  args = parser.parse_args()
  if args.batch < 1 or args.repeats < 1:
    raise cli.UserError("--batch and --repeats must be >= 1.")
  if args.guidance == 1.0:
    raise cli.UserError("--guidance 1 is the unguided row already; pass a scale != 1.")
  steps = parse_steps(args.steps)
  jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles

  text, text_dim = make_text(args.text)
  text.encode(["warm-up"])
  base_cfg = unet_lib.PRESETS["demo_base"]
  sr_cfg = unet_lib.PRESETS["demo_sr"]
  base_model, base_params = random_params(base_cfg, 32, None, text_dim, 0)
  sr_model, sr_params = random_params(sr_cfg, 64, 32, text_dim, 1)
  prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]

  print(f"jax {jax.__version__}, {jax.devices()[0].platform} x{jax.device_count()}, "
        f"batch {args.batch}, demo_base 32 px -> demo_sr 64 px, text {args.text}, "
        f"dynamic thresholding\n")
  print(f"{'sampler':<10}{'steps':>6}{'NFE':>5}{'guidance':>10}{'compile s':>11}"
        f"{'run s':>8}{'images/s':>10}{'ms/NFE':>8}")
  for name in args.samplers:
    num_steps = steps[name]
    nfe = 2 * num_steps - 1 if name == "heun" else num_steps
    for scale in (1.0, args.guidance):
      spec = dict(sampler=name, num_steps=num_steps, guidance_scale=scale)
      stages = [
          cascade_lib.Stage(base_model, base_params,
                            cascade_lib.StageSpec(resolution=32, **spec)),
          cascade_lib.Stage(sr_model, sr_params, cascade_lib.StageSpec(
              resolution=64, lowres_schedule="shifted_cosine", aug_level=0.0, **spec)),
      ]
      compile_s, run_s = time_cascade(cascade_lib.Cascade(stages, text), prompts,
                                      args.repeats)
      label = "none" if scale == 1.0 else f"cfg {scale:g}"
      print(f"{name:<10}{num_steps:>6}{nfe:>5}{label:>10}{compile_s:>11.1f}{run_s:>8.2f}"
            f"{args.batch / run_s:>10.3f}{run_s / nfe * 1e3:>8.0f}", flush=True)


if __name__ == "__main__":
  cli.call_main(main)
