"""Do image variations keep what the input shows? (DALL-E 2, Ramesh et al. 2022, sec. 3.1:
variations preserve the input's semantics, here its object's colour and shape.)

Inputs are real 1-object scenes (the validation split, ground truth known); the shapes probe
reads every variation, and each is checked against

* the input's true object (``judge.verify`` of a one-object spec: ``colour``, ``shape``,
  ``count`` (one object), ``objects`` (colour and shape of the same object) and ``correct``
  (all of them); position and size are not asserted: a variation may move and resize);
* what the probe reads in the input itself (``agrees_with_input_reading``: the same single
  (colour, shape)), which separates the probe's own errors from the pipeline's;
* another input's object (``chance``: the same check against the next input's truth), the
  agreement an embedding that ignored its image would still get.

Scores are shapes_eval cells (Wilson 95% intervals) over all variations.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.data import shapes
from diffusion_jax.evaluation import judge, shapes_eval

ATTRIBUTES = ("colour", "shape", "count", "objects", "correct")


def input_scenes(num: int, resolution: int, split: str = "validation", seed: int = 0,
                 start: int = 0) -> tuple[np.ndarray, list[dict], list[str]]:
  """Examples [start, start + num) of a 1-object split: (uint8 images [N, R, R, 3], the
  one-object spec of each, its caption)."""
  images, specs, captions = [], [], []
  for index in range(start, start + num):
    scene, caption, image = shapes.make_example(seed, split, index, resolution, max_objects=1)
    obj = scene.objects[0]
    specs.append(object_spec(obj.color, obj.shape))
    images.append(image)
    captions.append(caption)
  return np.stack(images), specs, captions


def object_spec(color: str, shape: str) -> dict:
  """The spec "one <colour> <shape>, anywhere, any size" for ``judge.verify``."""
  return {"kind": "single", "relation": None, "position": None,
          "groups": [{"color": color, "shape": shape, "count": 1, "size": None}]}


def score(input_specs: list[dict], input_readings: list[list[judge.Detection]],
          variation_readings: list[list[list[judge.Detection]]]) -> dict:
  """Agreement of each input's variations (readings [N][K]) with it (module docstring)."""
  if len(input_specs) != len(variation_readings) or len(input_specs) != len(input_readings):
    raise ValueError(f"{len(input_specs)} inputs, {len(input_readings)} input readings and "
                     f"{len(variation_readings)} lists of variations.")
  hits = {a: [] for a in ATTRIBUTES}
  chance = {a: [] for a in ATTRIBUTES}
  agrees, input_read_right = [], []
  n = len(input_specs)
  for i, (spec, reading, variations) in enumerate(zip(input_specs, input_readings,
                                                      variation_readings, strict=True)):
    input_read_right.append(judge.verify(spec, reading)["correct"])
    read = [(d.color, d.shape) for d in reading]
    other = input_specs[(i + 1) % n]
    for detections in variations:
      verdict, unrelated = judge.verify(spec, detections), judge.verify(other, detections)
      for a in ATTRIBUTES:
        hits[a].append(verdict[a])
        chance[a].append(unrelated[a])
      agrees.append(len(read) == 1 and [(d.color, d.shape) for d in detections] == read)
  return {"num_inputs": n, "variations_per_input": len(variation_readings[0]) if n else 0,
          "vs_input_truth": {a: shapes_eval.cell(hits[a]) for a in ATTRIBUTES},
          "agrees_with_input_reading": shapes_eval.cell(agrees),
          "chance_vs_other_input": {a: shapes_eval.cell(chance[a]) for a in ATTRIBUTES},
          "probe_reads_inputs_right": shapes_eval.cell(input_read_right)}


def markdown(result: dict) -> str:
  """The agreement table."""
  lines = [f"Variations: {result['num_inputs']} inputs x {result['variations_per_input']} "
           "variations, probe verdicts against the input's object", "",
           "| attribute | kept (vs input) | 95% CI | chance (vs another input) |",
           "|---|---|---|---|"]
  for a in ATTRIBUTES:
    c, r = result["vs_input_truth"][a], result["chance_vs_other_input"][a]
    lines.append(f"| {a} | {c['accuracy']:.3f} ({c['correct']}/{c['n']}) | "
                 f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] | {r['accuracy']:.3f} |")
  c, p = result["agrees_with_input_reading"], result["probe_reads_inputs_right"]
  lines += ["", f"Same single (colour, shape) as the probe reads in the input: "
            f"{c['accuracy']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]; the probe reads "
            f"the inputs right {p['accuracy']:.3f} ({p['correct']}/{p['n']})."]
  return "\n".join(lines)
