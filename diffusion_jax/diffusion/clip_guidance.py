"""CLIP guidance (GLIDE, Nichol et al. 2022, sec. 2.4): steer sampling with the gradient of a
noise-aware CLIP's image-caption similarity.

GLIDE perturbs the reverse-process mean by s * Sigma * grad_x (f(x_t, t) . g(c)), with f the
image encoder of a CLIP trained on noised images and g its text encoder; in eps form that
is ``guidance.classifier`` with log p(c | x_t) replaced by the similarity
f(x_t, logsnr) . g(c) of unit-norm embeddings (cosine). So CLIP guidance is a wrapper of
``model_fn`` like every other guidance here: it composes with classifier-free guidance (wrap
the CFG model_fn), thresholding and every sampler.

``image_embed_fn(x_t [B, H, W, C], logsnr [B]) -> [B, E]`` unit-norm embeddings; for a
``models.clip.CLIP`` use ``clip_image_embed_fn``. A CLIP that is not noise-aware can be
used too (it is then given x_t as if clean), but GLIDE found that poor: train one with
``configs/clip_shapes.py:noisy``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from diffusion_jax.diffusion import guidance

ImageEmbedFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def clip_image_embed_fn(clip, params=None) -> ImageEmbedFn:
  """(x_t, logsnr) -> unit-norm image embeddings [B, E] of a ``models.clip.CLIP`` (its
  image tower sees the log-SNR only if it is noise-aware)."""
  params = clip.params if params is None else params

  def embed(x_t, logsnr):
    return clip.image_embeddings(params, x_t, logsnr if clip.noise_aware else None)

  return embed


def similarity_fn(image_embed_fn: ImageEmbedFn, text_emb: jnp.ndarray):
  """(x_t [B, ...], logsnr [B]) -> cosine [B] of each image with its prompt's unit-norm
  embedding ``text_emb`` [B, E] (or [E] for one prompt)."""
  def similarity(x_t, logsnr):
    image_emb = image_embed_fn(x_t, logsnr)
    return jnp.sum(image_emb * jnp.broadcast_to(text_emb, image_emb.shape), axis=-1)
  return similarity


def clip_guided(model_fn, image_embed_fn: ImageEmbedFn, text_emb: jnp.ndarray, scale: float,
                parameterization: str):
  """Wraps ``model_fn(x_t, logsnr)`` with CLIP guidance of weight ``scale``:
  eps <- eps - scale * sigma * grad_x cos(f(x_t, logsnr), text_emb). ``scale`` 0 returns
  ``model_fn`` itself."""
  if scale == 0:
    return model_fn
  return guidance.classifier(model_fn, similarity_fn(image_embed_fn, text_emb), scale,
                             parameterization)


class ClipGuide:
  """CLIP guidance of weight ``scale`` with a ``models.clip.CLIP``, for ``cascade.Cascade``
  (which applies it to the base stage): ``encode(prompts)`` -> unit text embeddings
  [B, E] on the host, ``wrapper(text_emb, parameterization)`` -> a model_fn wrapper."""

  def __init__(self, clip, scale: float):
    if scale < 0:
      raise ValueError(f"CLIP guidance scale must be >= 0, got {scale}.")
    self.clip, self.scale = clip, float(scale)

  def encode(self, prompts) -> jnp.ndarray:
    return self.clip.encode_prompts(list(prompts))

  def wrapper(self, text_emb: jnp.ndarray, parameterization: str):
    embed = clip_image_embed_fn(self.clip)
    return lambda model_fn: clip_guided(model_fn, embed, text_emb, self.scale,
                                        parameterization)
