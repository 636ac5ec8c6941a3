"""ShapesEval: a fixed prompt suite for the shapes world, scored by the probe (GenEval-style).

Categories modelled on GenEval (Ghosh et al. 2023), every prompt a caption the dataset's
grammar produces (``shapes.parse_caption(prompt.text) == prompt.spec``):

- ``colour_shape``: "a red circle" for all 8 x 6 = 48 colour x shape pairs; the 6 held-out
  pairs (``shapes.HELD_OUT_PAIRS``) are reported separately;
- ``counting``: "two ..." / "three ..." of one kind (the grammar counts up to three);
- ``position``: one object "on the left" / "at the top" / "in the center" ...;
- ``relation``: "A to the left of B", "A above B" (and right of / below);
- ``binding``: "A and B" with different colours and shapes: both must be right, not swapped.

The grammar has no negation, colour-only or "next to" phrases, so neither has the suite.
Prompt lists are built by fixed rules (no randomness) and named by ``SUITE_VERSION``; change
the rules and the version must change. Image r of suite prompt p is image
``r * len(suite()) + p`` of the sampling run (``image_index``), so a score is reproducible,
the same image of a prompt is drawn whichever categories are evaluated, and more images per
prompt only add images. Scores carry Wilson 95% intervals.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from diffusion_jax.data import shapes
from diffusion_jax.evaluation import judge

SUITE_VERSION = "shapes-eval-v1"
CATEGORIES = ("colour_shape", "counting", "position", "relation", "binding")
COLORS = tuple(shapes.COLORS)


@dataclasses.dataclass(frozen=True)
class Prompt:
  category: str
  text: str
  spec: dict
  held_out: bool  # contains a held-out colour x shape pair


def _group(color, shape, count=1, size=None):
  return {"color": color, "shape": shape, "count": count, "size": size}


def prompt_text(spec: dict) -> str:
  """The grammar's first phrasing of ``spec``, without a prefix ("a red circle on the left")."""
  # The grammar's own noun phrases and phrase tables, so the suite cannot drift from it.
  phrases = [shapes._noun_phrase(g) for g in spec["groups"]]
  if spec["relation"]:
    return f"{phrases[0]} {shapes._RELATION_PHRASES[spec['relation']][0]} {phrases[1]}"
  if spec["position"]:
    return f"{phrases[0]} {shapes._POSITION_PHRASES[spec['position']][0]}"
  return " and ".join(phrases)


def _make(category, groups, relation=None, position=None) -> Prompt:
  kind = ("relation" if relation else "list" if len(groups) > 1
          else "count" if groups[0]["count"] > 1 else "single")
  spec = {"kind": kind, "groups": groups, "relation": relation, "position": position}
  held_out = any((g["color"], g["shape"]) in shapes.HELD_OUT_PAIRS for g in groups)
  return Prompt(category, prompt_text(spec), spec, held_out)


def _seen_color(index: int, shape: str) -> str:
  """The colour at ``index`` (cyclically), skipped past if it is held out with ``shape``."""
  color = COLORS[index % len(COLORS)]
  return COLORS[(index + 1) % len(COLORS)] if (color, shape) in shapes.HELD_OUT_PAIRS else color


def suite(categories: Sequence[str] | None = None) -> list[Prompt]:
  """The suite's prompts, in a fixed order (categories in ``CATEGORIES`` order)."""
  unknown = [c for c in categories or () if c not in CATEGORIES]
  if unknown:
    raise ValueError(f"unknown ShapesEval categor{'ies' if len(unknown) > 1 else 'y'} "
                     f"{', '.join(map(repr, unknown))}; choose from {', '.join(CATEGORIES)}.")
  out: list[Prompt] = []
  out += [_make("colour_shape", [_group(c, s)]) for c in COLORS for s in shapes.SHAPES]
  for i, s in enumerate(shapes.SHAPES):  # 12: each shape twice and thrice, seen colours
    out += [_make("counting", [_group(_seen_color(3 * i + n, s), s, n)]) for n in (2, 3)]
  for k in range(10):  # 10: each position twice
    s = shapes.SHAPES[5 * k % 6]
    out.append(_make("position", [_group(_seen_color(k + 1, s), s)],
                     position=shapes.POSITIONS[k % 5]))
  for k in range(12):  # 12: each relation three times, different colours and shapes
    a = _group(COLORS[2 * k % 8], shapes.SHAPES[k % 6])
    b = _group(COLORS[(2 * k + 5) % 8], shapes.SHAPES[(k + 3) % 6])
    out.append(_make("relation", [a, b], relation=shapes.RELATIONS[k % 4]))
  for k in range(12):  # 12: two objects, different colours and different shapes
    out.append(_make("binding", [_group(COLORS[k % 8], shapes.SHAPES[k % 6]),
                                 _group(COLORS[(k + 3) % 8], shapes.SHAPES[(k + 2) % 6])]))
  return [p for p in out if not categories or p.category in categories]


SUITE_SIZE = len(suite())


def image_index(prompt_index: int, replica: int) -> int:
  """The sampling-run index of image ``replica`` of suite prompt ``prompt_index``."""
  return replica * SUITE_SIZE + prompt_index


# ----------------------------------------------------------------------------------------------
# Sampling and scoring.


def sample_suite(sample_fn: Callable[[list[str], int], np.ndarray], categories, images_per_prompt,
                 batch_size: int = 48, progress: Callable[[int, int], None] | None = None):
  """Samples the suite: (records, uint8 images [N, H, W, 3]), one record per image.

  ``sample_fn(prompts, first_index)`` -> uint8 images [len(prompts), H, W, 3], image b
  being image ``first_index + b`` of the run. Calls always pass ``batch_size`` prompts (runs
  of consecutive indices, padded with extra indices whose images are dropped), so a compiled
  sampler is reused. ``progress(done, total)`` after each call.
  """
  if images_per_prompt < 1:
    raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}.")
  full = suite()
  wanted = set(categories or CATEGORIES)
  indices = [i for i, p in enumerate(full) if p.category in wanted]
  blocks = _blocks(indices)
  batch_size = min(batch_size, max(len(b) for b in blocks))  # no call pads more than needed
  batches = []
  for r in range(images_per_prompt):
    for block in blocks:  # runs of consecutive suite indices
      for s in range(0, len(block), batch_size):
        batches.append((r, block[s:s + batch_size]))
  total = len(indices) * images_per_prompt
  records, images, done = [], [], 0
  for r, chunk in batches:
    first = image_index(chunk[0], r)
    # Padding continues the run of indices (its images are dropped) with the last prompt.
    texts = [full[i].text for i in chunk] + [full[chunk[-1]].text] * (batch_size - len(chunk))
    out = np.asarray(sample_fn(texts, first))[:len(chunk)]
    for i, image in zip(chunk, out, strict=True):
      records.append({"prompt_index": i, "replica": r, "image_index": image_index(i, r),
                      "category": full[i].category, "prompt": full[i].text,
                      "held_out": full[i].held_out})
      images.append(image)
    done += len(chunk)
    if progress:
      progress(done, total)
  return records, np.stack(images)


def _blocks(indices: list[int]) -> list[list[int]]:
  blocks: list[list[int]] = []
  for i in indices:
    if blocks and i == blocks[-1][-1] + 1:
      blocks[-1].append(i)
    else:
      blocks.append([i])
  return blocks


def judge_records(records: list[dict], readings: list[list[judge.Detection]]) -> list[dict]:
  """Adds each image's verdict (per attribute) and what the probe read to its record."""
  full = suite()
  for record, detections in zip(records, readings, strict=True):
    record["verdict"] = judge.verify(full[record["prompt_index"]].spec, detections)
    record["correct"] = record["verdict"]["correct"]
    record["read"] = judge.describe(detections)
  return records


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (Wilson 1927); (0, 1) for n = 0."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  # At k = 0 (k = n) the bound is exactly 0 (1); computed, it is off by a rounding error.
  low = 0.0 if successes == 0 else max(0.0, centre - half)
  high = 1.0 if successes == n else min(1.0, centre + half)
  return low, high


def cell(hits: list[bool]) -> dict:
  """{correct, n, accuracy, ci95 (Wilson 95%)} of a list of right / wrong."""
  k, n = int(sum(hits)), len(hits)
  low, high = wilson_interval(k, n)
  return {"correct": k, "n": n, "accuracy": k / n if n else float("nan"), "ci95": [low, high]}


def summarise(records: list[dict]) -> dict:
  """Scores: per category (all / seen / held_out, and per attribute), the mean over
  categories (GenEval's overall) and all images pooled."""
  out = {"suite_version": SUITE_VERSION, "categories": {}}
  for category in CATEGORIES:
    mine = [r for r in records if r["category"] == category]
    if not mine:
      continue
    entry = {"all": cell([r["correct"] for r in mine])}
    for name, held in (("seen", False), ("held_out", True)):
      part = [r["correct"] for r in mine if r["held_out"] == held]
      if part:
        entry[name] = cell(part)
    entry["attributes"] = {
        a: float(np.mean([r["verdict"][a] for r in mine if a in r["verdict"]]))
        for a in judge.ATTRIBUTES if any(a in r["verdict"] for r in mine)}
    out["categories"][category] = entry
  accuracies = [e["all"]["accuracy"] for e in out["categories"].values()]
  out["overall"] = float(np.mean(accuracies)) if accuracies else float("nan")
  out["all_images"] = cell([r["correct"] for r in records])
  return out


def markdown(summary: dict) -> str:
  """The score table: one row per category and split, with 95% Wilson intervals."""
  lines = [f"ShapesEval ({summary['suite_version']})", "",
           "| category | prompts | right / images | accuracy | 95% CI |",
           "|---|---|---|---|---|"]
  for category, entry in summary["categories"].items():
    for split in ("all", "seen", "held_out"):
      if split in entry:
        c = entry[split]
        lines.append(f"| {category} | {split} | {c['correct']} / {c['n']} | "
                     f"{c['accuracy']:.3f} | [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] |")
  c = summary["all_images"]
  lines += ["", f"Overall (mean over categories): {summary['overall']:.3f}; all images pooled: "
            f"{c['correct']} / {c['n']} = {c['accuracy']:.3f} "
            f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]."]
  return "\n".join(lines)


def one_line(summary: dict, category: str = "colour_shape") -> str:
  """'colour_shape: seen 0.62 [0.52, 0.71] (n=84), held-out 0.50 [...] (n=12)'."""
  entry = summary["categories"][category]
  parts = []
  for split in ("seen", "held_out"):
    if split in entry:
      c = entry[split]
      parts.append(f"{split.replace('_', '-')} {c['accuracy']:.2f} "
                   f"[{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}] (n={c['n']})")
  return f"{category}: " + ", ".join(parts)


def example_grid(records: list[dict], images: np.ndarray, per_category: int = 8,
                 tile: int = 128) -> np.ndarray:
  """uint8 grid of up to ``per_category`` examples per category (wrong ones first), each
  framed green (right) or red (wrong) and captioned with the prompt and what the probe read."""
  from diffusion_jax import images as images_lib

  picked = []
  for category in CATEGORIES:
    mine = [i for i, r in enumerate(records) if r["category"] == category]
    wrong = [i for i in mine if not records[i]["correct"]]
    right = [i for i in mine if records[i]["correct"]]
    half = per_category // 2
    take = wrong[:max(half, per_category - len(right))]
    picked += take + right[:per_category - len(take)]
  if not picked:
    raise ValueError("no records to show")
  tiles, captions = [], []
  for i in picked:
    image = np.asarray(images[i])
    scale = max(1, tile // image.shape[0])
    image = image.repeat(scale, 0).repeat(scale, 1)
    color = (40, 170, 60) if records[i]["correct"] else (220, 30, 30)
    framed = np.empty((image.shape[0] + 6, image.shape[1] + 6, 3), np.uint8)
    framed[...] = color
    framed[3:-3, 3:-3] = image
    tiles.append(framed)
    captions.append(f"{'RIGHT' if records[i]['correct'] else 'WRONG'}: {records[i]['prompt']}"
                    f" | read: {records[i]['read']}")
  return images_lib.make_grid(np.stack(tiles), captions, columns=per_category)


class Progress:
  """A one-line progress bar with rate and ETA, for ``sample_suite(progress=...)``."""

  def __init__(self, label: str = "ShapesEval", write: Callable[[str], None] | None = None):
    self.label, self.start = label, time.time()
    self.write = write or (lambda s: print(s, end="", flush=True))

  def __call__(self, done: int, total: int) -> None:
    elapsed = time.time() - self.start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    bar = "#" * int(30 * done / total) + "-" * (30 - int(30 * done / total))
    eta_text = f"{int(eta) // 60}m{int(eta) % 60:02d}s" if math.isfinite(eta) else "?"
    self.write(f"\r[{self.label}] [{bar}] {done}/{total} images, {rate:.2f} img/s, "
               f"ETA {eta_text}" + ("\n" if done >= total else ""))
