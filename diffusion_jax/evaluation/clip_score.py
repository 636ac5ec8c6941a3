"""CLIP score and CLIP zero-shot classification.

* ``clip_score``: the usual text-image alignment metric (Hessel et al. 2021, "CLIPScore";
  Saharia et al. 2022 report it for Imagen): 100 x the cosine between each image's and its
  prompt's CLIP embeddings, clipped at 0, averaged over the pairs (torchmetrics'
  definition). Works with the CLIP trained here (``configs/clip_shapes.py``) or any HF
  ``CLIPModel`` directory (``models.clip.load``).
* ``zero_shot_predictions``: CLIP's zero-shot classifier (Radford et al. 2021, sec. 3.1.2):
  each image gets the candidate caption of highest cosine.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import clip as clip_lib


@jax.jit
def _cosines(image_emb, text_emb):
  return image_emb @ text_emb.T


def image_embeddings(clip: clip_lib.CLIP, images: np.ndarray, params=None,
                     batch_size: int = 256) -> np.ndarray:
  """Unit-norm embeddings [N, E] of clean images [N, H, W, C] in [-1, 1], in batches."""
  params = clip.params if params is None else params
  fn = _image_fn(clip.module, clip.image_mean, clip.image_std)
  chunks = [np.asarray(fn(params, jnp.asarray(images[i:i + batch_size])))
            for i in range(0, len(images), batch_size)]
  return np.concatenate(chunks) if chunks else np.zeros((0, clip.config.projection_dim))


_IMAGE_FNS = {}  # one jitted embedding function per (architecture, input statistics)


def _image_fn(module, mean, std):
  key = (module, mean, std)
  if key not in _IMAGE_FNS:
    view = clip_lib.CLIP(module, None, None, mean, std)
    _IMAGE_FNS[key] = jax.jit(lambda params, images: view.image_embeddings(params, images))
  return _IMAGE_FNS[key]


def clip_scores(clip: clip_lib.CLIP, images: np.ndarray, prompts: Sequence[str],
                params=None) -> np.ndarray:
  """Per pair max(100 cos(image_i, prompt_i), 0) [N]; images [N, H, W, C] in [-1, 1], N
  prompts."""
  if len(images) != len(prompts):
    raise ValueError(f"clip_score needs one prompt per image, got {len(images)} images and "
                     f"{len(prompts)} prompts.")
  image_emb = image_embeddings(clip, images, params)
  text_emb = np.asarray(clip.encode_prompts(list(prompts)) if params is None else
                        _text(clip, params, prompts))
  return np.maximum(100.0 * np.sum(image_emb * text_emb, axis=1), 0.0)


def clip_score(clip: clip_lib.CLIP, images: np.ndarray, prompts: Sequence[str],
               params=None) -> float:
  """The CLIP score: the mean of ``clip_scores`` over the pairs."""
  return float(np.mean(clip_scores(clip, images, prompts, params)))


def _text(clip, params, prompts):
  tokens, mask = clip.tokenize(list(prompts))
  return clip_lib._text_jit(clip.module, params, tokens, mask)


def zero_shot_predictions(clip: clip_lib.CLIP, images: np.ndarray,
                          candidates: Sequence[str], params=None) -> np.ndarray:
  """Index [N] into ``candidates`` of each image's most similar caption."""
  image_emb = image_embeddings(clip, images, params)
  params = clip.params if params is None else params
  text_emb = _text(clip, params, candidates)
  return np.asarray(jnp.argmax(_cosines(jnp.asarray(image_emb), text_emb), axis=1))
