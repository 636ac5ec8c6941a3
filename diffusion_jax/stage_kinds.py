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
arguments of those jitted functions, not constants baked into the programs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

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


@dataclasses.dataclass(frozen=True, eq=False)
class LatentKind:
  """Diffusion in a frozen autoencoder's latent space; ``directory`` is where it was
  loaded from (a diffusers AutoencoderKL directory), recorded with exported stages."""

  autoencoder: ae.PretrainedAutoencoder
  directory: str
  name: str = "latent"
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
    latents = self._encoders[out_sharding](self.autoencoder.params, images)
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
