"""U-Net throughput on this machine: train step and forward images/s, FLOPs, peak memory.

  .venv/bin/python benchmarks/unet.py                       # 32 and 64 px, batch 16
  .venv/bin/python benchmarks/unet.py --resolutions 32 --steps 3
  .venv/bin/python benchmarks/unet.py --dtype bfloat16 --ynn  # bf16 with XLA's YNN fusions
  make bench-peer                                            # also imagen-pytorch, diffusers
  .venv/bin/python benchmarks/unet.py --peer --peers diffusers --ours_overrides=model.remat=true
  .venv/bin/python benchmarks/unet.py --params              # parameter count of every preset

Each resolution runs in its own subprocess, so "peak RSS" is that resolution's alone.
FLOPs per train step are the model's, from XLA's cost analysis (benchmarks/common.py:
long-sequence attention counted as dense, without its backward-pass recomputation); the
fraction of peak divides the achieved FLOP/s by a 2048x2048 float32 matmul's, measured
in the same process.

``--peer`` runs imagen-pytorch 2.1.0's Unet of the same configuration
(benchmarks/peer_imagen_pytorch.py, torch CPU, 2 threads) in its own subprocess right
after ours at each resolution, so the "vs peer" columns are ratios measured side by side.
Without it they divide by figures recorded once on this kind of machine
(shared/PERF-NOTES.md: 9.3 img/s training at 32 px, 1.33 img/s at 64 px, 7.5 GB peak RSS
at 64 px), which only mean something on an idle machine of the same kind.

``--peer`` also runs diffusers' UNet2DConditionModel of the closest configuration
(benchmarks/peer_diffusers.py) in float32 and under bf16 autocast, and ours in float32
and bfloat16, each in its own subprocess, and prints a second table: every mode's train
and forward images/s, counted GFLOP/s and peak RSS, and ours / the best peer mode.
``--peers`` picks which peers run; ``--ours_overrides`` (``field=value,...`` of our
UNetConfig, ``model.`` prefix allowed) changes our network in every run of ours.

The two networks share their hyperparameters (widths, blocks, attention levels, heads),
not their architecture: imagen-pytorch adds a Perceiver text resampler, a feed-forward
after every attention, a global-context block and one more skip per level, so it has
more parameters and FLOPs. The table therefore also gives GFLOP/s, the work-normalised
comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import common
import peer_diffusers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import cli  # noqa: E402  (experiments/cli.py: one error line, exit 2)

PEER = {32: dict(train=9.3, forward=16 / 0.53, rss_gb=2.3),
        64: dict(train=1.33, forward=16 / 3.85, rss_gb=7.5)}
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"
HUGEPAGES = "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"


def parse_args(argv=None):
  parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="imagen_pytorch_cpu")
  parser.add_argument("--resolutions", default="32,64")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--conv_impl", default="xla",
                      choices=["xla", "matmul", "shifted"],
                      help="how convolutions run (diffusion_jax/models/fast_conv.py)")
  parser.add_argument("--ynn", action="store_true", help="XLA CPU YNN dot/conv fusions")
  parser.add_argument("--hugepages", action="store_true",
                      help=f"run with {HUGEPAGES} (glibc's malloc asks for transparent huge "
                      "pages, so XLA's large buffers fault in far fewer pages)")
  parser.add_argument("--peer", action="store_true",
                      help="also run the peers (--peers; make bench-peer installs "
                      "imagen-pytorch)")
  parser.add_argument("--peers", default="imagen_pytorch,diffusers",
                      help="with --peer: which peers run (comma-separated)")
  parser.add_argument("--peer_heads", default="count", choices=("count", "width"),
                      help="diffusers' heads: our head count (8) or our head width (64)")
  parser.add_argument("--ours_overrides", default="",
                      help="field=value,... of our UNetConfig for every run of ours")
  parser.add_argument("--params", action="store_true",
                      help="print every preset's parameter count (jax.eval_shape) and exit")
  parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def run_one(args, resolution: int) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from diffusion_jax.models import unet

  config = common.override_fields(
      dataclasses.replace(unet.PRESETS[args.preset], dtype=args.dtype, remat=args.remat,
                          conv_impl=args.conv_impl),
      args.ours_overrides)
  model = unet.UNet(config)
  inputs = unet.example_inputs(config, batch=args.batch, resolution=resolution)
  key = jax.random.key(0)
  inputs["x_t"] = jax.random.normal(key, inputs["x_t"].shape)
  target = jax.random.normal(jax.random.fold_in(key, 1), inputs["x_t"].shape)
  params = jax.jit(lambda k: nn.unbox(model.init(k, **unet.example_inputs(config))))(key)
  params = params["params"]
  num_params = sum(p.size for p in jax.tree.leaves(params))
  optimizer = optax.adamw(1e-4)
  opt_state = optimizer.init(params)

  def train_step(params, opt_state, inputs, target, key):
    def loss_fn(p):
      pred = model.apply({"params": p}, **inputs, train=True, rngs={"dropout": key})
      return jnp.mean((pred - target) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, inputs, target, key).compile()
  compile_s = time.perf_counter() - start
  flops = common.model_gflop(step, params, opt_state, inputs, target, key) * 1e9
  state = [params, opt_state]

  def one_step():
    state[0], state[1], loss = compiled(state[0], state[1], inputs, target, key)
    return loss

  train_s = common.median_seconds(one_step, args.steps)
  forward = jax.jit(lambda p, inp: model.apply({"params": p}, **inp))
  forward_s = common.median_seconds(lambda: forward(state[0], inputs), args.steps)
  # The peak is measured between the timed runs so that both see the same machine load.
  peak = common.matmul_peak_gflops()
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return dict(resolution=resolution, batch=args.batch, params=num_params, gflop=flops / 1e9,
              compile_s=compile_s, train_s=train_s,
              train_ips=args.batch / train_s,
              forward_ips=args.batch / forward_s, gflops=flops / 1e9 / train_s,
              peak_gflops=peak, rss_gb=rss_gb)


def run_subprocess(command, env) -> dict | None:
  out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    print(out.stderr[-3000:], file=sys.stderr)
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


def print_param_counts():
  from diffusion_jax.models import unet
  print(f"{'preset':>20} | {'resolution':>10} | {'params':>9} | {'paper':>6} | ratio")
  for name, config in unet.PRESETS.items():
    count = unet.count_params(config)
    paper = unet.PAPER_PARAMS.get(name)
    print(f"{name:>20} | {config.resolution:>10} | {count / 1e6:8.1f}M | "
          + (f"{paper / 1e6:5.0f}M | {count / paper:.2f}x" if paper else f"{'-':>6} | -"))


def main(argv=None):
  args = parse_args(argv)
  if args.params:
    print_param_counts()
    return
  if args.single:
    print(json.dumps(run_one(args, args.single)))
    return
  peers = [p for p in args.peers.split(",") if p] if args.peer else []
  unknown = set(peers) - {"imagen_pytorch", "diffusers"}
  if unknown:
    raise cli.UserError(f"--peers: unknown {', '.join(sorted(unknown))}; choose from "
                        "imagen_pytorch, diffusers")
  from diffusion_jax.models import unet
  if args.preset not in unet.PRESETS:
    raise cli.UserError(f"--preset={args.preset!r}: choose one of {', '.join(unet.PRESETS)}")
  common.override_fields(unet.PRESETS[args.preset], args.ours_overrides)  # fails early
  env = dict(os.environ)
  if args.ynn:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + YNN_FLAG).strip()
  if args.hugepages:
    name, value = HUGEPAGES.split("=", 1)
    env[name] = ":".join(x for x in (env.get(name), value) if x)
  passthrough = ["--preset", args.preset, "--batch", str(args.batch), "--steps",
                 str(args.steps), "--dtype", args.dtype, "--conv_impl", args.conv_impl,
                 "--ours_overrides", args.ours_overrides] + (["--remat"] if args.remat else [])
  peer_script = str(pathlib.Path(__file__).with_name("peer_imagen_pytorch.py"))
  rows, diffusers_rows = [], []
  for resolution in (int(r) for r in args.resolutions.split(",")):
    ours = run_subprocess([sys.executable, __file__, *passthrough, "--single",
                           str(resolution)], env)
    if ours is None:
      continue
    if "diffusers" in peers:
      diffusers_rows.append(peer_diffusers.measure_beside(
          args, resolution, ours, run_subprocess, env,
          lambda dtype, r=resolution: [sys.executable, __file__, *passthrough, "--dtype", dtype,
                                       "--single", str(r)]))
    peer = PEER.get(resolution, {})
    if "imagen_pytorch" in peers:
      measured = run_subprocess([sys.executable, peer_script, "--resolution", str(resolution),
                                 "--batch", str(args.batch), "--steps", str(args.steps)],
                                dict(os.environ))
      if measured is not None:
        peer = dict(train=measured["train_ips"], forward=measured["forward_ips"],
                    rss_gb=measured["rss_gb"], params=measured["params"], measured=True)
    rows.append((ours, peer))
  flags = (f"{args.dtype} conv={args.conv_impl}{' remat' if args.remat else ''}"
           f"{' ynn' if args.ynn else ''}{' hugepages' if args.hugepages else ''}")
  print(f"\nU-Net {args.preset} ({flags}), batch {args.batch}, median of {args.steps} steps")
  header = ("res", "params", "GFLOP/step", "train img/s", "vs peer", "fwd img/s", "vs peer",
            "GFLOP/s", "% of peak", "peak RSS GB", "vs peer", "compile s", "peer")
  print(" | ".join(f"{h:>11}" for h in header))
  for r, peer in rows:
    ratio = lambda ours, key, peer=peer: f"{ours / peer[key]:.2f}x" if key in peer else "-"
    cells = (r["resolution"], f"{r['params'] / 1e6:.2f}M", f"{r['gflop']:.0f}",
             f"{r['train_ips']:.2f}", ratio(r["train_ips"], "train"),
             f"{r['forward_ips']:.1f}", ratio(r["forward_ips"], "forward"),
             f"{r['gflops']:.0f}", f"{100 * r['gflops'] / r['peak_gflops']:.0f}% of "
             f"{r['peak_gflops']:.0f}", f"{r['rss_gb']:.2f}", ratio(r["rss_gb"], "rss_gb"),
             f"{r['compile_s']:.0f}", "measured" if peer.get("measured") else "recorded")
    print(" | ".join(f"{str(c):>11}" for c in cells))
  for r, peer in rows:
    if peer.get("measured"):
      print(f"  {r['resolution']} px peer: {peer['params'] / 1e6:.2f}M params, "
            f"{peer['train']:.2f} train img/s, {peer['forward']:.1f} fwd img/s, "
            f"{peer['rss_gb']:.2f} GB peak RSS")
  if diffusers_rows:
    peer_diffusers.print_table(
        [cells for rows_at in diffusers_rows for cells in rows_at],
        f"diffusers UNet2DConditionModel ({args.peer_heads} heads) beside ours "
        f"({args.preset}{', ' + args.ours_overrides if args.ours_overrides else ''}), "
        f"batch {args.batch}, median of {args.steps} steps; x = ours / the best peer mode")


if __name__ == "__main__":
  cli.call_main(main)
