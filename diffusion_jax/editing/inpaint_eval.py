"""Probe-scored inpainting on the shapes world: replace an object by another one.

A case is a validation scene of one object, a mask over that object (its bounding square
grown by ``margin`` radii) and a prompt naming another colour and shape ("a blue star"
where a red circle was). An inpainting method gets the image, the mask and the prompt;
the shapes probe then reads its output:

  * ``replaced``: the probe finds the prompt's colour and shape with its centre inside
    the mask (the edit was made where it was asked);
  * ``colour_placed``: an object of the prompt's colour (any shape) inside the mask;
  * ``removed``: the original colour and shape is no longer found anywhere;
  * ``known_error``: mean |output - input| over the kept pixels, in [0, 1] units (0 for
    the training-free methods, which paste the input there; an inpainting stage is only
    conditioned on it).

Rates come with Wilson 95% intervals (``shapes_eval.cell``). Deterministic in the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffusion_jax.data import shapes
from diffusion_jax.evaluation import shapes_eval


@dataclasses.dataclass(frozen=True)
class Case:
  image: np.ndarray  # uint8 [R, R, 3]
  generate: np.ndarray  # bool [R, R], True = to generate (diffusers' white)
  box: tuple[float, float, float, float]  # mask (x0, y0, x1, y1) in image widths
  prompt: str
  target: tuple[str, str]  # (colour, shape) asked for
  original: tuple[str, str]


def make_cases(num: int, resolution: int, *, seed: int = 0, margin: float = 0.35,
               split: str = "validation") -> list[Case]:
  """``num`` cases from single-object scenes of ``split``; the target differs from the
  original in both colour and shape (and is not a held-out pair)."""
  colors = sorted(shapes.COLORS)
  cases, index = [], 0
  rng = np.random.default_rng(seed)
  while len(cases) < num:
    scene, _, image = shapes.make_example(seed, split, index, resolution, max_objects=1)
    index += 1
    if len(scene.objects) != 1:
      continue
    obj = scene.objects[0]
    half = obj.radius * (1.0 + margin)
    box = (max(obj.x - half, 0.0), max(obj.y - half, 0.0), min(obj.x + half, 1.0),
           min(obj.y + half, 1.0))
    centres = (np.arange(resolution) + 0.5) / resolution
    in_x = (centres >= box[0]) & (centres < box[2])
    in_y = (centres >= box[1]) & (centres < box[3])
    generate = in_y[:, None] & in_x[None, :]
    while True:
      target = (colors[rng.integers(len(colors))], shapes.SHAPES[rng.integers(6)])
      if (target[0] != obj.color and target[1] != obj.shape
          and target not in shapes.HELD_OUT_PAIRS):
        break
    cases.append(Case(image, generate, box, f"a {target[0]} {target[1]}", target,
                      (obj.color, obj.shape)))
  return cases


def score_case(case: Case, output: np.ndarray, detections) -> dict:
  """One case's record; ``output`` uint8 [R, R, 3], ``detections`` the probe's reading."""
  x0, y0, x1, y1 = case.box
  replaced = any((d.color, d.shape) == case.target and x0 <= d.x <= x1 and y0 <= d.y <= y1
                 for d in detections)
  colour_placed = any(d.color == case.target[0] and x0 <= d.x <= x1 and y0 <= d.y <= y1
                      for d in detections)
  removed = not any((d.color, d.shape) == case.original for d in detections)
  known = ~case.generate
  diff = np.abs(output.astype(np.float64) - case.image.astype(np.float64)) / 255.0
  return {"prompt": case.prompt, "original": " ".join(case.original), "replaced": replaced,
          "colour_placed": colour_placed, "removed": removed,
          "known_error": float(diff[known].mean()),
          "read": [f"{d.color} {d.shape}" for d in detections]}


def score(cases: list[Case], outputs: np.ndarray, probe) -> dict:
  """Summary of ``outputs`` uint8 [N, R, R, 3] (one per case) read by ``probe``:
  {"replaced": cell, "colour_placed": cell, "removed": cell, "both": cell, "known_error":
  mean, "records": ...}."""
  if len(outputs) != len(cases):
    raise ValueError(f"{len(outputs)} outputs for {len(cases)} cases.")
  records = [score_case(c, o, d) for c, o, d in zip(cases, outputs, probe.read(outputs),
                                                    strict=True)]
  return {"replaced": shapes_eval.cell([r["replaced"] for r in records]),
          "colour_placed": shapes_eval.cell([r["colour_placed"] for r in records]),
          "removed": shapes_eval.cell([r["removed"] for r in records]),
          "both": shapes_eval.cell([r["replaced"] and r["removed"] for r in records]),
          "known_error": float(np.mean([r["known_error"] for r in records])),
          "records": records}


def markdown(summaries: dict[str, dict]) -> str:
  """A table with one row per method: {method: score(...)}."""
  def fmt(c):
    low, high = c["ci95"]
    return f"{c['accuracy']:.3f} [{low:.3f}, {high:.3f}] ({c['correct']}/{c['n']})"

  lines = ["| method | replaced (in the mask) | its colour in the mask | original removed "
           "| both | known-region error |", "|---|---|---|---|---|---|"]
  for name, s in summaries.items():
    lines.append(f"| {name} | {fmt(s['replaced'])} | {fmt(s['colour_placed'])} "
                 f"| {fmt(s['removed'])} | {fmt(s['both'])} | {s['known_error']:.4f} |")
  return "\n".join(lines) + "\n"
