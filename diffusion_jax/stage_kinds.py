"""Stage kinds: what a stage encodes, what its network consumes and how samples decode.

The training loop and the cascade call these three methods and never branch on the kind:

  ``encode_batch(batch) -> batch``  the global train batch as the network consumes it
                                    (``batch["image"]`` [B, H, W, C] pixels in [-1, 1]
                                    becomes whatever the diffusion runs on);
  ``sample_shape(size, channels) -> (h, w, c)``  what a sampler draws for a stage whose
                                    *output* is ``size`` px (R, or (H, W): aspect buckets);
  ``decode(x) -> images``           samples back to pixels [B, H, W, C].

``PIXEL`` is the identity (base and super-resolution stages). ``LatentKind`` diffuses in
the latent space of a frozen KL autoencoder (Rombach et al. 2022, "Latent Diffusion"):
training batches are encoded on the fly by a jitted encoder (the posterior mean, scaled by
the autoencoder's ``scaling_factor``, so the same batch always gives the same latents),
and sampled latents are decoded by a jitted decoder. The autoencoder's params are
arguments of those jitted functions, not constants baked into the programs. With a
``LatentCache`` (training), an image seen before is not encoded again: a pipeline without
augmentation repeats every image each epoch, so after the first the encoder stops running.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import autoencoder as ae


def _height_width(size) -> tuple[int, int]:
  """R or (H, W) -> (H, W)."""
  return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (size, size)


@dataclasses.dataclass(frozen=True)
class PixelKind:
  """Diffusion on pixels: nothing to encode or decode."""

  name: str = "pixel"
  # Dynamic thresholding (Imagen) assumes x0 lives in [-1, 1], which pixels do.
  default_threshold: str = "dynamic"

  def encode_batch(self, batch: dict) -> dict:
    return batch

  def sample_shape(self, size, channels: int) -> tuple[int, int, int]:
    return (*_height_width(size), channels)

  def decode(self, x: jnp.ndarray) -> jnp.ndarray:
    return x

  def to_json(self) -> dict:
    return {"name": self.name}


PIXEL = PixelKind()


class LatentCache:
  """Host-memory memo of an encoder's per-image outputs, keyed by the image's bytes.

  ``lookup(images)`` returns the cached latents of a whole host batch, or None if any image
  is missing (the caller then encodes the whole batch, so the encoder keeps one batch
  shape and never recompiles, and ``store``s it). Exact: a hit returns the very latents the
  encoder gave that image. Entries are added until ``max_bytes`` is reached, then the cache
  stops growing (augmented pipelines, whose images rarely repeat, only pay for hashing).
  """

  def __init__(self, max_bytes: int):
    if max_bytes <= 0:
      raise ValueError(f"a latent cache needs a positive size, got {max_bytes} bytes")
    self.max_bytes = int(max_bytes)
    self.bytes = 0
    self.hits = 0
    self.misses = 0
    self._entries: dict[bytes, np.ndarray] = {}

  @staticmethod
  def _keys(images: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest()
            + repr(x.shape).encode() for x in images]

  def lookup(self, images: np.ndarray) -> tuple[list[bytes], np.ndarray | None]:
    keys = self._keys(images)
    found = [self._entries.get(k) for k in keys]
    if any(f is None for f in found):
      self.misses += 1
      return keys, None
    self.hits += 1
    return keys, np.stack(found)

  def store(self, keys: list[bytes], latents: np.ndarray) -> None:
    for key, latent in zip(keys, latents, strict=True):
      if key in self._entries:
        continue
      if self.bytes + latent.nbytes > self.max_bytes:
        return
      self._entries[key] = np.array(latent)
      self.bytes += latent.nbytes

  def __len__(self) -> int:
    return len(self._entries)


@dataclasses.dataclass(frozen=True, eq=False)
class LatentKind:
  """Diffusion in a frozen autoencoder's latent space; ``directory`` is where it was
  loaded from (a diffusers AutoencoderKL directory), recorded with exported stages.
  ``cache`` (training) memoises the latents of images seen before (``LatentCache``); it
  is used when the batch is fully addressable from this process (single-host), else every
  batch is encoded."""

  autoencoder: ae.PretrainedAutoencoder
  directory: str
  name: str = "latent"
  cache: LatentCache | None = None
  # Scaled latents are about unit variance, not bounded: thresholding x0 to [-1, 1]
  # would clip them.
  default_threshold: str = "none"

  def __post_init__(self):
    model = self.autoencoder.model
    encode = lambda params, images: ae.encode_fn(model, params)(images)
    decode = lambda params, latents: jnp.clip(ae.decode_fn(model, params)(latents), -1, 1)
    object.__setattr__(self, "_encode_fn", encode)
    object.__setattr__(self, "_encoders", {})  # one jitted encoder per batch sharding
    object.__setattr__(self, "_decode", jax.jit(decode))

  @property
  def downsample_factor(self) -> int:
    return self.autoencoder.config.downsample_factor

  @property
  def latent_channels(self) -> int:
    return self.autoencoder.config.latent_channels

  def encode_batch(self, batch: dict) -> dict:
    images = batch["image"]
    # Same sharding in as out: the train step's in_shardings expect the batch split.
    out_sharding = getattr(images, "sharding", None)
    if out_sharding not in self._encoders:
      self._encoders[out_sharding] = jax.jit(self._encode_fn, out_shardings=out_sharding)
    cache = self.cache
    if cache is None or not getattr(images, "is_fully_addressable", True):
      return dict(batch, image=self._encoders[out_sharding](self.autoencoder.params, images))
    keys, latents = cache.lookup(np.asarray(images))
    if latents is not None:
      put = (jax.device_put(latents, out_sharding) if out_sharding is not None
             else jnp.asarray(latents))
      return dict(batch, image=put)
    latents = self._encoders[out_sharding](self.autoencoder.params, images)
    cache.store(keys, np.asarray(latents))
    return dict(batch, image=latents)

  def sample_shape(self, size, channels: int) -> tuple[int, int, int]:
    del channels  # the latent's, whatever the U-Net's config says
    f = self.downsample_factor
    height, width = _height_width(size)
    if height % f or width % f:
      raise ValueError(f"a latent stage with a downsampling factor of {f} cannot output "
                       f"{height}x{width} px: use multiples of {f}.")
    return (height // f, width // f, self.latent_channels)

  def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
    return self._decode(self.autoencoder.params, latents)

  def to_json(self) -> dict:
    return {"name": self.name, "autoencoder": self.directory}


def from_json(d: dict | None, load_autoencoder=ae.load_diffusers) -> Any:
  """The kind ``to_json`` described (None: pixel); a latent kind loads its autoencoder."""
  if not d or d.get("name") == "pixel":
    return PIXEL
  if d.get("name") == "latent":
    return LatentKind(load_autoencoder(d["autoencoder"]), d["autoencoder"])
  raise ValueError(f"unknown stage kind {d.get('name')!r} (pixel or latent)")
