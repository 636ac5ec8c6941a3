"""The FID Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture") in Flax:
a feature extractor for the Frechet distance (``frechet.py``) that gives the standard FID
(Heusel et al. 2017) when loaded with the standard weights.

Architecture: torchvision's Inception-v3 as patched by pytorch-fid for FID (its
``FIDInceptionA``/``C``/``E_1``/``E_2``): average pools that ignore the zero padding
(TensorFlow's), max pooling in the last block's pool branch, BatchNorm eps 1e-3; the
features are the 2048-d global average pool after ``Mixed_7c`` ("pool3"). Images are
scaled to [0, 1], resized to ``input_size`` (299) px bilinearly (half-pixel centres, no
antialiasing: ``F.interpolate(..., align_corners=False)``) and mapped to [-1, 1].

Weights: ONE file format, ``.npz`` holding pytorch-fid's state dict unchanged: the keys of
``pt_inception-2015-12-05-6726825d.pth`` (``Conv2d_1a_3x3.conv.weight`` [O, I, kh, kw],
``Mixed_5b.branch1x1.bn.running_var`` [O], ...), torch's layouts. Convert the ``.pth`` once
with ``experiments/convert_fid_inception.py`` (the only step needing torch); this module
reads the ``.npz`` with numpy. The classifier (``fc.*``) and ``num_batches_tracked`` entries
are ignored.

``InceptionSettings(width=..., input_size=...)`` scales every channel count (and the input
size) so that a small random network of the same interface can be built, saved in the same
format (``save_npz``) and loaded back (tests). Shapes: images [B, H, W, 3] uint8 (or floats
in [-1, 1]); features [B, feature_dim] (2048 at width 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_NAME)
CONVERTED_NAME = "pt_inception-2015-12-05-6726825d.npz"
BN_EPS = 1e-3
# The key a file written by ``save_npz`` stores its InceptionSettings under (JSON); a file
# without it (the converted standard weights) is the standard network.
SETTINGS_KEY = "_settings"
# A conv's parameters: the flax name -> the state dict's suffix.
_PARAM_KEYS = {"kernel": "conv.weight", "scale": "bn.weight", "bias": "bn.bias",
               "mean": "bn.running_mean", "var": "bn.running_var"}


class WeightsError(ValueError):
  """A missing, unconvertable or mismatched weights file (one line saying what to do)."""


@dataclasses.dataclass(frozen=True)
class InceptionSettings:
  """``width`` multiplies every channel count (1: the standard network); ``input_size`` is
  the side images are resized to (299 standard; >= 75, the smallest the strides allow)."""
  width: float = 1.0
  input_size: int = 299

  def channels(self, c: int) -> int:
    return max(1, int(round(c * self.width)))


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (inference statistics) -> ReLU, torchvision's BasicConv2d."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    # Params come from a weights file or ``init_params``, never from flax's init.
    kernel = self.param("kernel", nn.initializers.zeros, (kh, kw, x.shape[-1], self.features))
    stats = {k: self.param(k, nn.initializers.ones if k in ("scale", "var") else
                           nn.initializers.zeros, (self.features,))
             for k in ("scale", "bias", "mean", "var")}
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(x, kernel, (self.strides,) * 2, ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = (y - stats["mean"]) * (stats["scale"] * jax.lax.rsqrt(stats["var"] + BN_EPS))
    return nn.relu(y + stats["bias"])


def _avg_pool(x):  # TensorFlow's: the zero padding is not counted
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class _Block(nn.Module):
  settings: InceptionSettings

  def conv(self, name, c, kernel, strides=1, padding=(0, 0)):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    return BasicConv(self.settings.channels(c), kernel, strides, padding, name=name)


class InceptionA(_Block):  # Mixed_5b-d
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=(2, 2))(self.conv("branch5x5_1", 48, 1)(x))
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=(1, 1))(b3)
    pool = self.conv("branch_pool", self.pool_features, 1)(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, pool], -1)


class InceptionB(_Block):  # Mixed_6a: 35 -> 17 px
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
    d = self.conv("branch3x3dbl_1", 64, 1)(x)
    d = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(d)
    d = self.conv("branch3x3dbl_3", 96, 3, strides=2)(d)
    return jnp.concatenate([b3, d, _max_pool(x)], -1)


class InceptionC(_Block):  # Mixed_6b-e: factorised 7x7 convolutions
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = self.conv("branch7x7_2", c7, row[0], padding=row[1])(b7)
    b7 = self.conv("branch7x7_3", 192, col[0], padding=col[1])(b7)
    d = self.conv("branch7x7dbl_1", c7, 1)(x)
    for i, (kernel, pad), c in ((2, col, c7), (3, row, c7), (4, col, c7), (5, row, 192)):
      d = self.conv(f"branch7x7dbl_{i}", c, kernel, padding=pad)(d)
    pool = self.conv("branch_pool", 192, 1)(_avg_pool(x))
    return jnp.concatenate([b1, b7, d, pool], -1)


class InceptionD(_Block):  # Mixed_7a: 17 -> 8 px
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, 3, strides=2)(self.conv("branch3x3_1", 192, 1)(x))
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(_Block):  # Mixed_7b (average pool), Mixed_7c (max pool: pytorch-fid's patch)
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
    d = self.conv("branch3x3dbl_1", 448, 1)(x)
    d = self.conv("branch3x3dbl_2", 384, 3, padding=(1, 1))(d)
    d = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(d),
                         self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(d)], -1)
    pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool(x)
    pool = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, b3, d, pool], -1)


class InceptionV3(_Block):
  """[B, S, S, 3] in [-1, 1] (S = settings.input_size) -> pool3 features [B, feature_dim]."""

  @nn.compact
  def __call__(self, x):
    s = self.settings
    x = self.conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
    x = self.conv("Conv2d_2a_3x3", 32, 3)(x)
    x = _max_pool(self.conv("Conv2d_2b_3x3", 64, 3, padding=(1, 1))(x))
    x = self.conv("Conv2d_3b_1x1", 80, 1)(x)
    x = _max_pool(self.conv("Conv2d_4a_3x3", 192, 3)(x))
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(s, pool_features, name=name)(x)
    x = InceptionB(s, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(s, c7, name=name)(x)
    x = InceptionD(s, name="Mixed_7a")(x)
    x = InceptionE(s, False, name="Mixed_7b")(x)
    x = InceptionE(s, True, name="Mixed_7c")(x)
    return x.mean((1, 2))


def to_input(images, size: int) -> jnp.ndarray:
  """Images [B, H, W, 3] (uint8, or floats in [-1, 1]) -> [B, size, size, 3] in [-1, 1],
  resized bilinearly as pytorch-fid does (in [0, 1]; the affine map commutes with it)."""
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  if x.shape[1:3] == (size, size):
    return x
  return jax.image.resize(x, (x.shape[0], size, size, 3), "linear", antialias=False)


# ----------------------------------------------------------------------------------------------
# Weights: pytorch-fid's state dict as .npz.


def _flat(params) -> dict[str, np.ndarray]:
  """Flax params -> {state dict key: array in torch's layout}."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [p.key for p in path]
    key = ".".join(names[:-1] + [_PARAM_KEYS[names[-1]]])
    value = np.asarray(leaf, np.float32)
    out[key] = value.transpose(3, 2, 0, 1) if names[-1] == "kernel" else value
  return out


def _template(settings: InceptionSettings):
  """The params' shapes (abstract: nothing runs or compiles)."""
  model = InceptionV3(settings)
  x = jax.ShapeDtypeStruct((1, settings.input_size, settings.input_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]


def init_params(settings: InceptionSettings, seed: int = 0):
  """A random network's params: He-normal kernels, random BatchNorm statistics (positive
  variances). Drawn with numpy: flax's init of 94 convolutions compiles for minutes."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:3]))
    elif name == "var":
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = (name == "scale") + 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, _template(settings))


def save_npz(params, path, settings: InceptionSettings | None = None) -> None:
  """Writes params in the weights format (state dict keys, torch layouts), atomically;
  non-standard ``settings`` are stored with them."""
  path = pathlib.Path(path)
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
  extra = {}
  if settings is not None and settings != InceptionSettings():
    extra[SETTINGS_KEY] = np.array(json.dumps(dataclasses.asdict(settings)))
  np.savez(tmp, **_flat(params), **extra)
  tmp.replace(path)


def missing_weights_message(path) -> str:
  return (f"the Inception weights file {path} does not exist: download pytorch-fid's "
          f"{WEIGHTS_NAME} ({WEIGHTS_URL}) and convert it once with `python "
          f"experiments/convert_fid_inception.py --pth={WEIGHTS_NAME} --out={CONVERTED_NAME}` "
          "(needs torch), then pass the .npz.")


def load_params(path, settings: InceptionSettings | None = None):
  """(params, settings) from a weights ``.npz``; ``settings`` default: those stored in the
  file, else the standard network's. WeightsError (one line) if the file is missing, not an
  .npz, or lacks / mis-shapes a parameter."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(missing_weights_message(path))
  if path.suffix == ".pth":
    raise WeightsError(f"{path} is the torch file: convert it once with `python experiments/"
                       f"convert_fid_inception.py --pth={path} --out={path.with_suffix('.npz')}`"
                       " (needs torch) and pass the .npz.")
  try:
    stored = np.load(path)
    arrays = {k: stored[k] for k in stored.files}
  except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
    raise WeightsError(f"{path} is not a readable .npz weights file ({type(e).__name__}: "
                       f"{e}); convert {WEIGHTS_NAME} with experiments/"
                       "convert_fid_inception.py.") from None
  if settings is None:
    stored_settings = arrays.pop(SETTINGS_KEY, None)
    settings = (InceptionSettings() if stored_settings is None else
                InceptionSettings(**json.loads(str(stored_settings))))
  template = _template(settings)

  def take(path_, leaf):
    names = [p.key for p in path_]
    key = ".".join(names[:-1] + [_PARAM_KEYS[names[-1]]])
    if key not in arrays:
      raise WeightsError(f"{path} has no parameter {key}: not an FID Inception-v3 state dict "
                         f"of width {settings.width} (convert {WEIGHTS_NAME}).")
    value = arrays[key].transpose(2, 3, 1, 0) if names[-1] == "kernel" else arrays[key]
    if value.shape != leaf.shape:
      raise WeightsError(f"{path}: {key} has shape {arrays[key].shape}; the network of width "
                         f"{settings.width} needs {leaf.shape} (in flax layout).")
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(take, template), settings


def convert_torch_file(pth, out, settings: InceptionSettings | None = None) -> int:
  """pytorch-fid's state dict ``pth`` -> the ``.npz`` ``out`` (keys and layouts unchanged,
  ``num_batches_tracked`` dropped), checked by loading it for ``settings`` (default the
  standard network; others are stored in the file). Needs torch; returns the array count."""
  import torch  # only here: the one step that needs it

  state = torch.load(pth, map_location="cpu", weights_only=True)
  arrays = {k: v.detach().float().numpy() for k, v in state.items()
            if not k.endswith("num_batches_tracked")}
  if settings is not None and settings != InceptionSettings():
    arrays[SETTINGS_KEY] = np.array(json.dumps(dataclasses.asdict(settings)))
  out = pathlib.Path(out)
  tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp.npz")
  np.savez(tmp, **arrays)
  try:
    load_params(tmp)  # every parameter present, with its shape
  except WeightsError:
    tmp.unlink()
    raise
  tmp.replace(out)
  return len(arrays)


class InceptionFeatures:
  """``features(images [B, H, W, 3]) -> [B, feature_dim]``: pool3 features, batched under
  one compiled batch size. ``load(path)`` reads a weights file."""

  def __init__(self, params, settings: InceptionSettings = InceptionSettings(),
               batch_size: int = 50, source: str | None = None):
    self.params, self.settings, self.batch_size, self.source = params, settings, batch_size, \
        source
    model = InceptionV3(settings)
    self._apply = jax.jit(lambda p, x: model.apply({"params": p},
                                                   to_input(x, settings.input_size)))

  @classmethod
  def load(cls, path, settings: InceptionSettings | None = None, batch_size: int = 50):
    params, settings = load_params(path, settings)
    return cls(params, settings, batch_size, str(path))

  @property
  def feature_dim(self) -> int:
    c = self.settings.channels  # Mixed_7c's concatenation: 1x1, 2 x 3x3, 2 x 3x3dbl, pool
    return c(320) + 4 * c(384) + c(192)

  def features(self, images) -> np.ndarray:
    images = np.asarray(images)
    out = []
    for s in range(0, len(images), self.batch_size):
      chunk = images[s:s + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      out.append(np.asarray(self._apply(self.params, chunk))[:len(chunk) - pad])
    return np.concatenate(out) if out else np.zeros((0, self.feature_dim), np.float32)
