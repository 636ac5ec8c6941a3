"""A noise-aware attribute classifier for classifier guidance (Dhariwal & Nichol 2021).

A small conv net reads a noised image x_t = alpha x0 + sigma eps and its log-SNR and gives,
per attribute (colour, shape, position of the shapes world), logits over that attribute's
labels: ``(x_t [B, R, R, C], logsnr [B]) -> {attribute: logits [B, K_a]}``. The log-SNR
enters every residual block by FiLM (scale and shift from sinusoidal log-SNR features, as
the U-Net's ResBlocks), so one network classifies every noise level a sampler visits; it
is trained on x_t at random times of the diffusion schedule
(``training.classifier_train``), the noise-aware recipe of GLIDE's CLIP.

The head sees both the globally pooled features (what: colour, shape) and a flattened,
narrow copy of the coarsest feature map (where: position), so the network is tied to the
``resolution`` it was built for.

A classifier directory holds ``classifier.json`` (architecture, vocabulary, training
info) and ``params.msgpack``; ``save`` writes one, ``load`` reads it (one-line errors).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from diffusion_jax.models import layers

FORMAT = "diffusion_jax.attribute_classifier"
CONFIG_NAME, PARAMS_NAME = "classifier.json", "params.msgpack"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """The network and what it names: ``attributes`` is ((name, (label, ...)), ...)."""
  attributes: tuple[tuple[str, tuple[str, ...]], ...]
  resolution: int = 32
  channels: int = 3
  width: int = 32
  levels: int = 3            # resolution halves between levels: 32 -> 16 -> 8 px
  noise_features: int = 64

  def __post_init__(self):
    if not self.attributes or any(len(labels) < 2 for _, labels in self.attributes):
      raise ValueError("an attribute classifier needs attributes of two labels or more, "
                       f"got {self.attributes}.")
    if self.resolution % 2 ** (self.levels - 1):
      raise ValueError(f"resolution {self.resolution} must divide by 2^(levels - 1) = "
                       f"{2 ** (self.levels - 1)}.")
    if self.width % 8 or self.noise_features % 2:
      raise ValueError(f"width ({self.width}) must be a multiple of 8 and noise_features "
                       f"({self.noise_features}) even.")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.attributes)

  def labels(self, name: str) -> tuple[str, ...]:
    return dict(self.attributes)[name]

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "attributes": {n: list(v) for n, v in self.attributes}}

  @classmethod
  def from_json(cls, d: dict) -> ClassifierConfig:
    d = dict(d)
    d["attributes"] = tuple((n, tuple(v)) for n, v in d["attributes"].items())
    return cls(**d)


class _FiLMBlock(nn.Module):
  """GroupNorm -> SiLU -> conv, FiLM by the noise embedding, GroupNorm -> SiLU -> conv,
  plus a (projected) skip: [B, H, W, C_in] -> [B, H, W, features]."""
  features: int

  @nn.compact
  def __call__(self, x, emb):
    h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(min(8, x.shape[-1]))(x)))
    scale, shift = jnp.split(nn.Dense(2 * self.features)(emb)[:, None, None], 2, axis=-1)
    h = nn.GroupNorm(8)(h) * (1 + scale) + shift
    h = nn.Conv(self.features, (3, 3))(nn.silu(h))
    skip = x if x.shape[-1] == self.features else nn.Conv(self.features, (1, 1))(x)
    return (skip + h) / np.sqrt(2.0)


class AttributeNet(nn.Module):
  """(x_t [B, R, R, C], logsnr [B]) -> {attribute: logits [B, K_a]}."""
  config: ClassifierConfig

  @nn.compact
  def __call__(self, x_t, logsnr):
    cfg = self.config
    if x_t.shape[1:] != (cfg.resolution, cfg.resolution, cfg.channels):
      raise ValueError(f"this attribute classifier reads [B, {cfg.resolution}, "
                       f"{cfg.resolution}, {cfg.channels}] images, got {tuple(x_t.shape)}.")
    logsnr = jnp.broadcast_to(logsnr, x_t.shape[:1])
    emb = layers.logsnr_features(logsnr, cfg.noise_features)
    emb = nn.Dense(4 * cfg.width)(nn.silu(nn.Dense(4 * cfg.width)(emb)))
    h = nn.Conv(cfg.width, (3, 3))(x_t)
    for level in range(cfg.levels):
      h = _FiLMBlock(cfg.width * min(2 ** level, 4))(h, emb)
      if level < cfg.levels - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
    h = nn.silu(nn.GroupNorm(8)(h))
    where = nn.Conv(8, (1, 1))(h).reshape(h.shape[0], -1)
    f = nn.silu(nn.Dense(4 * cfg.width)(jnp.concatenate([h.mean((1, 2)), where], axis=-1)))
    return {name: nn.Dense(len(labels), name=f"head_{name}")(f)
            for name, labels in cfg.attributes}


@dataclasses.dataclass(frozen=True)
class AttributeClassifier:
  """A built network and its params; ``info`` is what its trainer recorded."""
  config: ClassifierConfig
  params: Any
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def module(self) -> AttributeNet:
    return AttributeNet(self.config)

  def logits(self, x_t: jnp.ndarray, logsnr: jnp.ndarray, params: Any = None) -> dict:
    """{attribute: logits [B, K_a]} of x_t [B, R, R, C] in [-1, 1] at logsnr [B]."""
    return self.module.apply({"params": self.params if params is None else params},
                             x_t, logsnr)


def init(config: ClassifierConfig, seed: int = 0) -> AttributeClassifier:
  """A randomly initialised classifier (params drawn from ``seed``)."""
  size = config.resolution
  # XLA's own bit generator ("rbg"): the same params for a seed, and compiled in a quarter
  # of the time threefry's per-tensor draws take on CPU (measured: 3.8 s against 17 s).
  params = jax.jit(AttributeNet(config).init)(
      jax.random.key(seed, impl="rbg"), jnp.zeros((1, size, size, config.channels)),
      jnp.zeros((1,)))
  return AttributeClassifier(config, params["params"])


def save(classifier: AttributeClassifier, directory) -> pathlib.Path:
  """Writes ``classifier.json`` and ``params.msgpack`` into ``directory``."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  meta = {"format": FORMAT, "config": classifier.config.to_json(), "info": classifier.info}
  (directory / PARAMS_NAME).write_bytes(serialization.to_bytes(
      jax.device_get(classifier.params)))
  (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
  return directory


def load(directory) -> AttributeClassifier:
  """The classifier saved in ``directory``. Raises FileNotFoundError / ValueError with one
  line for a missing directory, another kind of checkpoint (a CLIP's, a stage's) or
  params that do not fit the recorded architecture."""
  directory = pathlib.Path(directory)
  how = "write one with experiments/train_classifier.py (its <workdir>/classifier)"
  if not directory.is_dir():
    raise FileNotFoundError(f"no attribute-classifier directory {directory}: {how}.")
  meta_path = directory / CONFIG_NAME
  if not meta_path.is_file():
    other = ""
    if (directory / "config.json").is_file():
      model_type = json.loads((directory / "config.json").read_text()).get("model_type")
      other = f" (it holds a {model_type or 'model'} config.json)" if model_type else ""
    raise ValueError(f"{directory} is not an attribute-classifier directory: it has no "
                     f"{CONFIG_NAME}{other}; {how}.")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path} is not an attribute classifier's (format "
                     f"{meta.get('format')!r}); {how}.")
  try:
    config = ClassifierConfig.from_json(meta["config"])
  except (KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{meta_path} has a malformed classifier config ({type(e).__name__}: "
                     f"{e}); {how}.") from None
  size = config.resolution
  abstract = jax.eval_shape(lambda: AttributeNet(config).init(
      jax.random.key(0), jnp.zeros((1, size, size, config.channels)), jnp.zeros((1,))))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract["params"])
  if not (directory / PARAMS_NAME).is_file():
    raise FileNotFoundError(f"{directory} has no {PARAMS_NAME}; {how}.")
  try:
    params = serialization.from_bytes(template, (directory / PARAMS_NAME).read_bytes())
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{directory / PARAMS_NAME} does not fit {CONFIG_NAME}'s "
                     f"architecture: {str(e).splitlines()[0]}") from None
  shapes_ok = jax.tree.all(jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), params,
                                        template))
  if not shapes_ok:
    raise ValueError(f"{directory / PARAMS_NAME} has params of other shapes than "
                     f"{CONFIG_NAME}'s architecture.")
  return AttributeClassifier(config, jax.tree.map(jnp.asarray, params), meta.get("info", {}))
