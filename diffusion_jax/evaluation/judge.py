"""What an image shows (a list of detected objects) checked against what a caption asserts.

A caption of the shapes grammar (``diffusion_jax.data.shapes``) asserts a *spec*: groups of
(colour, shape, count, size), an optional position (single-object scenes) and an optional
relation between two groups. The probe reads an image as ``Detection`` objects; ``verify``
says, per attribute, whether the detections satisfy the spec:

- ``colour`` / ``shape``: the multiset of detected colours (shapes) equals the asserted one;
- ``count``: as many objects as asserted (captions of the grammar list every object);
- ``objects``: the multiset of (colour, shape) pairs equals the asserted one, so colours
  bound to the wrong shapes (a blue circle and a red square for "a red circle and a blue
  square") fail here even when ``colour`` and ``shape`` pass;
- ``size`` (when asserted): the object's radius is on the asserted side of ``SIZE_SPLIT``;
- ``position`` (when asserted): the object's centre lies in the scene sampler's box for that
  position, widened by ``POSITION_TOLERANCE``;
- ``relation`` (when asserted): the two groups' objects are found and the relation holds
  along its axis, that axis dominating (within 45 degrees), at least ``MIN_SEPARATION`` apart;
- ``correct``: every asserted attribute holds.

Thresholds are looser than the scene sampler's own rules (which make real scenes clear-cut):
a judge accepts any picture a reader would describe with the caption.
"""

from __future__ import annotations

import collections
import dataclasses

from diffusion_jax.data import shapes

# Radius (image widths) between the sampler's small (0.13-0.17) and large (0.23-0.29) ranges.
SIZE_SPLIT = 0.20
POSITION_TOLERANCE = 0.04
MIN_SEPARATION = 0.05
# The scene sampler's centre boxes (x0, x1, y0, y1) of single objects with a position.
POSITION_BOXES = {"left": (0.0, 0.38, 0.35, 0.65), "right": (0.62, 1.0, 0.35, 0.65),
                  "top": (0.35, 0.65, 0.0, 0.38), "bottom": (0.35, 0.65, 0.62, 1.0),
                  "center": (0.42, 0.58, 0.42, 0.58)}
ATTRIBUTES = ("colour", "shape", "count", "objects", "size", "position", "relation", "correct")


@dataclasses.dataclass(frozen=True)
class Detection:
  """One object the probe found: centre (x, y) and radius in image widths (x right, y down)."""
  color: str
  shape: str
  x: float
  y: float
  radius: float
  score: float = 1.0

  def describe(self) -> str:
    return f"{self.color} {self.shape}"


def detections_of_scene(scene: shapes.Scene) -> list[Detection]:
  """The ground truth of a rendered scene as detections (what a perfect probe reads)."""
  return [Detection(o.color, o.shape, o.x, o.y, o.radius) for o in scene.objects]


def _box_distance(x: float, y: float, box) -> float:
  x0, x1, y0, y1 = box
  return max(x0 - x, 0.0, x - x1) + max(y0 - y, 0.0, y - y1)


def read_position(d: Detection) -> str:
  """The position word whose box is nearest the centre (inside one: the smallest box)."""
  return min(POSITION_BOXES, key=lambda p: (_box_distance(d.x, d.y, POSITION_BOXES[p]),
                                            POSITION_BOXES[p][1] - POSITION_BOXES[p][0]))


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
  """Whether ``a`` is ``relation`` (left_of, right_of, above, below) ``b``."""
  dx, dy = b.x - a.x, b.y - a.y
  if relation in ("right_of", "below"):
    dx, dy = -dx, -dy
  along, across = (dx, dy) if relation in ("left_of", "right_of") else (dy, dx)
  return along >= MIN_SEPARATION and abs(across) <= along


def read_relation(a: Detection, b: Detection) -> str:
  """The relation of ``a`` to ``b`` along the dominant axis."""
  dx, dy = b.x - a.x, b.y - a.y
  if abs(dx) >= abs(dy):
    return "left_of" if dx > 0 else "right_of"
  return "above" if dy > 0 else "below"


def verify(spec: dict, detections: list[Detection]) -> dict[str, bool]:
  """Per attribute (``ATTRIBUTES``), whether ``detections`` satisfy ``spec``; attributes the
  spec does not assert (size, position, relation) are absent from the result."""
  groups = spec["groups"]
  want_pairs = collections.Counter()
  for g in groups:
    want_pairs[(g["color"], g["shape"])] += g["count"]
  got_pairs = collections.Counter((d.color, d.shape) for d in detections)
  project = lambda counter, i: collections.Counter(  # noqa: E731
      {k: sum(v for p, v in counter.items() if p[i] == k) for k in {p[i] for p in counter}})
  out = {"colour": project(want_pairs, 0) == project(got_pairs, 0),
         "shape": project(want_pairs, 1) == project(got_pairs, 1),
         "count": sum(want_pairs.values()) == len(detections),
         "objects": want_pairs == got_pairs}
  sized = [g["size"] for g in groups if g.get("size")]
  if sized:
    out["size"] = len(detections) == 1 and (
        (detections[0].radius >= SIZE_SPLIT) == (sized[0] == "large"))
  if spec.get("position"):
    box = POSITION_BOXES[spec["position"]]
    out["position"] = len(detections) == 1 and _box_distance(
        detections[0].x, detections[0].y, box) <= POSITION_TOLERANCE
  if spec.get("relation"):
    first = [d for d in detections if (d.color, d.shape) == (groups[0]["color"],
                                                             groups[0]["shape"])]
    second = [d for d in detections if (d.color, d.shape) == (groups[1]["color"],
                                                              groups[1]["shape"])]
    out["relation"] = (len(first) == len(second) == 1
                       and relation_holds(first[0], second[0], spec["relation"]))
  out["correct"] = all(out.values())
  return out


def describe(detections: list[Detection]) -> str:
  """What the probe read, in words: 'red circle (left), blue square' ('nothing' if empty)."""
  if not detections:
    return "nothing"
  if len(detections) == 1:
    d = detections[0]
    size = "large" if d.radius >= SIZE_SPLIT else "small"
    return f"{size} {d.describe()} ({read_position(d)})"
  ordered = sorted(detections, key=lambda d: d.x)
  return ", ".join(d.describe() for d in ordered)
