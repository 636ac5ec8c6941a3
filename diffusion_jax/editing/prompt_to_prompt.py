"""Prompt-to-Prompt (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross
Attention Control"): edit a prompt's word while keeping the image's layout, by giving the
target prompt's cross-attention the source prompt's attention maps.

Source and target are sampled jointly, one batch of 2B rows [sources; targets] with the
same noise per pair (``paired_keys``), so at every step and every cross-attention layer
the target row takes the source row's probabilities of that very step. The control rides
in the condition pytree under ``CONTROL_KEY`` (so ``guidance.classifier_free`` concatenates
it with the null rows' control like any other leaf), and ``controlled`` turns it into the
``attention_edit`` of every ``layers.CrossAttention`` via ``flax.linen.intercept_methods``:
the U-Net and the samplers are unchanged. Per row, the control holds

  * ``offset`` [B] int32: the row takes its maps from row ``r - offset`` (0 = its own);
  * ``token_map`` [B, K, K]: target key j gets sum_i token_map[j, i] * source map i, with
    K = 1 + text length (key 0 is the null token) -- the word-swap alignment;
  * ``reweight`` [B, K]: scale of each target key's map (P2P's attention re-weighting);
  * ``replace_until`` [B]: maps are replaced (and re-weighted) while the noise level's
    logsnr <= this, i.e. for the noisy early steps (P2P's cross_replace_steps); later
    steps use the target's own maps.

Not implemented: self-attention map injection, local blending and refinement (added
words) of the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import guidance, samplers
from diffusion_jax.models import layers

CONTROL_KEY = "attention_control"


def apply_control(probs: jnp.ndarray, control: dict, logsnr: jnp.ndarray) -> jnp.ndarray:
  """Edited attention probabilities [B, N, Q, K] (see the module docstring)."""
  batch = probs.shape[0]
  offset = control["offset"].astype(jnp.int32)
  source = probs[jnp.arange(batch) - offset]
  mapped = jnp.einsum("bnqi,bji->bnqj", source, control["token_map"].astype(probs.dtype))
  mapped = mapped * control["reweight"].astype(probs.dtype)[:, None, None, :]
  replace = (offset != 0) & (jnp.broadcast_to(logsnr, (batch,)) <= control["replace_until"])
  return jnp.where(replace[:, None, None, None], mapped, probs)


def controlled(cond_model_fn):
  """Wraps a network ``(x_t, logsnr, cond) -> prediction`` built from Flax modules so that
  ``cond[CONTROL_KEY]``, when present, edits every CrossAttention's probabilities."""
  def wrapped(x_t, logsnr, cond):
    if CONTROL_KEY not in cond:
      return cond_model_fn(x_t, logsnr, cond)
    control = cond[CONTROL_KEY]
    inner = {k: v for k, v in cond.items() if k != CONTROL_KEY}

    def edit(probs):
      return apply_control(probs, control, logsnr)

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, layers.CrossAttention) and context.method_name == (
          "__call__"):
        kwargs = dict(kwargs, attention_edit=edit)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return cond_model_fn(x_t, logsnr, inner)

  return wrapped


def identity_control(batch: int, num_keys: int) -> dict:
  """A control that changes nothing (each row its own maps), leaves [B, ...]."""
  return {"offset": np.zeros((batch,), np.int32),
          "token_map": np.broadcast_to(np.eye(num_keys, dtype=np.float32),
                                       (batch, num_keys, num_keys)).copy(),
          "reweight": np.ones((batch, num_keys), np.float32),
          "replace_until": np.full((batch,), -np.inf, np.float32)}


def _word_spans(tokenizer, prompt: str) -> tuple[list[tuple[int, int]], int, int]:
  """Token spans [start, end) of each whitespace word of ``prompt`` in its tokenization
  with special tokens, plus (number of leading specials, total length)."""
  full = tokenizer(prompt)["input_ids"]
  plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  lead = next((i for i in range(len(full) - len(plain) + 1)
               if full[i:i + len(plain)] == plain), None)
  if lead is None:
    raise ValueError(f"cannot align the tokens of {prompt!r}: its tokenization without "
                     "special tokens is not part of the one with them.")
  words, spans, start = prompt.split(), [], lead
  for k in range(len(words)):
    end = lead + len(tokenizer(" ".join(words[:k + 1]), add_special_tokens=False)[
        "input_ids"])
    spans.append((start, end))
    start = end
  return spans, lead, len(full)


def word_swap_map(tokenizer, source: str, target: str, max_length: int) -> np.ndarray:
  """token_map [K, K] (K = 1 + max_length) aligning ``target``'s keys with ``source``'s
  word by word: equal-length words token by token, a word of other length spreads each
  source token's mass evenly over the target word's tokens (columns sum to 1, so a row's
  total attention is kept); special tokens map to their counterparts, key 0 (null) to
  itself. The prompts must have the same number of words."""
  src_words, tgt_words = source.split(), target.split()
  if len(src_words) != len(tgt_words):
    raise ValueError(f"a word swap needs prompts with the same number of words: {source!r} "
                     f"has {len(src_words)}, {target!r} has {len(tgt_words)}.")
  (src_spans, src_lead, src_len), (tgt_spans, tgt_lead, tgt_len) = (
      _word_spans(tokenizer, source), _word_spans(tokenizer, target))
  pairs = list(zip(src_spans, tgt_spans, strict=True))
  pairs.append(((0, src_lead), (0, tgt_lead)))
  pairs.append(((src_spans[-1][1] if src_spans else src_lead, src_len),
                (tgt_spans[-1][1] if tgt_spans else tgt_lead, tgt_len)))
  size = 1 + max_length
  token_map = np.zeros((size, size), np.float32)
  token_map[0, 0] = 1.0
  for (s0, s1), (t0, t1) in pairs:
    src, tgt = np.arange(s0, s1), np.arange(t0, t1)
    if len(src) == len(tgt):
      for i, j in zip(src, tgt, strict=True):
        if i < max_length and j < max_length:
          token_map[1 + j, 1 + i] = 1.0
    elif len(tgt):
      for j in tgt[tgt < max_length]:
        token_map[1 + j, 1 + src[src < max_length]] = 1.0 / len(tgt)
  return token_map


def word_weights(tokenizer, prompt: str, weights: dict[str, float], max_length: int
                 ) -> np.ndarray:
  """reweight [K]: ``weights[word]`` on the keys of each listed word of ``prompt``, else 1."""
  words = prompt.split()
  spans, _, _ = _word_spans(tokenizer, prompt)
  out = np.ones((1 + max_length,), np.float32)
  for word, scale in weights.items():
    if word not in words:
      raise ValueError(f"cannot re-weight {word!r}: it is not a word of {prompt!r}.")
    for k in [k for k, w in enumerate(words) if w == word]:
      start, end = spans[k]
      out[1 + start:1 + min(end, max_length)] = scale
  return out


def pair_controls(tokenizer, sources: Sequence[str], targets: Sequence[str],
                  max_length: int, replace_until: float,
                  reweight: dict[str, float] | None = None) -> dict:
  """The control of a joint batch [sources; targets] (2B rows): sources keep their maps,
  target b takes source b's through its word-swap map, re-weighted by ``reweight``
  (words of the target prompt), while logsnr <= ``replace_until``."""
  if len(sources) != len(targets) or not sources:
    raise ValueError(f"need as many source as target prompts (at least one), got "
                     f"{len(sources)} and {len(targets)}.")
  batch, keys = len(sources), 1 + max_length
  control = identity_control(2 * batch, keys)
  control["offset"][batch:] = batch
  control["replace_until"][batch:] = replace_until
  for b, (source, target) in enumerate(zip(sources, targets, strict=True)):
    control["token_map"][batch + b] = word_swap_map(tokenizer, source, target, max_length)
    if reweight:
      control["reweight"][batch + b] = word_weights(tokenizer, target, reweight, max_length)
  return control


def paired_keys(key: jax.Array, batch: int) -> jax.Array:
  """Per-image keys [2B] for a joint batch: target b shares source b's (fold_in(key, b))."""
  keys = samplers.image_keys(key, batch)
  return jnp.concatenate([keys, keys], axis=0)


def joint_model_fn(cond_model_fn, source_cond: dict, target_cond: dict, null_cond: dict,
                   control: dict, guidance_scale: float = 1.0):
  """model_fn of the joint batch [sources; targets] (x_t [2B, ...]) with attention control.

  ``source_cond`` / ``target_cond``: condition dicts with leaves [B, ...]; ``null_cond``:
  the null condition (leaves broadcast), which gets an identity control.
  """
  cond = jax.tree.map(lambda s, t: jnp.concatenate([jnp.asarray(s), jnp.asarray(t)], 0),
                      source_cond, target_cond)
  cond[CONTROL_KEY] = jax.tree.map(jnp.asarray, control)
  net = controlled(cond_model_fn)
  if guidance_scale == 1.0:
    return lambda x_t, logsnr: net(x_t, logsnr, cond)
  batch, keys = control["offset"].shape[0], control["reweight"].shape[1]
  null = dict(null_cond, **{CONTROL_KEY: jax.tree.map(jnp.asarray,
                                                      identity_control(batch, keys))})
  return guidance.classifier_free(net, cond, null, guidance_scale)
