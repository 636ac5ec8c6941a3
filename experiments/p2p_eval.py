"""Prompt-to-Prompt measured by the shapes probe: edit.py's ``p2p-eval`` sub-command.

A case is a seen colour x shape prompt ("a red circle") and its word swap to another colour
("a blue circle"). For each case the base stage samples the source, the target with the
source's cross-attention maps for the first --replace_fraction of the steps (Hertz et al.
2022), and the plain target from the same noise (re-prompting with the seed kept, the
usual baseline). The probe reads all three; an edit is scored on

  * ``colour``: the target's colour is read;
  * ``shape kept``: the shape read is the one read in the source sample;
  * ``position kept``: the object is within 0.08 image widths of the source's;
  * ``all``: the three at once (the attribute changed, the layout kept).

Rates carry Wilson 95% intervals; writes p2p_eval.md / .json / .png to --outdir.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

POSITION_TOLERANCE = 0.08  # image widths, as edit_score's "unchanged"
BATCH = 16


def cases(num: int, seed: int = 0) -> list[tuple[str, str, str]]:
  """(source colour, target colour, shape) triples, deterministic in ``seed``: seen pairs on
  both sides (no held-out pair), cycling through the shapes."""
  from diffusion_jax.data import shapes

  colors = sorted(shapes.COLORS)
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < num:
    shape = shapes.SHAPES[len(out) % len(shapes.SHAPES)]
    a, b = (colors[i] for i in rng.choice(len(colors), 2, replace=False))
    if (a, shape) in shapes.HELD_OUT_PAIRS or (b, shape) in shapes.HELD_OUT_PAIRS:
      continue
    out.append((a, b, shape))
  return out


def _main_object(detections):
  return max(detections, key=lambda d: d.score) if detections else None


def score(triples, source_reads, edited_reads) -> dict:
  """Cells of colour / shape kept / position kept / all for one method's readings."""
  from diffusion_jax.evaluation import shapes_eval

  hits = {"colour": [], "shape_kept": [], "position_kept": [], "all": []}
  for (_, target_colour, _), src, edit in zip(triples, source_reads, edited_reads,
                                              strict=True):
    s, e = _main_object(src), _main_object(edit)
    colour = e is not None and e.color == target_colour
    shape = e is not None and s is not None and e.shape == s.shape
    position = (e is not None and s is not None
                and np.hypot(e.x - s.x, e.y - s.y) <= POSITION_TOLERANCE)
    for name, ok in (("colour", colour), ("shape_kept", shape), ("position_kept", position),
                     ("all", colour and shape and position)):
      hits[name].append(bool(ok))
  return {name: shapes_eval.cell(v) for name, v in hits.items()}


def markdown(summaries: dict) -> str:
  def fmt(c):
    low, high = c["ci95"]
    return f"{c['accuracy']:.3f} [{low:.3f}, {high:.3f}]"

  lines = ["| method | target colour | shape kept | position kept | all three |",
           "|---|---|---|---|---|"]
  for name, s in summaries.items():
    lines.append(f"| {name} | {fmt(s['colour'])} | {fmt(s['shape_kept'])} "
                 f"| {fmt(s['position_kept'])} | {fmt(s['all'])} |")
  return "\n".join(lines) + "\n"


def run(stage, encoder, described, f, *, sample_pair) -> pathlib.Path:
  """``sample_pair(sources, targets, first_index)`` -> (source, p2p target, plain target)
  images [B, H, W, C] in [-1, 1] (edit.py's p2p sampling)."""
  from diffusion_jax import images as images_lib
  from diffusion_jax.evaluation import probe as probe_lib

  triples = cases(f.num_cases, f.seed)
  probe = (probe_lib.load(f.probe_path) if f.probe_path else
           probe_lib.load_or_train(log=print))
  outs = {"source": [], "p2p": [], "plain": []}
  for start in range(0, len(triples), BATCH):
    chunk = triples[start:start + BATCH]
    chunk = chunk + [chunk[-1]] * (BATCH - len(chunk))  # one compiled batch size
    sources = [f"a {a} {s}" for a, _, s in chunk]
    targets = [f"a {b} {s}" for _, b, s in chunk]
    for name, images in zip(outs, sample_pair(sources, targets, start), strict=True):
      outs[name].append(np.asarray(images_lib.to_uint8(np.asarray(images))))
  outs = {k: np.concatenate(v)[:len(triples)] for k, v in outs.items()}
  reads = {k: probe.read(v) for k, v in outs.items()}
  summaries = {f"Prompt-to-Prompt ({f.replace_fraction:g} of the steps)":
               score(triples, reads["source"], reads["p2p"]),
               "plain target, same noise": score(triples, reads["source"], reads["plain"])}
  outdir = pathlib.Path(f.outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  table = markdown(summaries)
  (outdir / "p2p_eval.md").write_text(table)
  (outdir / "p2p_eval.json").write_text(json.dumps(
      {"stage": described, "num_cases": len(triples), "seed": f.seed,
       "replace_fraction": f.replace_fraction, "cases": triples, "scores": summaries},
      indent=2, default=str))
  shown = min(8, len(triples))
  tiles = np.concatenate([outs["source"][:shown], outs["plain"][:shown], outs["p2p"][:shown]])
  captions = ([f"a {a} {s}" for a, _, s in triples[:shown]]
              + [f"plain: a {b} {s}" for _, b, s in triples[:shown]]
              + [f"p2p: a {b} {s}" for _, b, s in triples[:shown]])
  res = outs["source"].shape[1]
  grid = images_lib.make_grid(tiles, captions, columns=shown, scale=max(1, 128 // res))
  images_lib.save_png(grid, outdir / "p2p_eval.png")
  print(table, end="")
  print(f"wrote {outdir / 'p2p_eval.md'}, p2p_eval.json, p2p_eval.png")
  return outdir / "p2p_eval.md"
