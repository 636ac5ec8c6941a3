"""The peer, measured beside us: imagen-pytorch's Unet on torch CPU, same sizes as ours.

  make bench-peer   # installs the peer into .cache/peer, then runs benchmarks/unet.py --peer

Run by ``benchmarks/unet.py --peer`` in its own subprocess per resolution (so peak RSS is
that run's alone); prints one JSON line: params, train-step and forward seconds, peak RSS.
Configuration (shared/PERF-NOTES.md): Unet(dim=64, dim_mults=(1, 2, 4),
num_resnet_blocks=2, layer_attns=(F, T, T), layer_cross_attns=(F, T, T),
text_embed_dim=256, cond_dim=256, attn_heads=8, attn_dim_head=64), batch 16, 16 text
tokens, 2 torch threads, an AdamW step on an MSE loss, as our benchmark does.

imagen-pytorch 2.1.0 is installed with ``pip --target .cache/peer --no-deps`` plus the few
modules its U-Net needs (einops, beartype, kornia): its declared dependencies include
torchvision, which has no CPU build on these machines and would pull a CUDA torch. The
package's ``__init__`` imports its trainer (accelerate, ...) and a T5 helper that goes to
the hub, so this script imports only ``imagen_pytorch.imagen_pytorch`` and puts inert
placeholder modules in ``sys.modules`` for the parts the U-Net never calls (the T5 helper,
torchvision's transforms). Nothing of the peer's code is copied here.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import resource
import sys
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import cli  # noqa: E402  (experiments/cli.py: one error line, exit 2)

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER_DIR = ROOT / ".cache" / "peer"
PEER_PACKAGES = ("imagen-pytorch==2.1.0", "einops==0.8.2", "einops-exts==0.0.4",
                 "beartype==0.23.1", "kornia==0.9.0", "kornia-rs==0.2.0", "ema-pytorch==0.8.3")


def import_peer_unet():
  """imagen_pytorch's Unet class, without running the package's __init__."""
  if not (PEER_DIR / "imagen_pytorch").is_dir():
    raise cli.UserError(f"imagen-pytorch is not installed in {PEER_DIR}: run `make bench-peer`.")
  sys.path.insert(0, str(PEER_DIR))
  # transformers decides once whether torchvision exists; ask before the placeholder lands.
  from transformers.utils import import_utils
  import_utils.is_torchvision_available()
  torchvision = types.ModuleType("torchvision")
  torchvision.transforms = types.ModuleType("torchvision.transforms")
  t5 = types.ModuleType("imagen_pytorch.t5")
  t5.DEFAULT_T5_NAME, t5.t5_encode_text = "unused", None
  t5.get_encoded_dim = lambda name: 256
  package = types.ModuleType("imagen_pytorch")
  package.__path__ = [str(PEER_DIR / "imagen_pytorch")]
  sys.modules.update({"torchvision": torchvision,
                      "torchvision.transforms": torchvision.transforms,
                      "imagen_pytorch": package, "imagen_pytorch.t5": t5})
  return importlib.import_module("imagen_pytorch.imagen_pytorch").Unet


def median_seconds(fn, steps: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def run(resolution: int, batch: int, steps: int, threads: int) -> dict:
  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  Unet = import_peer_unet()
  model = Unet(dim=64, dim_mults=(1, 2, 4), num_resnet_blocks=2,
               layer_attns=(False, True, True), layer_cross_attns=(False, True, True),
               text_embed_dim=256, cond_dim=256, attn_heads=8, attn_dim_head=64)
  params = sum(p.numel() for p in model.parameters())
  x = torch.randn(batch, 3, resolution, resolution)
  target = torch.randn_like(x)
  times = torch.rand(batch)
  text = torch.randn(batch, 16, 256)
  mask = torch.ones(batch, 16, dtype=torch.bool)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    pred = model(x, times, text_embeds=text, text_mask=mask)
    loss = torch.mean((pred - target) ** 2)
    loss.backward()
    optimizer.step()

  train_s = median_seconds(train_step, steps)
  with torch.no_grad():
    forward_s = median_seconds(lambda: model(x, times, text_embeds=text, text_mask=mask),
                               steps)
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return dict(resolution=resolution, params=params, train_s=train_s, forward_s=forward_s,
              train_ips=batch / train_s, forward_ips=batch / forward_s, rss_gb=rss_gb)


def main():
  parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  print(json.dumps(run(args.resolution, args.batch, args.steps, args.threads)))


if __name__ == "__main__":
  cli.call_main(main)
