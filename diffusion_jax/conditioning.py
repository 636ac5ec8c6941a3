"""Conditions beyond the text: what a stage is conditioned on and how the train step gets it.

A stage's U-Net always takes the text; a super-resolution stage also its low-res image
(``DiffusionSettings.lowres_schedule``). A *condition* is anything else, fed to one of the
U-Net's optional inputs (``input_name``):

  ``InputImage``      InstructPix2Pix (Brooks et al. 2023): the image to edit, carried by
                      the batch as ``input_image`` [B, H, W, C] and concatenated with x_t
                      (``cond_image``);
  ``MaskedImage``     Stable Diffusion's inpainting model (Rombach et al. 2022): a random
                      mask drawn in the step, the image with the masked region zeroed and
                      the mask, concatenated with x_t (``cond_image``, C + 1 channels);
  ``ImageEmbedding``  DALL-E 2's decoder (Ramesh et al. 2022): an image embedding [B, D]
                      (``image_embed``), computed from the batch's images by a frozen
                      ``encoder`` (a CLIP image tower) before the step;
  ``MicroConditioning`` SDXL (Podell et al. 2023, section 2.2): the size of the image a
                      training crop was taken from and the crop's offsets, in pixels
                      (``micro_cond`` [B, 4]), from the data pipeline's random rescale and
                      crop; sampling gives it an uncropped image's values by default;
  ``TargetSize``      SDXL's multi-aspect training (section 2.3): the (height, width) of the
                      aspect bucket a batch was rendered at (``data.buckets``), appended to
                      ``micro_cond``; sampling gives it the size it samples at, which must
                      be one of the stage's buckets (``size_error``).

Each condition is a frozen dataclass the step calls without branching on its kind:

  ``prepare_batch(batch) -> batch``   host side, after the stage kind's ``encode_batch``:
                                      adds what must be computed from the batch (e.g.
                                      the embedding), identity otherwise;
  ``batch_key`` / ``batch_ndim``      the global batch's array the step reads (or None);
  ``train_value(key, batch)``         in the jitted step: the condition before dropout;
  ``drop_prob`` / ``null(value)``     classifier-free dropout, independent of the text's
                                      (Brooks et al. drop image and text 5% each and
                                      both 5%; independent drops give ~that), to zeros.

Sampling passes the same U-Net keywords through ``cascade.guided_model_fn``'s
``extra_cond``; ``sampling_default`` gives them for a condition text-to-image sampling can
fill in itself (micro-conditioning), the others need their tool (edit.py, unclip.py).
Nothing here reads a config (experiments/conditioning_builders.py does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _check_drop(drop_prob: float) -> None:
  if not 0.0 <= drop_prob <= 1.0:
    raise ValueError(f"a condition's drop_prob must lie in [0, 1], got {drop_prob}.")


class _FromBatch:
  """The value is the batch's ``batch_key`` array; its null is zeros."""

  def train_value(self, key: jax.Array, batch: dict) -> jnp.ndarray:
    del key
    return batch[self.batch_key].astype(jnp.float32)

  def null(self, value: jnp.ndarray) -> jnp.ndarray:
    return jnp.zeros_like(value)


@dataclasses.dataclass(frozen=True)
class InputImage(_FromBatch):
  """The batch's ``input_image`` [B, H, W, C] (pixels in [-1, 1], the stage's size)."""

  drop_prob: float = 0.05
  channels: int = 3
  input_name: str = "cond_image"
  batch_key: str = "input_image"
  batch_ndim: int = 4

  def __post_init__(self):
    _check_drop(self.drop_prob)

  @property
  def width(self) -> int:
    return self.channels

  def prepare_batch(self, batch: dict) -> dict:
    if self.batch_key not in batch:
      raise ValueError(f"an image-conditioned stage needs batch[{self.batch_key!r}] (a "
                       "dataset of image pairs, e.g. edit pairs); this batch has "
                       f"{sorted(batch)}.")
    return batch

  def to_json(self) -> dict:
    return {"kind": "input_image", "drop_prob": self.drop_prob, "channels": self.channels}


def random_masks(key: jax.Array, batch: int, height: int, width: int, *,
                 min_fraction: float = 0.2, max_fraction: float = 0.8,
                 full_prob: float = 0.1) -> jnp.ndarray:
  """Masks [B, H, W, 1] in {0, 1} (1 = to generate): one axis-aligned rectangle per image
  with sides uniform in [min_fraction, max_fraction] of the image and a uniform position,
  and with probability ``full_prob`` the whole image (so the stage also learns plain
  text-to-image, as SD's inpainting model is trained on fully masked images too)."""
  k_size, k_pos, k_full = jax.random.split(key, 3)
  sizes = jax.random.uniform(k_size, (batch, 2), minval=min_fraction, maxval=max_fraction)
  starts = jax.random.uniform(k_pos, (batch, 2)) * (1.0 - sizes)
  ys = (jnp.arange(height) + 0.5) / height
  xs = (jnp.arange(width) + 0.5) / width
  in_y = (ys[None] >= starts[:, :1]) & (ys[None] < starts[:, :1] + sizes[:, :1])
  in_x = (xs[None] >= starts[:, 1:]) & (xs[None] < starts[:, 1:] + sizes[:, 1:])
  rect = in_y[:, :, None] & in_x[:, None, :]
  full = jax.random.bernoulli(k_full, full_prob, (batch,))
  return (rect | full[:, None, None]).astype(jnp.float32)[..., None]


def masked_input(image: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """The inpainting stage's condition: concat(image * (1 - mask), mask) [B, H, W, C + 1]
  (mask [B, H, W, 1], 1 = to generate)."""
  return jnp.concatenate([image * (1.0 - mask), mask], axis=-1)


@dataclasses.dataclass(frozen=True)
class MaskedImage:
  """A random mask per example (``random_masks``) and ``masked_input`` of the batch's
  image. Not dropped by default: a fully masked image is already the unconditional case,
  and classifier-free guidance of an inpainting stage keeps the masked image in both
  halves (only the text is dropped)."""

  drop_prob: float = 0.0
  channels: int = 3
  min_fraction: float = 0.2
  max_fraction: float = 0.8
  full_prob: float = 0.1
  input_name: str = "cond_image"
  batch_key: str | None = None
  batch_ndim: int = 4

  def __post_init__(self):
    _check_drop(self.drop_prob)
    if not 0.0 < self.min_fraction <= self.max_fraction <= 1.0:
      raise ValueError("masked_image needs 0 < min_fraction <= max_fraction <= 1, got "
                       f"{self.min_fraction} and {self.max_fraction}.")
    if not 0.0 <= self.full_prob <= 1.0:
      raise ValueError(f"masked_image's full_prob must lie in [0, 1], got {self.full_prob}.")

  @property
  def width(self) -> int:
    return self.channels + 1  # the masked image and the mask

  def prepare_batch(self, batch: dict) -> dict:
    return batch

  def train_value(self, key: jax.Array, batch: dict) -> jnp.ndarray:
    image = batch["image"].astype(jnp.float32)
    b, h, w, _ = image.shape
    mask = random_masks(key, b, h, w, min_fraction=self.min_fraction,
                        max_fraction=self.max_fraction, full_prob=self.full_prob)
    return masked_input(image, mask)

  def null(self, value: jnp.ndarray) -> jnp.ndarray:
    # Fully masked: nothing known, which is what text-to-image sampling gives it.
    return masked_input(jnp.zeros_like(value[..., :-1]), jnp.ones_like(value[..., -1:]))

  def to_json(self) -> dict:
    return {"kind": "masked_image", "drop_prob": self.drop_prob, "channels": self.channels,
            "min_fraction": self.min_fraction, "max_fraction": self.max_fraction,
            "full_prob": self.full_prob}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageEmbedding(_FromBatch):
  """An embedding [B, dim] of each batch image. ``encoder(images [B, H, W, C] in [-1, 1])
  -> [B, dim]`` (jitted, frozen) computes ``batch["image_embed"]`` in ``prepare_batch``;
  without an encoder the batch must already carry it. ``source`` describes the encoder
  for ``to_json`` (e.g. the CLIP directory)."""

  dim: int
  drop_prob: float = 0.1
  encoder: Callable[[jnp.ndarray], jnp.ndarray] | None = None
  source: Any = None
  input_name: str = "image_embed"
  batch_key: str = "image_embed"
  batch_ndim: int = 2

  def __post_init__(self):
    _check_drop(self.drop_prob)
    if self.dim <= 0:
      raise ValueError(f"image_embed needs a positive dim, got {self.dim}.")

  @property
  def width(self) -> int:
    return self.dim

  def prepare_batch(self, batch: dict) -> dict:
    if self.encoder is not None:
      return dict(batch, **{self.batch_key: self.encoder(batch["image"])})
    if self.batch_key not in batch:
      raise ValueError(f"no encoder and no batch[{self.batch_key!r}]: give the condition "
                       "an encoder (a CLIP image tower) or a dataset carrying embeddings.")
    return batch

  def to_json(self) -> dict:
    return {"kind": "image_embed", "drop_prob": self.drop_prob, "dim": self.dim,
            "source": self.source}


@dataclasses.dataclass(frozen=True)
class MicroConditioning(_FromBatch):
  """SDXL's size and crop conditioning: ``batch["micro_cond"]`` [B, 4] = (height, width)
  of the rescaled image a crop was cut from and the crop's (top, left), in pixels of the
  stage's resolution (``data.pipeline``'s ``crop="random_rescale"``). Sampling uses
  (R, R, 0, 0): an image that was not cropped (SDXL's default crop (0, 0))."""

  drop_prob: float = 0.0
  input_name: str = "micro_cond"
  batch_key: str = "micro_cond"
  batch_ndim: int = 2

  def __post_init__(self):
    _check_drop(self.drop_prob)

  @property
  def width(self) -> int:
    return 4

  def prepare_batch(self, batch: dict) -> dict:
    if self.batch_key not in batch:
      raise ValueError("a micro-conditioned stage needs batch['micro_cond'] (train with "
                       "config.data.crop='random_rescale').")
    return batch

  def to_json(self) -> dict:
    return {"kind": "micro", "drop_prob": self.drop_prob}


@dataclasses.dataclass(frozen=True)
class TargetSize(_FromBatch):
  """SDXL's target-size (aspect-bucket) conditioning: ``batch["target_size"]`` [B, 2] =
  (height, width) in pixels of the bucket the batch was rendered at
  (``data.buckets.BucketedShapesPipeline``), fed to ``micro_cond`` after the size and crop
  values if the stage has them (SDXL concatenates c_size, c_crop, c_ar). ``buckets``: the
  (height, width) pairs the stage trained on; sampling asks for one of them."""

  buckets: tuple[tuple[int, int], ...]
  drop_prob: float = 0.0
  input_name: str = "micro_cond"
  batch_key: str = "target_size"
  batch_ndim: int = 2

  def __post_init__(self):
    _check_drop(self.drop_prob)
    object.__setattr__(self, "buckets", tuple((int(h), int(w)) for h, w in self.buckets))
    if not self.buckets:
      raise ValueError("target_size needs the stage's aspect buckets.")

  @property
  def width(self) -> int:
    return 2

  def prepare_batch(self, batch: dict) -> dict:
    if self.batch_key not in batch:
      raise ValueError("an aspect-bucketed stage needs batch['target_size'] (train on "
                       "data.buckets.BucketedShapesPipeline: config.data.aspect_buckets).")
    return batch

  def to_json(self) -> dict:
    return {"kind": "target_size", "drop_prob": self.drop_prob,
            "buckets": [list(b) for b in self.buckets]}


def _hw(size) -> tuple[int, int]:
  return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (size, size)


def uncropped(batch: int, size: int | tuple[int, int]) -> jnp.ndarray:
  """Micro-conditioning of an uncropped image of ``size`` (R, or (H, W)): [B, 4] =
  (H, W, 0, 0)."""
  height, width = _hw(size)
  return jnp.broadcast_to(jnp.asarray([height, width, 0, 0], jnp.float32), (batch, 4))


def sampling_default(described: dict, batch: int, size: int | tuple[int, int]) -> dict | None:
  """U-Net keywords text-to-image sampling of images of ``size`` (R, or (H, W)) gives a
  condition (``to_json`` form) by itself, or None when it cannot (the condition needs its
  input)."""
  if described.get("kind") == "micro":
    return {"micro_cond": uncropped(batch, size)}
  if described.get("kind") == "target_size":
    return {"micro_cond": jnp.broadcast_to(jnp.asarray(_hw(size), jnp.float32), (batch, 2))}
  return None


def size_error(conditioning: tuple | list, resolution: int,
               size: tuple[int, int] | None) -> str | None:
  """Why a stage of ``resolution`` px conditioned on ``conditioning`` (``to_json`` forms)
  cannot sample images of ``size`` (height, width; None: its square), or None if it can:
  an aspect-bucketed stage samples at its buckets, any other at its square only."""
  size = (resolution, resolution) if size is None else _hw(size)
  buckets = [tuple(b) for d in conditioning if d.get("kind") == "target_size"
             for b in d["buckets"]]
  if buckets and size not in buckets:
    return (f"{size[0]}x{size[1]} is not one of the stage's aspect buckets "
            f"({', '.join(f'{h}x{w}' for h, w in buckets)}); sample at one of them.")
  if not buckets and size != (resolution, resolution):
    return (f"the stage was trained on {resolution}x{resolution} images only (no aspect "
            f"buckets, config.data.aspect_buckets), so it cannot sample {size[0]}x{size[1]}.")
  return None


def drop(key: jax.Array, value: jnp.ndarray, null: jnp.ndarray, prob: float) -> jnp.ndarray:
  """Rows of ``value`` [B, ...] replaced by ``null`` with probability ``prob`` each."""
  if prob == 0.0:
    return value
  keep = jax.random.bernoulli(key, 1.0 - prob, (value.shape[0],))
  return jnp.where(keep.reshape((-1,) + (1,) * (value.ndim - 1)), value, null)


def train_inputs(conditions, key: jax.Array, batch: dict) -> dict:
  """The U-Net keywords of ``conditions`` for one training batch, dropped at random:
  {input_name: value}. Two conditions feeding ``cond_image`` are concatenated."""
  out: dict[str, jnp.ndarray] = {}
  for i, condition in enumerate(conditions):
    k_value, k_drop = jax.random.split(jax.random.fold_in(key, i))
    value = condition.train_value(k_value, batch)
    value = drop(k_drop, value, condition.null(value), condition.drop_prob)
    name = condition.input_name
    out[name] = value if name not in out else jnp.concatenate([out[name], value], axis=-1)
  return out


def batch_ndims(conditions) -> dict[str, int]:
  """{batch key: ndim} of the arrays ``conditions`` need in the global train batch."""
  return {c.batch_key: c.batch_ndim for c in conditions if c.batch_key is not None}


def unet_requirements(conditions) -> dict:
  """The UNetConfig fields ``conditions`` need: cond_image_channels, image_embed_dim and
  micro_cond_dim."""
  channels = sum(c.width for c in conditions if c.input_name == "cond_image")
  embeds = [c.width for c in conditions if c.input_name == "image_embed"]
  if len(embeds) > 1:
    raise ValueError("a stage takes at most one image embedding condition.")
  micro = sum(c.width for c in conditions if c.input_name == "micro_cond")
  return {"cond_image_channels": channels, "image_embed_dim": embeds[0] if embeds else None,
          "micro_cond_dim": micro}


def from_json(d: dict | None, encoder=None):
  """The condition ``to_json`` described (None or {} -> None); an image embedding's
  encoder is not serialised: pass it."""
  if not d:
    return None
  d = dict(d)
  kind = d.pop("kind")
  if kind == "input_image":
    return InputImage(**d)
  if kind == "masked_image":
    return MaskedImage(**d)
  if kind == "image_embed":
    return ImageEmbedding(encoder=encoder, **d)
  if kind == "micro":
    return MicroConditioning(**d)
  if kind == "target_size":
    return TargetSize(**d)
  raise ValueError(f"unknown condition kind {kind!r} (input_image, masked_image, "
                   "image_embed, micro or target_size)")
