"""Procedural compositional shapes: scenes, an antialiased renderer, a caption grammar and parser.

A scene is a light background with one to three flat-coloured objects. Every scene carries
the *spec* its caption was generated from (which colours, shapes, counts, sizes, position and
spatial relation the caption asserts), so a generated image can later be scored exactly against
its prompt, and ``parse_caption(caption) == scene.spec`` for every generated caption.

Geometry lives in normalised image coordinates (x right, y down, the image is [0, 1]^2), so one
scene renders consistently at any resolution: each pixel's value is its analytic coverage by
the shape, computed from a signed distance function (``render``), i.e. a box filter of the
continuous picture. Rendering at 64 px and 2x2-averaging is therefore close to rendering at
32 px, which super-resolution stages rely on. A non-square scene (``Scene.extent``, SDXL's
aspect buckets: ``relayout``) is measured in units of the image's shorter side: the image is
[0, width / shorter] x [0, height / shorter].

Colour x shape pairs in ``HELD_OUT_PAIRS`` never appear in ``train`` or ``validation`` scenes
(not as any object); every ``test_compositional`` scene contains at least one of them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 205, 20),
    "green": (40, 165, 70),
    "blue": (40, 90, 220),
    "purple": (130, 60, 190),
    "pink": (240, 110, 185),
    "black": (35, 35, 35),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# One held-out colour per shape, each colour at most once, so every colour and every shape is
# still seen in training (with other partners).
HELD_OUT_PAIRS = frozenset({
    ("red", "triangle"), ("blue", "circle"), ("green", "square"),
    ("yellow", "star"), ("purple", "diamond"), ("orange", "cross"),
})
# Light backgrounds so that every object colour (even yellow) keeps its contrast.
BACKGROUNDS = ((246, 246, 246), (242, 237, 226), (231, 239, 246), (236, 245, 232), (247, 236, 236))
SPLITS = ("train", "validation", "test_compositional")
KINDS = ("single", "count", "relation", "list")
RELATIONS = ("left_of", "right_of", "above", "below")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
# Object "radius" = half its extent, in image widths. Single objects are big so a tiny model
# sees them clearly; multi-object scenes use medium objects that still fit side by side.
RADIUS_RANGES = {"small": (0.13, 0.17), "large": (0.23, 0.29), "medium": (0.12, 0.16),
                 "crowded": (0.10, 0.13)}
MARGIN = 0.03
DEFAULT_SCENE_WEIGHTS = {"single": 0.5, "count": 0.15, "relation": 0.2, "list": 0.15}

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_WORD_NUMBERS = {w: n for n, w in _NUMBER_WORDS.items()}
_PREFIXES = ("", "a picture of ", "an image of ", "a drawing of ", "there is ")
_POSITION_PHRASES = {
    "left": ("on the left", "on the left side"), "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_RELATION_PHRASES = {
    "left_of": ("to the left of", "left of"), "right_of": ("to the right of", "right of"),
    "above": ("above", "over"), "below": ("below", "under", "beneath"),
}


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object; (x, y) is its centre and radius half its extent, in image widths."""
  shape: str
  color: str
  rgb: tuple[int, int, int]
  size: str  # "small" | "large" | "medium" | "crowded"
  x: float
  y: float
  radius: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """A background, objects painted in order, and the spec (what the caption asserts).

  spec = {"kind": one of KINDS, "groups": [{"color", "shape", "count", "size" (or None)}],
          "relation": one of RELATIONS or None (groups[0] relative to groups[1]),
          "position": one of POSITIONS or None (single-object scenes only)}
  """
  background: tuple[int, int, int]
  objects: tuple[SceneObject, ...]
  spec: dict
  # (width, height) in units of the shorter side: (1, 1) for a square image.
  extent: tuple[float, float] = (1.0, 1.0)

  def to_json(self) -> str:
    # vars(), not dataclasses.asdict: the latter deep-copies and dominates dataset preparation.
    data = {"background": list(self.background), "objects": [vars(o) for o in self.objects],
            "spec": self.spec, "held_out": has_held_out_pair(self)}
    if tuple(self.extent) != (1.0, 1.0):  # (square scenes: the stored datasets' JSON)
      data["extent"] = list(self.extent)
    return json.dumps(data, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> Scene:
    data = json.loads(text)
    objects = tuple(SceneObject(**{**o, "rgb": tuple(o["rgb"])}) for o in data["objects"])
    return cls(tuple(data["background"]), objects, data["spec"],
               tuple(data.get("extent", (1.0, 1.0))))


def has_held_out_pair(scene: Scene) -> bool:
  return any((o.color, o.shape) in HELD_OUT_PAIRS for o in scene.objects)


# ----------------------------------------------------------------------------------------------
# Sampling


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """Independent stream per (seed, split, index): examples do not depend on generation order."""
  return np.random.default_rng([seed, SPLITS.index(split), index])


def _sample_pairs(rng, num: int, *, need_held_out: bool) -> list[tuple[str, str]]:
  """`num` distinct colour x shape pairs; the first is held out iff `need_held_out`.

  Without `need_held_out` no pair is held out; with it, the others may be anything.
  """
  held_out = sorted(HELD_OUT_PAIRS)
  allowed = [(c, s) for c in COLORS for s in SHAPES
             if need_held_out or (c, s) not in HELD_OUT_PAIRS]
  pairs = [held_out[rng.integers(len(held_out))]] if need_held_out else []
  while len(pairs) < num:
    pair = allowed[rng.integers(len(allowed))]
    if pair not in pairs:
      pairs.append(pair)
  return pairs


def _choose_kind(rng, max_objects: int, weights: dict[str, float]) -> str:
  kinds = [k for k in KINDS if k == "single" or max_objects >= 2]
  p = np.array([weights.get(k, 0.0) for k in kinds], np.float64)
  if p.sum() <= 0:
    raise ValueError(f"scene weights {weights} give no scene kind with max_objects={max_objects}")
  return kinds[rng.choice(len(kinds), p=p / p.sum())]


def _uniform_centre(rng, radius: float, box=(0.0, 1.0, 0.0, 1.0),
                    extent=(1.0, 1.0)) -> tuple[float, float]:
  """A centre inside `box` = (x0, x1, y0, y1) with the whole object inside the image
  [0, extent[0]] x [0, extent[1]]."""
  lo = radius + MARGIN
  x0, x1 = max(box[0], lo), min(box[1], extent[0] - radius - MARGIN)
  y0, y1 = max(box[2], lo), min(box[3], extent[1] - radius - MARGIN)
  return float(rng.uniform(x0, max(x0, x1))), float(rng.uniform(y0, max(y0, y1)))


_POSITION_BOXES = {"left": (0.0, 0.38, 0.35, 0.65), "right": (0.62, 1.0, 0.35, 0.65),
                   "top": (0.35, 0.65, 0.0, 0.38), "bottom": (0.35, 0.65, 0.62, 1.0),
                   "center": (0.42, 0.58, 0.42, 0.58)}


def _relation_holds(a: tuple, b: tuple, relation: str, gap: float) -> bool:
  """a, b = (x, y, radius). The relation must be clear: separated and dominant along its axis."""
  dx, dy = b[0] - a[0], b[1] - a[1]
  if relation in ("right_of", "below"):
    dx, dy = -dx, -dy
  along, across = (dx, dy) if relation in ("left_of", "right_of") else (dy, dx)
  return along >= a[2] + b[2] + gap and abs(across) <= 0.6 * along


def _scaled_box(box, extent) -> tuple[float, float, float, float]:
  return (box[0] * extent[0], box[1] * extent[0], box[2] * extent[1], box[3] * extent[1])


def _place(rng, radii: list[float], relation: str | None = None,
           extent=(1.0, 1.0)) -> list[tuple[float, float]]:
  """Non-overlapping centres for objects of the given radii (rejection sampling)."""
  box = _scaled_box((0.0, 1.0, 0.0, 1.0), extent)
  for _ in range(1000):
    centres = [_uniform_centre(rng, r, box, extent) for r in radii]
    circles = [(x, y, r) for (x, y), r in zip(centres, radii, strict=True)]
    apart = all(np.hypot(a[0] - b[0], a[1] - b[1]) >= a[2] + b[2] + 0.04
                for i, a in enumerate(circles) for b in circles[i + 1:])
    if apart and (relation is None or _relation_holds(circles[0], circles[1], relation, 0.04)):
      return centres
  raise RuntimeError(f"could not place objects of radii {radii} (relation={relation})")


def sample_scene(rng: np.random.Generator, *, held_out: bool = False, max_objects: int = 3,
                 scene_weights: dict[str, float] | None = None,
                 single_size: str | None = None) -> Scene:
  """Samples a scene and its spec. `held_out`: the scene contains a held-out pair (else none).

  `single_size` ("small" or "large"): single-object scenes all have that size (captions still
  name it 40% of the time); None draws either. The RNG stream is the same either way.
  """
  if not 1 <= max_objects <= 3:
    raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
  if single_size is not None and single_size not in SIZES:
    raise ValueError(f"single_size must be one of {SIZES} or None, got {single_size!r}")
  kind = _choose_kind(rng, max_objects, scene_weights or DEFAULT_SCENE_WEIGHTS)
  relation = position = None
  if kind == "single":
    (color, shape), = _sample_pairs(rng, 1, need_held_out=held_out)
    size = SIZES[rng.integers(2)]
    if single_size is not None:
      size = single_size
    mention_size = rng.random() < 0.4
    groups = [{"color": color, "shape": shape, "count": 1, "size": size if mention_size else None}]
    if rng.random() < 0.4:
      position = POSITIONS[rng.integers(len(POSITIONS))]
  elif kind == "count":
    (color, shape), = _sample_pairs(rng, 1, need_held_out=held_out)
    groups = [{"color": color, "shape": shape, "count": int(rng.integers(2, max_objects + 1)),
               "size": None}]
  elif kind == "relation":
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    pairs = _sample_pairs(rng, 2, need_held_out=held_out)
    if held_out and rng.random() < 0.5:  # the held-out pair may be either side of the relation
      pairs.reverse()
    groups = [{"color": c, "shape": s, "count": 1, "size": None} for c, s in pairs]
  else:
    num_groups = int(rng.integers(2, max_objects + 1))
    pairs = _sample_pairs(rng, num_groups, need_held_out=held_out)
    rng.shuffle(pairs)
    counts = [1] * num_groups
    if num_groups == 2 and max_objects == 3 and rng.random() < 0.3:
      counts[int(rng.integers(2))] = 2
    groups = [{"color": c, "shape": s, "count": n, "size": None}
              for (c, s), n in zip(pairs, counts, strict=True)]

  # One entry per object, in group order.
  members = [(g, i) for g in groups for i in range(g["count"])]
  if kind == "single":
    size_class = groups[0]["size"] or size
  else:
    size_class = "medium" if len(members) == 2 else "crowded"
  radii = [float(rng.uniform(*RADIUS_RANGES[size_class])) for _ in members]
  if kind == "single":
    centres = [_uniform_centre(rng, radii[0], _POSITION_BOXES.get(position, (0, 1, 0, 1)))]
  else:
    centres = _place(rng, radii, relation)
  background = _jitter(rng, BACKGROUNDS[rng.integers(len(BACKGROUNDS))], 5)
  objects = tuple(
      SceneObject(shape=g["shape"], color=g["color"], rgb=_jitter(rng, COLORS[g["color"]], 10),
                  size=size_class, x=round(x, 5), y=round(y, 5), radius=round(r, 5))
      for (g, _), (x, y), r in zip(members, centres, radii, strict=True))
  spec = {"kind": kind, "groups": groups, "relation": relation, "position": position}
  return Scene(background, objects, spec)


def bucket_extent(height: int, width: int) -> tuple[float, float]:
  """The ``Scene.extent`` of a height x width image: (width, height) / the shorter side."""
  short = min(height, width)
  return (width / short, height / short)


def relayout(scene: Scene, extent: tuple[float, float], rng: np.random.Generator) -> Scene:
  """``scene``'s objects (shapes, colours, sizes, order: the same caption) placed anew in
  a frame of ``extent`` (``bucket_extent``), keeping what its spec asserts: the relation
  between its first two objects, a single object's position (the boxes stretch with the
  frame), no overlaps. Sizes stay in units of the shorter side, so every constraint that
  holds in the unit square holds in the wider frame (SDXL's aspect buckets, Podell et al.
  2023, section 2.3)."""
  radii = [o.radius for o in scene.objects]
  spec = scene.spec
  if spec["kind"] == "single":
    box = _POSITION_BOXES.get(spec["position"], (0.0, 1.0, 0.0, 1.0))
    centres = [_uniform_centre(rng, radii[0], _scaled_box(box, extent), extent)]
  else:
    centres = _place(rng, radii, spec["relation"], extent)
  objects = tuple(dataclasses.replace(o, x=round(x, 5), y=round(y, 5))
                  for o, (x, y) in zip(scene.objects, centres, strict=True))
  return dataclasses.replace(scene, objects=objects, extent=tuple(map(float, extent)))


def _jitter(rng, rgb, amount: int) -> tuple[int, int, int]:
  """Small colour jitter, so a colour name covers a neighbourhood, not one RGB triple."""
  offsets = rng.integers(-amount, amount + 1, 3).tolist()
  return tuple(min(255, max(0, c + o)) for c, o in zip(rgb, offsets, strict=True))


# ----------------------------------------------------------------------------------------------
# Captions


def _noun_phrase(group: dict) -> str:
  words = [group["size"]] if group["size"] else []
  words += [group["color"], group["shape"] + ("es" if group["shape"] == "cross" else "s")
            if group["count"] > 1 else group["shape"]]
  if group["count"] > 1:
    return " ".join([_NUMBER_WORDS[group["count"]]] + words)
  article = "an" if words[0][0] in "aeiou" else "a"
  return " ".join([article] + words)


def caption_for(spec: dict, rng: np.random.Generator) -> str:
  """One of several phrasings of `spec`, drawn with `rng`."""
  phrases = [_noun_phrase(g) for g in spec["groups"]]
  pick = lambda options: options[rng.integers(len(options))]
  prefix = pick(_PREFIXES)
  if prefix == "there is " and spec["groups"][0]["count"] > 1:
    prefix = "there are "
  if spec["relation"] is not None:
    body = f"{phrases[0]} {pick(_RELATION_PHRASES[spec['relation']])} {phrases[1]}"
  elif len(phrases) == 1:
    body = phrases[0]
    if spec["position"] is not None:
      body += " " + pick(_POSITION_PHRASES[spec["position"]])
  elif len(phrases) == 2:
    body = f"{phrases[0]} and {phrases[1]}"
  else:
    body = f"{', '.join(phrases[:-1])}{pick((' and ', ', and '))}{phrases[-1]}"
  return prefix + body


_NP_RE = re.compile(
    r"^(?P<det>a|an|one|two|three) (?:(?P<size>small|large) )?(?P<color>[a-z]+) (?P<shape>[a-z]+)$")


def _parse_noun_phrase(text: str) -> dict:
  match = _NP_RE.match(text.strip())
  if match is None:
    raise ValueError(f"cannot parse noun phrase {text!r}")
  count = _WORD_NUMBERS.get(match["det"], 1)
  shape = match["shape"]
  if count > 1:
    shape = shape[:-2] if shape.endswith("es") and shape[:-2] in SHAPES else shape[:-1]
  if shape not in SHAPES or match["color"] not in COLORS:
    raise ValueError(f"unknown colour or shape in {text!r}")
  return {"color": match["color"], "shape": shape, "count": count, "size": match["size"]}


def parse_caption(caption: str) -> dict:
  """Inverse of `caption_for`: the spec a caption asserts. Raises ValueError if ungrammatical."""
  text = caption.strip().lower()
  for prefix in sorted(_PREFIXES + ("there are ",), key=len, reverse=True):
    if prefix and text.startswith(prefix):
      text = text[len(prefix):]
      break
  relation = position = None
  relation_phrases = [(p, r) for r, ps in _RELATION_PHRASES.items() for p in ps]
  for phrase, name in sorted(relation_phrases, key=lambda pr: len(pr[0]), reverse=True):
    if f" {phrase} " in text:
      first, second = text.split(f" {phrase} ", 1)
      groups = [_parse_noun_phrase(first), _parse_noun_phrase(second)]
      relation = name
      break
  else:
    position_phrases = [(p, n) for n, ps in _POSITION_PHRASES.items() for p in ps]
    for phrase, name in sorted(position_phrases, key=lambda pn: len(pn[0]), reverse=True):
      if text.endswith(" " + phrase):
        text, position = text[:-len(phrase) - 1], name
        break
    parts = [p for p in re.split(r",\s*and\s+|,\s*|\s+and\s+", text) if p]
    groups = [_parse_noun_phrase(p) for p in parts]
  if relation is not None:
    kind = "relation"
  elif len(groups) == 1:
    kind = "single" if groups[0]["count"] == 1 else "count"
  else:
    kind = "list"
  return {"kind": kind, "groups": groups, "relation": relation, "position": position}


# ----------------------------------------------------------------------------------------------
# Rendering


def _box_sdf(px, py, half_w, half_h):
  qx, qy = np.abs(px) - half_w, np.abs(py) - half_h
  outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
  return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _polygon_sdf(px, py, vertices: np.ndarray):
  """Exact signed distance to a simple polygon [K, 2] (negative inside), even-odd sign."""
  dist2 = np.full(px.shape, np.inf)
  sign = np.ones(px.shape)
  for i in range(len(vertices)):
    (ax, ay), (bx, by) = vertices[i], vertices[i - 1]
    ex, ey = bx - ax, by - ay
    wx, wy = px - ax, py - ay
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist2 = np.minimum(dist2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
    crosses = (py >= ay) == (py < by)
    crosses &= (py >= ay) == (ex * wy > ey * wx)
    sign = np.where(crosses, -sign, sign)
  return sign * np.sqrt(dist2)


def _regular_vertices(num: int, radius: float, inner: float | None = None, y_shift: float = 0.0):
  """Vertices of a regular polygon (or star, when `inner` is set) with a vertex pointing up."""
  steps = 2 * num if inner else num
  angles = -np.pi / 2 + 2 * np.pi * np.arange(steps) / steps
  radii = np.where(np.arange(steps) % 2 == 1, inner, radius) if inner else np.full(steps, radius)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles) + y_shift], axis=1)


def shape_sdf(shape: str, px: np.ndarray, py: np.ndarray, radius: float) -> np.ndarray:
  """Signed distance (image widths) at offsets (px, py) from the centre of a `shape`."""
  if shape == "circle":
    return np.hypot(px, py) - radius
  if shape == "square":
    return _box_sdf(px, py, 0.85 * radius, 0.85 * radius)
  if shape == "cross":
    return np.minimum(_box_sdf(px, py, radius, 0.36 * radius),
                      _box_sdf(px, py, 0.36 * radius, radius))
  if shape == "triangle":  # shifted down by R/4 so its bounding box is centred
    vertices = _regular_vertices(3, 1.15 * radius, y_shift=0.29 * radius)
  elif shape == "diamond":
    vertices = np.array([[0, -radius], [0.8 * radius, 0], [0, radius], [-0.8 * radius, 0]])
  elif shape == "star":
    vertices = _regular_vertices(5, 1.05 * radius, inner=0.5 * radius, y_shift=0.1 * radius)
  else:
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
  return _polygon_sdf(px, py, vertices)


def render(scene: Scene, resolution: int | tuple[int, int]) -> np.ndarray:
  """Renders `scene` as uint8 [resolution, resolution, 3], or [height, width, 3] for
  ``resolution`` = (height, width) (the scene's ``extent`` times the shorter side, to a pixel).

  A pixel's coverage is clip(0.5 - d, 0, 1) with d the signed distance from its centre to the
  shape edge, in pixels: the exact area coverage along straight edges, so the same scene looks
  the same (up to pixel size) at any resolution. Objects are painted over each other in order.
  """
  height, width = (resolution, resolution) if np.ndim(resolution) == 0 else resolution
  scale = min(height, width)  # pixels per unit: the shorter side
  if abs(scene.extent[0] * scale - width) > 1 or abs(scene.extent[1] * scale - height) > 1:
    raise ValueError(f"a scene of extent {scene.extent} (width, height) cannot be rendered at "
                     f"{height}x{width} px: relayout it for that aspect ratio first.")
  image = np.empty((height, width, 3), np.float32)
  image[...] = np.asarray(scene.background, np.float32)
  for obj in scene.objects:
    # Only the pixels near the object: keeps rendering cheap at 256 px.
    extent = 1.25 * obj.radius + 1.5 / scale
    x0 = max(0, int(np.floor((obj.x - extent) * scale)))
    x1 = min(width, int(np.ceil((obj.x + extent) * scale)))
    y0 = max(0, int(np.floor((obj.y - extent) * scale)))
    y1 = min(height, int(np.ceil((obj.y + extent) * scale)))
    if x0 >= x1 or y0 >= y1:
      continue
    centres_x = (np.arange(x0, x1) + 0.5) / scale - obj.x
    centres_y = (np.arange(y0, y1) + 0.5) / scale - obj.y
    px, py = np.meshgrid(centres_x, centres_y)
    coverage = np.clip(0.5 - shape_sdf(obj.shape, px, py, obj.radius) * scale, 0.0, 1.0)
    coverage = coverage[..., None].astype(np.float32)
    patch = image[y0:y1, x0:x1]
    patch += coverage * (np.asarray(obj.rgb, np.float32) - patch)
  return np.round(image).astype(np.uint8)


def make_example(seed: int, split: str, index: int, resolution: int, *, max_objects: int = 3,
                 scene_weights: dict[str, float] | None = None,
                 single_size: str | None = None) -> tuple[Scene, str, np.ndarray]:
  """Example `index` of `split`: (scene, caption, image uint8 [R, R, 3]), deterministic."""
  rng = example_rng(seed, split, index)
  scene = sample_scene(rng, held_out=split == "test_compositional", max_objects=max_objects,
                       scene_weights=scene_weights, single_size=single_size)
  return scene, caption_for(scene.spec, rng), render(scene, resolution)


def encode_examples(task: tuple) -> list[tuple[int, dict]]:
  """TFDS-ready (key, features) for examples [start, stop) of a split.

  task = (seed, split, start, stop, resolution, max_objects, single_size). Images become PNG
  bytes here (with PIL): handing TFDS a numpy array would make it encode with TensorFlow.
  """
  seed, split, start, stop, resolution, max_objects, single_size = task
  encoded = []
  for index in range(start, stop):
    scene, caption, image = make_example(seed, split, index, resolution, max_objects=max_objects,
                                         single_size=single_size)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png", compress_level=1)
    encoded.append((index, {"image": buffer.getvalue(), "caption": caption,
                            "attributes": scene.to_json(), "num_objects": len(scene.objects),
                            "kind": scene.spec["kind"]}))
  return encoded
