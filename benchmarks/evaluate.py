"""Evaluation cost: images/s of the shapes probe (reading objects, and FD-probe features) at
32 and 64 px, and of a whole ShapesEval pass (sampling + judging) for a cascade, so the cost
of scoring is known before a sweep is planned.

The probe is the cached one (``--probe_path`` another; random params of the same network if
none is cached: its speed does not depend on the values, only decoding depends a little on
how many peaks it finds). The ShapesEval row samples ``--categories`` with
``--images_per_prompt`` through ``--workdirs`` (e.g. the demo's runs/demo/base,runs/demo/sr;
the row is skipped without them) at the stages' own sampler settings; its time includes
the probe's accuracy check on real images that every evaluation runs ("fixed s").

  python benchmarks/evaluate.py [--workdirs=runs/demo/base,runs/demo/sr] [--repeats 3]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from benchmarks import common  # noqa: E402


def _probe(path):
  import jax
  import jax.numpy as jnp

  from diffusion_jax.evaluation import probe as probe_lib

  if path:
    return probe_lib.load(path), str(path)
  cached = probe_lib.cache_path(probe_lib.ProbeSettings())
  if cached.exists():
    return probe_lib.load(cached), str(cached)
  settings = probe_lib.ProbeSettings()
  params = probe_lib.ProbeNet(settings.width).init(
      jax.random.key(0), jnp.zeros((1, probe_lib.INPUT_SIZE, probe_lib.INPUT_SIZE, 3)))
  return probe_lib.Probe(params["params"], settings), "random params (no cached probe)"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--probe_path", default=None)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workdirs", default="", help="Stages to run a ShapesEval pass on.")
  parser.add_argument("--categories", default="colour_shape")
  parser.add_argument("--images_per_prompt", type=int, default=1)
  args = parser.parse_args(argv)

  from diffusion_jax.evaluation import probe_accuracy

  probe, source = _probe(args.probe_path)
  print(f"probe: {source}")
  rows = []
  for resolution in (32, 64):
    images, _ = probe_accuracy.real_examples("validation", args.batch, resolution)
    for what, fn in (("probe read", probe.read), ("probe features", probe.features)):
      seconds = common.median_seconds(lambda fn=fn, images=images: fn(images), args.repeats)
      rows.append((f"{what} {resolution} px", args.batch, seconds, args.batch / seconds, ""))
  if args.workdirs:
    import builders
    import evaluating

    builders.setup_compilation_cache()
    categories = args.categories.split(",")
    with tempfile.TemporaryDirectory() as out:
      start = time.perf_counter()
      probe_accuracy.measure(probe)  # what every evaluation runs first, timed alone
      fixed = time.perf_counter() - start
      start = time.perf_counter()
      result = evaluating.run_evaluation(
          outdir=out, workdirs=args.workdirs.split(","), categories=categories,
          images_per_prompt=args.images_per_prompt, fd_images=0, probe=probe,
          log=lambda s: None)
      seconds = time.perf_counter() - start
    n = result["summary"]["all_images"]["n"]
    rows.append((f"ShapesEval pass ({','.join(categories)}), incl. compile", n, seconds,
                 n / seconds, f"of which the probe's accuracy check {fixed:.1f} s"))
    rows.append(("  its sampling + judging alone", n, seconds - fixed,
                 n / (seconds - fixed), ""))
  print("| what | images | s | images/s | note |")
  print("|---|---|---|---|---|")
  for what, n, seconds, rate, note in rows:
    print(f"| {what} | {n} | {seconds:.3f} | {rate:.1f} | {note} |")


if __name__ == "__main__":
  main()
