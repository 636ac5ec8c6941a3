"""Classifier-free guidance on two conditions, for InstructPix2Pix (Brooks et al. 2023,
"InstructPix2Pix: Learning to Follow Image Editing Instructions", eq. 3):

  e~ = e(∅, ∅) + s_I (e(I, ∅) - e(∅, ∅)) + s_T (e(I, T) - e(I, ∅))

with I the input image and T the instruction. With s_I = 1 it is ordinary classifier-free
guidance of (I, T) against (I, ∅). Like ``guidance.classifier_free``, the result is a
``model_fn`` whose three terms come from one batched network call (3B rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.schedules import broadcast_to_image


def dual_classifier_free(cond_model_fn, cond, image_only_cond, null_cond,
                         text_scale: float, image_scale: float):
  """InstructPix2Pix's dual guidance.

  Args:
    cond_model_fn: network ``(x_t, logsnr, cond) -> prediction``.
    cond: the (image, text) condition pytree, leaves [B, ...].
    image_only_cond: (image, null text); null_cond: (null image, null text). Same tree
      structure as ``cond``; each leaf broadcasts to the matching leaf of ``cond``.
    text_scale, image_scale: s_T and s_I (Brooks et al. use s_T 7.5, s_I 1.5).
  Returns:
    model_fn(x_t [B, ...], logsnr [B]) -> guided prediction [B, ...].
  """
  def broadcast(c, other):
    return jnp.broadcast_to(jnp.asarray(other, c.dtype), c.shape)

  image_only_cond = jax.tree.map(broadcast, cond, image_only_cond)
  null_cond = jax.tree.map(broadcast, cond, null_cond)
  all_three = jax.tree.map(lambda a, b, c: jnp.concatenate([a, b, c], axis=0), cond,
                           image_only_cond, null_cond)

  def model_fn(x_t, logsnr):
    batch = x_t.shape[0]
    logsnr = jnp.broadcast_to(logsnr, (batch,))
    pred = cond_model_fn(jnp.concatenate([x_t] * 3, 0), jnp.concatenate([logsnr] * 3),
                         all_three)
    full, image_only, null = pred[:batch], pred[batch:2 * batch], pred[2 * batch:]
    s_t = broadcast_to_image(jnp.asarray(text_scale, full.dtype), full)
    s_i = broadcast_to_image(jnp.asarray(image_scale, full.dtype), full)
    return null + s_i * (image_only - null) + s_t * (full - image_only)

  return model_fn


IMAGE_KEY = "input_image"


def image_conditioned(cond_model_fn):
  """An image-conditioned network from a U-Net built with ``in_channels`` = image + input
  channels: ``(x_t [B, H, W, C], logsnr, cond)`` -> ``cond_model_fn(concat([x_t,
  cond["input_image"] [B, H, W, C']], -1), logsnr, rest of cond)`` (InstructPix2Pix's and
  SD inpainting's extra input channels; the null image is zeros, as in Brooks et al.).
  The U-Net's stem convolution takes whatever channel count it was initialised with, so
  the U-Net itself is unchanged."""
  def wrapped(x_t, logsnr, cond):
    rest = {k: v for k, v in cond.items() if k != IMAGE_KEY}
    image = cond[IMAGE_KEY].astype(x_t.dtype)
    if image.shape[:3] != x_t.shape[:3]:
      raise ValueError(f"input_image {image.shape} must match x_t {x_t.shape} in batch, "
                       "height and width.")
    return cond_model_fn(jnp.concatenate([x_t, image], axis=-1), logsnr, rest)

  return wrapped


def instruct_conditions(input_image, text_cond: dict, null_text: dict, null_image=None,
                        image_key: str = "cond_image"):
  """(cond, image_only_cond, null_cond) for ``dual_classifier_free`` from an input image
  [B, H, W, C] in [-1, 1], the instruction's text condition ({"text_emb": [B, L, D],
  "text_mask": [B, L]}) and the empty prompt's ({"text_emb": [L, D], "text_mask": [L]}).
  The null image is zeros unless given (the U-Net's dropped ``cond_image``, as the train
  step drops it: ``conditioning.InputImage``); ``image_key`` is the U-Net keyword
  ``cascade.stage_model_fn`` passes it as."""
  image = jnp.asarray(input_image)
  null_image = jnp.zeros((), image.dtype) if null_image is None else null_image
  cond = dict(text_cond, **{image_key: image})
  return cond, dict(null_text, **{image_key: image}), dict(null_text, **{image_key: null_image})
