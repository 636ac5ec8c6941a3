"""Exact edit pairs from the shapes renderer, for an InstructPix2Pix-style stage (Brooks
et al. 2023 build theirs with Prompt-to-Prompt; the shapes world renders them exactly).

``make_edit_pair(seed, index, resolution)`` -> ``EditPair``: a scene of one or two
objects of distinct shapes (so "the circle" names one object), an instruction, and the
scene after it, both rendered. Instructions:

  * recolour: "make the circle red" -- that object's colour changes, nothing else;
  * move:     "move the star to the left" / "... to the right" -- that object's x
    changes by at least a fifth of the image, it stays inside and clear of the others;
  * add:      "add a green square" -- a new object of a shape not yet present, placed
    clear of the others; nothing else changes.

Pure and deterministic in (seed, index); pixels differ only where the edited object was
or is (``changed_region``).
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from diffusion_jax.data import shapes

EDITS = ("recolor", "move", "add")
RADIUS = (0.12, 0.16)
MIN_SHIFT = 0.2


@dataclasses.dataclass(frozen=True)
class EditPair:
  instruction: str
  edit: str  # one of EDITS
  index: int  # the edited object's index in ``after.objects``
  before: shapes.Scene
  after: shapes.Scene
  before_image: np.ndarray  # uint8 [H, W, 3]
  after_image: np.ndarray


def _clear(x, y, r, others, gap=0.02) -> bool:
  inside = shapes.MARGIN + 1.25 * r <= min(x, y) and max(x, y) <= 1 - shapes.MARGIN - 1.25 * r
  return inside and all(np.hypot(x - o.x, y - o.y) > 1.25 * (r + o.radius) + gap
                        for o in others)


def _new_object(rng, shape, color, others, x=None):
  r = float(rng.uniform(*RADIUS))
  for _ in range(200):
    cx = float(rng.uniform(0, 1)) if x is None else x
    cy = float(rng.uniform(0, 1))
    if _clear(cx, cy, r, others):
      return shapes.SceneObject(shape, color, shapes.COLORS[color], "medium", cx, cy, r)
  return None


def _scene(rng) -> shapes.Scene | None:
  count = int(rng.integers(1, 3))
  names = rng.choice(len(shapes.SHAPES), count, replace=False)
  objects = []
  for i in names:
    color = str(rng.choice(list(shapes.COLORS)))
    obj = _new_object(rng, shapes.SHAPES[i], color, objects)
    if obj is None:
      return None
    objects.append(obj)
  background = shapes.BACKGROUNDS[int(rng.integers(len(shapes.BACKGROUNDS)))]
  return shapes.Scene(background, tuple(objects), {"kind": "edit"})


def _edit(rng, scene: shapes.Scene):
  edit = EDITS[int(rng.integers(len(EDITS)))]
  objects = list(scene.objects)
  if edit == "add":
    present = {o.shape for o in objects}
    shape = str(rng.choice([s for s in shapes.SHAPES if s not in present]))
    color = str(rng.choice(list(shapes.COLORS)))
    obj = _new_object(rng, shape, color, objects)
    if obj is None:
      return None
    return f"add a {color} {shape}", edit, len(objects), objects + [obj]
  i = int(rng.integers(len(objects)))
  obj, others = objects[i], objects[:i] + objects[i + 1:]
  if edit == "recolor":
    color = str(rng.choice([c for c in shapes.COLORS if c != obj.color]))
    objects[i] = dataclasses.replace(obj, color=color, rgb=shapes.COLORS[color])
    return f"make the {obj.shape} {color}", edit, i, objects
  direction = "left" if rng.uniform() < 0.5 else "right"
  low, high = shapes.MARGIN + 1.25 * obj.radius, 1 - shapes.MARGIN - 1.25 * obj.radius
  lo, hi = (low, obj.x - MIN_SHIFT) if direction == "left" else (obj.x + MIN_SHIFT, high)
  if lo > hi:
    return None
  for _ in range(50):
    x = float(rng.uniform(lo, hi))
    if _clear(x, obj.y, obj.radius, others):
      objects[i] = dataclasses.replace(obj, x=x)
      return f"move the {obj.shape} to the {direction}", edit, i, objects
  return None


def make_edit_pair(seed: int, index: int, resolution: int) -> EditPair:
  """The edit pair number ``index`` of the stream seeded by ``seed``."""
  rng = np.random.default_rng([seed, index, 0xED17])
  while True:  # rejection sampling; a few draws at most
    scene = _scene(rng)
    edited = _edit(rng, scene) if scene is not None else None
    if edited is not None:
      break
  instruction, edit, i, objects = edited
  after = dataclasses.replace(scene, objects=tuple(objects))
  return EditPair(instruction, edit, i, scene, after, shapes.render(scene, resolution),
                  shapes.render(after, resolution))


def object_region(obj: shapes.SceneObject, resolution: int) -> np.ndarray:
  """bool [H, W]: the pixels the renderer may touch for ``obj`` (its painted window)."""
  extent = 1.25 * obj.radius + 1.5 / resolution
  centres = (np.arange(resolution) + 0.5) / resolution
  xs = (centres >= obj.x - extent - 1 / resolution) & (centres <= obj.x + extent
                                                       + 1 / resolution)
  ys = (centres >= obj.y - extent - 1 / resolution) & (centres <= obj.y + extent
                                                       + 1 / resolution)
  return ys[:, None] & xs[None, :]


def changed_region(pair: EditPair, resolution: int) -> np.ndarray:
  """bool [H, W]: where the edit may change pixels (the edited object before and after)."""
  region = object_region(pair.after.objects[pair.index], resolution)
  if pair.edit != "add":
    region |= object_region(pair.before.objects[pair.index], resolution)
  return region


# Pair indices from here on are held out of every training split (the TFDS builder's
# ``validation``; ``held_out_pair``): each index is its own RNG stream, so they share no draw.
HELD_OUT_START = 1 << 30


def held_out_pair(seed: int, index: int, resolution: int) -> EditPair:
  """Held-out pair ``index`` of seed ``seed`` (validation example ``index``)."""
  return make_edit_pair(seed, HELD_OUT_START + index, resolution)


def pair_to_json(pair: EditPair) -> str:
  """The pair without its images: instruction, edit, index and both scenes."""
  return json.dumps({"instruction": pair.instruction, "edit": pair.edit, "index": pair.index,
                     "before": json.loads(pair.before.to_json()),
                     "after": json.loads(pair.after.to_json())}, sort_keys=True)


def pair_from_json(text: str, resolution: int) -> EditPair:
  """Inverse of ``pair_to_json``; the images are rendered again at ``resolution``."""
  data = json.loads(text)
  before, after = (shapes.Scene.from_json(json.dumps(data[k])) for k in ("before", "after"))
  return EditPair(data["instruction"], data["edit"], data["index"], before, after,
                  shapes.render(before, resolution), shapes.render(after, resolution))


def _png(image: np.ndarray) -> bytes:
  # PNG bytes made here (PIL): handing TFDS a numpy array would make it encode with TensorFlow.
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="png", compress_level=1)
  return buffer.getvalue()


def encode_pairs(task: tuple) -> list[tuple[int, dict]]:
  """TFDS-ready (key, features) of pair indices [start, stop); task = (seed, start, stop,
  resolution). The shapes_edits builder's examples (``data/edit_pairs_tfds.py``)."""
  seed, start, stop, resolution = task
  out = []
  for index in range(start, stop):
    pair = make_edit_pair(seed, index, resolution)
    out.append((index, {"image": _png(pair.after_image), "input_image": _png(pair.before_image),
                        "caption": pair.instruction, "edit": pair.edit,
                        "attributes": pair_to_json(pair)}))
  return out
