"""The shapes probe: a small CenterNet-style detector that reads a shapes image as objects.

Objects as points (Zhou et al. 2019, "Objects as Points"): the network maps an image, resized
to ``INPUT_SIZE`` px, to a ``GRID`` x ``GRID`` map with, per cell, a centre heatmap logit,
colour logits (``shapes.COLORS``), shape logits (``shapes.SHAPES``), the centre's offset
inside the cell and the object's radius. Peaks of the heatmap (3x3 local maxima above
``threshold``) are the detected objects; ``judge.verify`` checks them against a caption.

Training data are rendered on the fly by the dataset's own renderer from the scene sampler
(every colour x shape pair, held-out pairs included: the probe must read what the generator
was never shown), with the corruptions generated images have: Gaussian noise, blur, colour
and contrast shifts and a down-and-up rescale. ``train_probe`` is a plain optax loop;
``load_or_train`` caches the trained params under ``cache_dir`` keyed by the settings.

Shapes: images [B, H, W, 3], uint8 or floats in [-1, 1], any H = W (resized to
``INPUT_SIZE``: an exact box filter for integer factors); features [B, FEATURE_DIM].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from diffusion_jax.data import shapes
from diffusion_jax.evaluation import judge

INPUT_SIZE = 32
GRID = 16
COLORS = tuple(shapes.COLORS)
NUM_COLORS, NUM_SHAPES = len(COLORS), len(shapes.SHAPES)
MAX_OBJECTS = 3  # the scene sampler draws at most three objects
CACHE_ENV = "DIFFUSION_JAX_PROBE_DIR"


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """How the probe is built and trained (configs/probe_shapes.py sets these)."""
  width: int = 32
  num_steps: int = 500
  # The cosine decay's horizon; longer than num_steps keeps the rate near its peak (runs that
  # decayed over 1000 steps, clipped or EMA'd, read real scenes worse: 0.80-0.93 minimum).
  decay_steps: int = 3000
  batch_size: int = 64
  learning_rate: float = 2e-3
  ema_decay: float = 0.0    # > 0: the probe is an EMA of the params
  clip_grad_norm: float | None = None
  num_scenes: int = 20_000   # rendered once, corrupted afresh each step
  held_out_fraction: float = 0.3
  seed: int = 1234           # not the dataset's seed: the probe never sees its splits
  threshold: float = 0.3

  def key(self) -> str:
    """A short hash naming the cached probe (any setting change retrains)."""
    text = json.dumps(dataclasses.asdict(self), sort_keys=True) + f"|v4|{INPUT_SIZE}|{GRID}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class ProbeNet(nn.Module):
  """[B, 32, 32, 3] in [-1, 1] -> (head maps [B, 16, 16, 1 + 8 + 6 + 3], features
  [B, 4 * width]); ``split_heads`` names the head channels."""
  width: int = 32

  @nn.compact
  def __call__(self, x):
    w = self.width
    conv = lambda c, s=1, k=3: nn.Conv(c, (k, k), strides=(s, s), padding="SAME")  # noqa: E731
    h = nn.gelu(conv(w // 2)(x))                      # 32 x 32
    h16 = nn.gelu(conv(w, 2)(h))                      # 16 x 16
    h16 = nn.gelu(conv(w)(h16))
    h8 = nn.gelu(conv(2 * w, 2)(h16))                 # 8 x 8: context for large objects
    h8 = nn.gelu(conv(2 * w)(h8))
    h8 = nn.gelu(conv(2 * w)(h8))
    up = jax.image.resize(conv(w, 1, 1)(h8), h16.shape, "nearest")
    f = nn.gelu(conv(w)(h16 + up))
    f = nn.gelu(conv(w)(f))                           # the penultimate layer
    heads = nn.Conv(1 + NUM_COLORS + NUM_SHAPES + 3, (1, 1))(f)
    features = jnp.concatenate([f.mean((1, 2)), f.max((1, 2)), h8.mean((1, 2))], axis=-1)
    return heads, features


def split_heads(heads):
  """[..., C] -> (heat logit [...], colour logits, shape logits, offset [..., 2], radius)."""
  c0, c1 = 1 + NUM_COLORS, 1 + NUM_COLORS + NUM_SHAPES
  return (heads[..., 0], heads[..., 1:c0], heads[..., c0:c1], jnp.tanh(heads[..., c1:c1 + 2]),
          jax.nn.softplus(heads[..., c1 + 2]) * 0.1)


def to_input(images) -> jnp.ndarray:
  """Images [B, H, W, 3] (uint8, or floats in [-1, 1]) -> [B, 32, 32, 3] floats in [-1, 1]."""
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  size = x.shape[1]
  if size == INPUT_SIZE:
    return x
  if size % INPUT_SIZE == 0:  # a box filter: a 64 px render averaged 2x2 is ~ the 32 px one
    f = size // INPUT_SIZE
    return x.reshape(x.shape[0], INPUT_SIZE, f, INPUT_SIZE, f, 3).mean((2, 4))
  return jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "linear", antialias=True)


# ----------------------------------------------------------------------------------------------
# Training data: rendered scenes, corrupted on the fly.


def render_scenes(num: int, seed: int, held_out_fraction: float, resolution: int = INPUT_SIZE,
                  max_objects: int = MAX_OBJECTS):
  """(uint8 images [N, R, R, 3], objects float32 [N, 3, 5] = (x, y, radius, colour, shape),
  mask [N, 3]) of scenes from the dataset's sampler, every kind equally often."""
  weights = {k: 1.0 for k in shapes.KINDS}
  images = np.empty((num, resolution, resolution, 3), np.uint8)
  objects = np.zeros((num, MAX_OBJECTS, 5), np.float32)
  mask = np.zeros((num, MAX_OBJECTS), bool)
  for i in range(num):
    rng = np.random.default_rng([seed, i])
    scene = shapes.sample_scene(rng, held_out=bool(rng.random() < held_out_fraction),
                                max_objects=max_objects, scene_weights=weights)
    images[i] = shapes.render(scene, resolution)
    for j, o in enumerate(scene.objects):
      objects[i, j] = (o.x, o.y, o.radius, COLORS.index(o.color), shapes.SHAPES.index(o.shape))
      mask[i, j] = True
  return images, objects, mask


def corrupt(key, x):
  """Generated-image corruptions of [B, 32, 32, 3] in [-1, 1], each image its own draw."""
  b = x.shape[0]
  k = jax.random.split(key, 8)
  u = lambda i, lo, hi, shape=(b, 1, 1, 1): jax.random.uniform(k[i], shape, minval=lo,  # noqa
                                                               maxval=hi)
  # Down-and-up rescale (a blurry upsampler) for some images.
  small = jax.image.resize(jax.image.resize(x, (b, 20, 20, 3), "linear", antialias=True),
                           x.shape, "linear")
  x = jnp.where(u(0, 0, 1) < 0.2, small, x)
  # Blur: a 3x3 binomial kernel, blended in by a random amount.
  kernel = jnp.outer(jnp.array([1.0, 2.0, 1.0]), jnp.array([1.0, 2.0, 1.0])) / 16
  kernel = jnp.tile(kernel[:, :, None, None], (1, 1, 1, 3))
  blurred = jax.lax.conv_general_dilated(
      jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"), kernel, (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
  x = x + (blurred - x) * u(1, 0, 1) * (u(2, 0, 1) < 0.4)
  # Colour and contrast shifts.
  x = x * u(3, 0.85, 1.15) + u(4, -0.08, 0.08, (b, 1, 1, 3))
  # Noise, from none to clearly visible.
  x = x + jax.random.normal(k[5], x.shape) * u(6, 0.0, 0.12) * (u(7, 0, 1) < 0.7)
  return jnp.clip(x, -1.0, 1.0)


def _targets(objects, mask):
  """Per-cell training targets from objects [B, 3, 5] and mask [B, 3]."""
  centres = (jnp.arange(GRID) + 0.5) / GRID
  cx, cy = centres[None, None, :], centres[None, :, None]           # [1, G(y), G(x)]
  ox, oy, rad = (objects[..., i][:, :, None, None] for i in range(3))  # [B, 3, 1, 1]
  d2 = (cx - ox) ** 2 + (cy - oy) ** 2                               # [B, 3, G, G]
  peak = ((jnp.floor(ox * GRID) == jnp.arange(GRID)[None, None, None, :])
          & (jnp.floor(oy * GRID) == jnp.arange(GRID)[None, None, :, None]) & mask[..., None,
                                                                                    None])
  sigma = 1.0 / GRID
  heat = jnp.where(mask[..., None, None], jnp.exp(-d2 / (2 * sigma ** 2)), 0.0)
  heat = jnp.where(peak, 1.0, heat).max(1)                          # [B, G, G]
  inside = (d2 <= (0.5 * rad) ** 2) & mask[..., None, None] | peak   # [B, 3, G, G]
  owner = jnp.argmax(inside, axis=1)                                 # objects never overlap
  any_inside = inside.any(1)
  pick = lambda v: jnp.take_along_axis(  # noqa: E731
      jnp.broadcast_to(v, inside.shape), owner[:, None], 1)[:, 0]
  offset = jnp.stack([pick(ox) * GRID - jnp.floor(pick(ox) * GRID),
                      pick(oy) * GRID - jnp.floor(pick(oy) * GRID)], -1) * 2 - 1
  return dict(heat=heat, peak=peak.any(1), inside=any_inside, radius=pick(rad),
              color=pick(objects[..., 3][:, :, None, None]).astype(jnp.int32),
              shape=pick(objects[..., 4][:, :, None, None]).astype(jnp.int32), offset=offset)


def probe_loss(params, model, x, objects, mask):
  """CenterNet's penalty-reduced focal loss on the heatmap + attribute losses at centres."""
  heads, _ = model.apply({"params": params}, x)
  heat_logit, color_logits, shape_logits, offset, radius = split_heads(heads)
  t = _targets(objects, mask)
  p = jax.nn.sigmoid(heat_logit)
  log_p, log_1p = jax.nn.log_sigmoid(heat_logit), jax.nn.log_sigmoid(-heat_logit)
  num = jnp.maximum(mask.sum(), 1)
  focal = jnp.where(t["peak"], (1 - p) ** 2 * log_p, (1 - t["heat"]) ** 4 * p ** 2 * log_1p)
  heat_loss = -focal.sum() / num
  inside = t["inside"].astype(jnp.float32)
  n_inside = jnp.maximum(inside.sum(), 1)
  ce = (optax.softmax_cross_entropy_with_integer_labels(color_logits, t["color"])
        + optax.softmax_cross_entropy_with_integer_labels(shape_logits, t["shape"]))
  attr_loss = (ce * inside).sum() / n_inside
  radius_loss = (jnp.abs(radius - t["radius"]) * inside).sum() / n_inside * 20
  peak = t["peak"].astype(jnp.float32)
  offset_loss = (jnp.abs(offset - t["offset"]).sum(-1) * peak).sum() / num
  total = heat_loss + attr_loss + radius_loss + offset_loss
  return total, dict(heat=heat_loss, attributes=attr_loss, radius=radius_loss,
                     offset=offset_loss)


def _flip(x, objects):
  """Mirror left-right (every shape is left-right symmetric): x -> 1 - x."""
  return x[:, :, ::-1], objects.at[..., 0].set(1.0 - objects[..., 0])


def train_probe(settings: ProbeSettings = ProbeSettings(),
                log: Callable[[str], None] | None = print,
                snapshot: Callable[[int, dict], None] | None = None) -> dict:
  """Renders the training scenes and trains the probe; returns its EMA params.
  ``snapshot(step, ema_params)``, if given, is called every 250 steps (to watch accuracy)."""
  start = time.time()
  images, objects, mask = render_scenes(settings.num_scenes, settings.seed,
                                        settings.held_out_fraction)
  if log:
    log(f"[probe] rendered {settings.num_scenes} scenes in {time.time() - start:.0f}s; "
        f"training {settings.num_steps} steps ...")
  model = ProbeNet(settings.width)
  key = jax.random.key(settings.seed)
  params = model.init(key, jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]
  warmup = min(100, settings.num_steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, settings.learning_rate, warmup, max(settings.decay_steps, warmup + 1), 0.02)
  tx = optax.adam(schedule)
  if settings.clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(settings.clip_grad_norm), tx)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, ema, opt_state, key, images, objects, mask):
    k_flip, k_corrupt = jax.random.split(key)
    x = images.astype(jnp.float32) / 127.5 - 1.0
    flipped, flipped_objects = _flip(x, objects)
    flip = jax.random.bernoulli(k_flip, 0.5, (x.shape[0],))
    x = jnp.where(flip[:, None, None, None], flipped, x)
    objects = jnp.where(flip[:, None, None], flipped_objects, objects)
    x = corrupt(k_corrupt, x)
    (loss, parts), grads = jax.value_and_grad(probe_loss, has_aux=True)(
        params, model, x, objects, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: settings.ema_decay * e + (1 - settings.ema_decay) * p,
                       ema, params)
    return params, ema, opt_state, loss, parts

  rng = np.random.default_rng(settings.seed)
  ema = params
  for i in range(settings.num_steps):
    idx = rng.integers(0, settings.num_scenes, settings.batch_size)
    params, ema, opt_state, loss, parts = step(
        params, ema, opt_state, jax.random.fold_in(key, i), images[idx], objects[idx],
        mask[idx])
    if log and ((i + 1) % 250 == 0 or i == 0):
      log(f"[probe] step {i + 1}/{settings.num_steps} loss {float(loss):.3f} "
          + " ".join(f"{k}={float(v):.3f}" for k, v in parts.items())
          + f" ({time.time() - start:.0f}s)")
    if snapshot is not None and (i + 1) % 250 == 0:
      snapshot(i + 1, ema)
  return ema


# ----------------------------------------------------------------------------------------------
# Reading images.


class Probe:
  """A trained probe: ``read(images)`` -> detections per image, ``features(images)``."""

  def __init__(self, params, settings: ProbeSettings = ProbeSettings(), info: dict | None = None):
    self.params, self.settings, self.info = params, settings, dict(info or {})
    self.model = ProbeNet(settings.width)
    self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, to_input(x)))

  @property
  def feature_dim(self) -> int:
    return 4 * self.settings.width

  def _run(self, images, batch_size: int = 256):
    images = np.asarray(images)
    heads, feats = [], []
    for s in range(0, len(images), batch_size):
      chunk = images[s:s + batch_size]
      pad = batch_size - len(chunk) if len(images) > batch_size else 0
      if pad:  # one compiled batch size
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      h, f = self._apply(self.params, chunk)
      heads.append(np.asarray(h)[:len(chunk) - pad])
      feats.append(np.asarray(f)[:len(chunk) - pad])
    return np.concatenate(heads), np.concatenate(feats)

  def features(self, images) -> np.ndarray:
    """The penultimate layer, pooled: [B, feature_dim] (FD-probe's features)."""
    return self._run(images)[1]

  def read(self, images) -> list[list[judge.Detection]]:
    """Detected objects of each image [B, H, W, 3]."""
    heads, _ = self._run(images)
    return [decode(h, self.settings.threshold) for h in heads]

  def classify_at(self, images, centres) -> list[tuple[str, str]]:
    """(colour, shape) read at given object centres [B, 2] (x, y in image widths), one per
    image: the probe's attribute heads without its detector."""
    heads, _ = self._run(images)
    cells = np.clip((np.asarray(centres) * GRID).astype(int), 0, GRID - 1)
    out = []
    for h, (x, y) in zip(heads, cells, strict=True):
      _, color, shape, _, _ = split_heads(jnp.asarray(h[y, x]))
      out.append((COLORS[int(color.argmax())], shapes.SHAPES[int(shape.argmax())]))
    return out


def decode(heads: np.ndarray, threshold: float) -> list[judge.Detection]:
  """One image's head maps [G, G, C] -> detections at 3x3 local maxima of the heatmap."""
  # split_heads in numpy: jax ops on the host, image by image, made reading 10x slower.
  heads = np.asarray(heads, np.float64)
  c0, c1 = 1 + NUM_COLORS, 1 + NUM_COLORS + NUM_SHAPES
  heat, color, shape = heads[..., 0], heads[..., 1:c0], heads[..., c0:c1]
  offset, radius = np.tanh(heads[..., c1:c1 + 2]), np.logaddexp(0.0, heads[..., c1 + 2]) * 0.1
  p = 1 / (1 + np.exp(-heat))
  padded = np.pad(p, 1, constant_values=-1.0)
  neighbourhood = np.max([padded[i:i + GRID, j:j + GRID] for i in range(3) for j in range(3)], 0)
  found = []
  for y, x in zip(*np.nonzero((p >= neighbourhood) & (p > threshold)), strict=True):
    found.append(judge.Detection(
        COLORS[int(color[y, x].argmax())], shapes.SHAPES[int(shape[y, x].argmax())],
        float((x + (offset[y, x, 0] + 1) / 2) / GRID),
        float((y + (offset[y, x, 1] + 1) / 2) / GRID),
        float(radius[y, x]), float(p[y, x])))
  return sorted(found, key=lambda d: -d.score)[:2 * MAX_OBJECTS]


# ----------------------------------------------------------------------------------------------
# Caching.


def default_cache_dir() -> pathlib.Path:
  """$DIFFUSION_JAX_PROBE_DIR, else <repo>/.cache/probe (never committed)."""
  env = os.environ.get(CACHE_ENV)
  return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / ".cache" / \
      "probe"


def cache_path(settings: ProbeSettings, cache_dir=None) -> pathlib.Path:
  return pathlib.Path(cache_dir or default_cache_dir()) / f"probe-{settings.key()}.msgpack"


def save(probe: Probe, path) -> None:
  """Params (msgpack) and settings + info (JSON beside it), written atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = {"settings": dataclasses.asdict(probe.settings), "info": probe.info}
  for target, data in ((path.with_suffix(".json"), json.dumps(meta, indent=2).encode()),
                       (path, serialization.to_bytes(probe.params))):
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def load(path) -> Probe:
  path = pathlib.Path(path)
  meta = json.loads(path.with_suffix(".json").read_text())
  settings = ProbeSettings(**meta["settings"])
  model = ProbeNet(settings.width)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template["params"])
  params = serialization.from_bytes(template, path.read_bytes())
  return Probe(params, settings, meta.get("info"))


def load_or_train(settings: ProbeSettings = ProbeSettings(), cache_dir=None,
                  log: Callable[[str], None] | None = print, measure: bool = True) -> Probe:
  """The cached probe for ``settings``; trained (and, with ``measure``, its accuracy on
  real images measured and stored with it) if absent."""
  path = cache_path(settings, cache_dir)
  if path.exists() and path.with_suffix(".json").exists():
    return load(path)
  if log:
    log(f"[probe] no trained probe at {path}: training it once (a few CPU minutes) ...")
  start = time.time()
  params = train_probe(settings, log)
  probe = Probe(params, settings, {"train_seconds": round(time.time() - start, 1)})
  from diffusion_jax.evaluation import probe_accuracy

  if measure:
    probe.info["accuracy"] = probe_accuracy.measure(probe)
  save(probe, path)
  if log and measure:
    log(f"[probe] trained in {probe.info['train_seconds']:.0f}s; accuracy on real images: "
        + probe_accuracy.summary(probe.info["accuracy"]) + f"; saved {path}")
  return probe
