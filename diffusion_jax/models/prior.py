"""DALL-E 2's diffusion prior (Ramesh et al. 2022, "Hierarchical Text-Conditional Image
Generation with CLIP Latents", sec. 2.1): caption -> CLIP image embedding.

A decoder-only transformer over the sequence
  [caption token embeddings (L, projected), CLIP text embedding, noise-level embedding,
   noised image embedding z_t, a learned query token]
under a causal mask; the query token's output is the prediction. DALL-E 2 predicts the
clean embedding directly (x0-prediction) with an MSE loss, and trains with the caption
dropped 10% of the time for classifier-free guidance. Here it is a ``model_fn`` like the
U-Net's: ``(z_t [B, E], logsnr [B], cond) -> x0_hat [B, E]`` with cond = {"text_tokens"
[B, L, D], "text_mask" [B, L], "text_emb" [B, E]}, so the project's losses, samplers and
``guidance.classifier_free`` apply to vectors unchanged.

Embeddings are unit-norm, so each of their E coordinates has scale ~1/sqrt(E); the prior
works on ``sqrt(E) * embedding`` (unit variance per coordinate, as the diffusion schedules
assume) and ``to_embedding`` divides back and renormalises.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import losses, schedules
from diffusion_jax.models import clip as clip_lib
from diffusion_jax.models import layers
from diffusion_jax.models.t5 import MASK_BIAS


@dataclasses.dataclass(frozen=True)
class PriorConfig:
  embed_dim: int = 64          # E, the CLIP embedding width
  text_width: int = 64         # D, width of the caption token embeddings
  hidden_size: int = 128
  num_hidden_layers: int = 4
  num_attention_heads: int = 4
  intermediate_size: int = 256
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  initializer_range: float = 0.02

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


class DiffusionPrior(nn.Module):
  """(z_t [B, E], logsnr [B], text_tokens [B, L, D], text_mask [B, L], text_emb [B, E])
  -> x0 estimate [B, E] (in the scaled space, see module docstring)."""
  config: PriorConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_t, logsnr, text_tokens, text_mask, text_emb):
    cfg = self.config
    d = cfg.hidden_size
    b, length = text_mask.shape

    def proj(name):
      return layers.dense(d, "embed", "mlp", self.dtype, name=name)

    noise = layers.NoiseLevelEmbedding(64, d, self.dtype, name="noise_embedding")(
        jnp.broadcast_to(logsnr, (b,)))
    query = self.param("query", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.initializer_range), ("embed",)), (d,))
    x = jnp.concatenate([proj("text_tokens")(text_tokens),
                         proj("text_emb")(text_emb)[:, None], noise[:, None],
                         proj("z_t")(z_t)[:, None],
                         jnp.broadcast_to(query, (b, 1, d))], axis=1)
    positions = self.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ("positions", "embed")), (length + 4, d))
    x = x + positions[None]
    total = length + 4
    valid = jnp.concatenate([text_mask, jnp.ones((b, 4), bool)], axis=1)
    allowed = jnp.tril(jnp.ones((total, total), bool))[None, None] & valid[:, None, None, :]
    mask_bias = jnp.where(allowed, 0.0, MASK_BIAS).astype(jnp.float32)
    for i in range(cfg.num_hidden_layers):
      x = clip_lib.EncoderLayer(cfg, self.dtype, name=f"layer_{i}")(x, mask_bias)
    out = clip_lib.LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_norm")(x[:, -1])
    return layers.dense(cfg.embed_dim, "mlp", "embed", self.dtype, name="out")(out)


def model_fn(prior: DiffusionPrior, params: Any):
  """The prior as a conditional model function ``(z_t, logsnr, cond) -> x0_hat``."""
  def cond_model_fn(z_t, logsnr, cond):
    return prior.apply({"params": params}, z_t, logsnr, cond["text_tokens"],
                       cond["text_mask"], cond["text_emb"])
  return cond_model_fn


def null_condition(config: PriorConfig, length: int) -> dict:
  """The dropped caption: no valid token, zero text embedding."""
  return {"text_tokens": jnp.zeros((length, config.text_width)),
          "text_mask": jnp.zeros((length,), bool), "text_emb": jnp.zeros((config.embed_dim,))}


def to_prior_space(embedding: jnp.ndarray) -> jnp.ndarray:
  """Unit-norm CLIP embeddings [B, E] -> sqrt(E) * embedding (unit variance per coord)."""
  return embedding * jnp.sqrt(embedding.shape[-1])


def to_embedding(z: jnp.ndarray) -> jnp.ndarray:
  """Prior samples [B, E] -> unit-norm CLIP image embeddings."""
  return clip_lib.normalize(z)


def loss(prior: DiffusionPrior, params: Any, key: jax.Array, image_emb: jnp.ndarray,
         cond: dict, schedule, cond_drop_prob: float = 0.1) -> jnp.ndarray:
  """DALL-E 2's prior loss: MSE of the x0 prediction of sqrt(E) * image_emb [B, E] at
  t ~ U[0, 1], the caption dropped with ``cond_drop_prob`` (classifier-free guidance)."""
  t_key, eps_key, drop_key = jax.random.split(key, 3)
  x0 = to_prior_space(image_emb)
  logsnr = schedule.logsnr(jax.random.uniform(t_key, x0.shape[:1]))
  eps = jax.random.normal(eps_key, x0.shape)
  length = cond["text_mask"].shape[1]
  cond, _ = losses.drop_condition(drop_key, cond, null_condition(prior.config, length),
                                  cond_drop_prob)
  prediction = model_fn(prior, params)(schedules.q_sample(x0, eps, logsnr), logsnr, cond)
  per_example, _ = losses.diffusion_loss(prediction, x0, eps, logsnr, "x0")
  return jnp.mean(per_example)
