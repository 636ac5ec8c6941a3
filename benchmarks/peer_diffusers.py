"""The strongest peer, measured beside us: diffusers' UNet2DConditionModel on torch CPU.

  make bench-peer   # benchmarks/unet.py --peer: ours, imagen-pytorch and this, one table
  .venv/bin/python benchmarks/peer_diffusers.py --resolution 32 --mode bf16_autocast

Run by ``benchmarks/unet.py --peer`` in its own subprocess per (resolution, mode), so peak
RSS is that configuration's alone; prints one JSON line (params, train-step and forward
seconds and images/s, counted GFLOP per train step and per forward, GFLOP/s, peak RSS).
Modes: ``float32``, and ``bf16_autocast`` (``torch.autocast("cpu", dtype=torch.bfloat16)``
around the forward pass: matmuls and convolutions in bf16, parameters, AdamW and the loss
in float32). A train step is zero_grad, forward, MSE loss, backward, AdamW step; its
time is the median of ``--steps`` steps after one warm-up step.

Configuration: ``unet_kwargs(config)`` maps our U-Net preset (the benchmark's
``imagen_pytorch_cpu``) onto the closest UNet2DConditionModel: one down/up block per
level with the level's width (block_out_channels (64, 128, 256)) and residual-block
count (2), cross-attention blocks wherever our level has attention, 8 heads, text tokens
as wide as ours (256) and as many (16, with an all-true mask as ours gets), a 256-wide
time embedding (4 x 64, like our cond_dim). What the architectures do not share: each
diffusers attention level puts a transformer (self-attention, cross-attention, GEGLU
feed-forward) after every residual block where ours has one self- and one
cross-attention per level, its attention width is the block's width (ours: 8 x 64), its
mid block adds two residual blocks and a transformer at the lowest resolution, and its
up blocks have one residual block more. So it has more parameters (24.8 M against our
12.5 M) and 1.6-1.9x our FLOPs per train step (64 / 32 px): compare GFLOP/s as well.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions and attention, forward and backward), as the XLA cost analysis counts ours
(benchmarks/common.py; it also counts elementwise work, a few percent). torch's counter
has no formula for the CPU flash-attention kernel that ``scaled_dot_product_attention``
dispatches to on CPU, so ``CPU_ATTENTION_FLOPS`` adds it: the same matmul count the
counter uses for the other attention kernels (tests/test_bench_peer.py checks it against
the counted explicit matmuls of torch's math backend).

diffusers 0.42.1 and torch 2.13.0 (CPU wheel) come with the package's test extras
(setup.py), so nothing is installed for this peer. Nothing of diffusers' code is copied.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import cli  # noqa: E402  (experiments/cli.py: one error line, exit 2)

MODES = ("float32", "bf16_autocast")
HEADS = ("count", "width")


def unet_kwargs(config, heads: str = "count") -> dict:
  """UNet2DConditionModel keyword arguments closest to our ``UNetConfig`` ``config``.

  ``heads='count'`` keeps our number of heads (head width = block width / heads);
  ``'width'`` keeps our head width (heads = block width / head_dim). diffusers names the
  head count ``attention_head_dim`` (a historical misnomer it keeps for compatibility).
  """
  if heads not in HEADS:
    raise cli.UserError(f"--heads={heads!r}: choose one of {', '.join(HEADS)}")
  levels = config.levels
  widths = [config.base_channels * level.channel_mult for level in levels]
  down = ["CrossAttnDownBlock2D" if level.cross_attention or level.self_attention
          else "DownBlock2D" for level in levels]
  if heads == "count":
    head_counts = [config.num_heads] * len(levels)
  else:
    head_width = config.head_dim or widths[-1] // config.num_heads
    head_counts = [max(1, width // head_width) for width in widths]
  return dict(
      in_channels=config.in_channels, out_channels=config.out_channels,
      down_block_types=down, up_block_types=[d.replace("Down", "Up") for d in reversed(down)],
      block_out_channels=widths, layers_per_block=[level.num_res_blocks for level in levels],
      cross_attention_dim=config.text_width, attention_head_dim=head_counts,
      text_length=config.text_length)


def build_unet(kwargs: dict, resolution: int):
  """(UNet2DConditionModel, text_length) from ``unet_kwargs``' dict (JSON-able)."""
  from diffusers import UNet2DConditionModel
  kwargs = dict(kwargs)
  text_length = kwargs.pop("text_length")
  for key in ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
              "attention_head_dim"):
    if isinstance(kwargs.get(key), list):
      kwargs[key] = tuple(kwargs[key])
  return UNet2DConditionModel(sample_size=resolution, **kwargs), text_length


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None,
                         **kwargs) -> int:
  """Forward: scores q k^T [B, H, Lq, Lk] and output p v, 2 FLOPs per multiply-add."""
  batch, heads, lq, dq = query_shape
  lk, dv = key_shape[2], value_shape[3]
  return 2 * batch * heads * lq * lk * (dq + dv)


def _cpu_attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args,
                                  out_shape=None, **kwargs) -> int:
  """Backward: the four matmuls giving dp, dv, dq, dk (twice the forward's); the scores'
  recomputation is not model work."""
  return 2 * _cpu_attention_flops(query_shape, key_shape, value_shape)


def cpu_attention_flops() -> dict:
  """FlopCounterMode custom_mapping for the CPU flash-attention kernels."""
  import torch
  aten = torch.ops.aten
  return {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
          aten._scaled_dot_product_flash_attention_for_cpu_backward:
              _cpu_attention_backward_flops}


def counted_flops(fn) -> tuple[int, object]:
  """(FLOPs torch's counter sees in ``fn()``, its return value)."""
  from torch.utils.flop_counter import FlopCounterMode
  counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_flops())
  with counter:
    out = fn()
  return counter.get_total_flops(), out


def _median_after_warmup(fn, steps: int) -> tuple[float, int]:
  """(median seconds of ``steps`` calls, FLOPs counted in the warm-up call)."""
  flops, _ = counted_flops(fn)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2], flops


def make_steps(model, resolution: int, batch: int, text_length: int, mode: str):
  """(train_step, forward) closures over fixed random inputs of the given sizes: x
  [B, C, H, W], timesteps [B] in [0, 1000), text [B, L, cross_attention_dim], mask [B, L]."""
  import torch
  if mode not in MODES:
    raise cli.UserError(f"--mode={mode!r}: choose one of {', '.join(MODES)}")
  cfg = model.config
  x = torch.randn(batch, cfg.in_channels, resolution, resolution)
  target = torch.randn(batch, cfg.out_channels, resolution, resolution)
  timesteps = torch.rand(batch) * 1000
  text = torch.randn(batch, text_length, cfg.cross_attention_dim)
  mask = torch.ones(batch, text_length, dtype=torch.bool)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def autocast():
    if mode == "bf16_autocast":
      return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def forward():
    with autocast():
      return model(x, timesteps, encoder_hidden_states=text, encoder_attention_mask=mask,
                   return_dict=False)[0]

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.mean((forward().float() - target) ** 2)
    loss.backward()
    optimizer.step()
    return loss

  def forward_only():
    with torch.no_grad():
      return forward()

  return train_step, forward_only


def run(kwargs: dict, resolution: int, batch: int, steps: int, threads: int, mode: str) -> dict:
  """One configuration's measurements (see the module docstring); JSON-able."""
  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model, text_length = build_unet(kwargs, resolution)
  params = sum(p.numel() for p in model.parameters())
  train_step, forward = make_steps(model, resolution, batch, text_length, mode)
  train_s, train_flops = _median_after_warmup(train_step, steps)
  forward_s, forward_flops = _median_after_warmup(forward, steps)
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return dict(resolution=resolution, mode=mode, batch=batch, params=params,
              gflop=train_flops / 1e9, forward_gflop=forward_flops / 1e9,
              train_s=train_s, forward_s=forward_s, train_ips=batch / train_s,
              forward_ips=batch / forward_s, gflops=train_flops / 1e9 / train_s,
              rss_gb=rss_gb, threads=threads)


def best_peer(peers: list[dict]) -> dict:
  """Per column, the best of the peer's modes: highest throughput, lowest peak RSS."""
  return dict(train_ips=max(p["train_ips"] for p in peers),
              forward_ips=max(p["forward_ips"] for p in peers),
              gflops=max(p["gflops"] for p in peers), rss_gb=min(p["rss_gb"] for p in peers))


COLUMNS = ("res", "model", "params", "GFLOP/step", "train img/s", "fwd img/s", "GFLOP/s",
           "peak RSS GB", "train x", "fwd x", "GFLOP/s x", "RSS x")


def table_rows(ours: dict[str, dict], peers: dict[str, dict]) -> list[tuple]:
  """One resolution's rows: every peer mode, then ours per dtype with ratios (ours / the
  best peer mode of that column; RSS: ours / the lowest). ``ours`` maps dtype -> a
  ``benchmarks/unet.py --single`` row; ``peers`` maps mode -> ``run``'s row."""
  best = best_peer(list(peers.values())) if peers else None
  rows = []
  for label, row in [(f"diffusers {m}", r) for m, r in peers.items()] + [
      (f"ours {d}", r) for d, r in ours.items()]:
    cells = (row["resolution"], label, f"{row['params'] / 1e6:.2f}M", _gflop(row["gflop"]),
             f"{row['train_ips']:.2f}", f"{row['forward_ips']:.2f}", _gflop(row["gflops"]),
             f"{row['rss_gb']:.2f}")
    if label.startswith("ours") and best:
      cells += tuple(f"{row[key] / best[key]:.2f}x"
                     for key in ("train_ips", "forward_ips", "gflops", "rss_gb"))
    else:
      cells += ("",) * 4
    rows.append(cells)
  return rows


def _gflop(value: float) -> str:
  return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def print_table(rows: list[tuple], title: str) -> None:
  print(f"\n{title}")
  widths = [max(len(str(c)) for c in column) for column in zip(COLUMNS, *rows, strict=True)]
  for cells in [COLUMNS, *rows]:
    print(" | ".join(f"{str(c):>{w}}" for c, w in zip(cells, widths, strict=True)))


def measure_beside(args, resolution: int, ours: dict, run_subprocess, env: dict,
                   ours_command) -> list[tuple]:
  """``benchmarks/unet.py --peer``'s diffusers part at one resolution: ours in the dtype
  not run yet (``ours_command(dtype)`` is its argv), then the peer in every mode, each in
  its own subprocess (``run_subprocess(argv, env) -> row or None``); ``table_rows``."""
  import common

  from diffusion_jax.models import unet
  config = common.override_fields(unet.PRESETS[args.preset], args.ours_overrides)
  kwargs = unet_kwargs(config, args.peer_heads)
  by_dtype = {}
  for dtype in ("float32", "bfloat16"):
    row = ours if dtype == args.dtype else run_subprocess(ours_command(dtype), env)
    if row is not None:
      by_dtype[dtype] = row
  peers = {}
  for mode in MODES:
    row = run_subprocess([sys.executable, __file__, "--resolution", str(resolution),
                          "--batch", str(args.batch), "--steps", str(args.steps),
                          "--mode", mode, "--unet_kwargs", json.dumps(kwargs)],
                         dict(os.environ))
    if row is not None:
      peers[mode] = row
  return table_rows(by_dtype, peers)


def default_kwargs(preset: str, heads: str) -> dict:
  from diffusion_jax.models import unet
  if preset not in unet.PRESETS:
    raise cli.UserError(f"--preset={preset!r}: not a U-Net preset; choose one of "
                        f"{', '.join(unet.PRESETS)}")
  return unet_kwargs(unet.PRESETS[preset], heads)


def main():
  parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--mode", default="float32", choices=MODES)
  parser.add_argument("--heads", default="count", choices=HEADS)
  parser.add_argument("--preset", default="imagen_pytorch_cpu",
                      help="our U-Net preset to mirror (imports jax: its RSS counts)")
  parser.add_argument("--unet_kwargs", help="JSON of unet_kwargs(...) (benchmarks/unet.py "
                      "passes it, so this process never imports jax)")
  args = parser.parse_args()
  if min(args.resolution, args.batch, args.steps, args.threads) < 1:
    raise cli.UserError("--resolution, --batch, --steps and --threads must be >= 1")
  if args.unet_kwargs:
    try:
      kwargs = json.loads(args.unet_kwargs)
    except json.JSONDecodeError as e:
      raise cli.UserError(f"--unet_kwargs is not JSON ({e})") from None
  else:
    kwargs = default_kwargs(args.preset, args.heads)
  print(json.dumps(run(kwargs, args.resolution, args.batch, args.steps, args.threads,
                       args.mode)))


if __name__ == "__main__":
  cli.call_main(main)
