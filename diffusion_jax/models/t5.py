"""T5 encoder in Flax (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer"), as Imagen's frozen text encoder (Saharia et al. 2022).

Both variants:
  * T5 v1.0: ReLU feed-forward ``wo(relu(wi x))``;
  * T5 v1.1 / flan-T5 / mT5: gated-GELU feed-forward ``wo(gelu(wi_0 x) * wi_1 x)`` (Shazeer
    2020, "GLU Variants Improve Transformer"; GELU in its tanh form, HF's "gelu_new").
Pre-norm blocks with RMS layer norm (scale only, no mean, no bias), attention without the
1/sqrt(d) logit scale (T5 folds it into the initialisation of q), one bucketed relative
position bias computed once and shared by every layer, and a final RMS norm.

Parameters carry logical axis names for ``diffusion_jax.sharding``:
  ``vocab``, ``embed``          token embedding [V, D]; ``embed`` is the model-width side
  ``heads``, ``kv``             attention kernels [D, H, K] and [H, K, D]
  ``mlp``                       feed-forward kernels [D, F] and [F, D]
  ``relpos_buckets``            relative position bias table [buckets, H]
  ``norm``                      RMS norm scales [D] (never sharded, as in models/layers.py)
Parameters are float32; ``dtype`` sets the compute dtype (norms and softmax stay float32).

``FAMILY`` maps HF PyTorch checkpoints (``T5EncoderModel``, ``T5ForConditionalGeneration``,
``MT5*``; only the encoder is read) onto this module, see ``param_sources``. HF keeps the
relative position table in block 0 (``encoder.block.0.layer.0.SelfAttention.
relative_attention_bias``); here it is a top-level parameter, which is the same computation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax.models.hf_checkpoint import EncoderFamily, Source

Dtype = Any

TOKEN_AXES = ("batch", "length", "embed")
# Additive logit bias on padded keys. Finite, so that a row with no valid key (padding rows
# added to fill a batch) gives uniform weights instead of NaN.
MASK_BIAS = -1e9

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5 encoder; field names follow HF's T5Config (config.json)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # "relu" (v1.0) or "gated-gelu" (v1.1, flan); "gated-<act>" / "<act>" in general.
  feed_forward_proj: str = "relu"

  def __post_init__(self):
    act = self.activation_name
    if act not in _ACTIVATIONS or self.feed_forward_proj.count("-") > 1 or (
        "-" in self.feed_forward_proj and not self.is_gated):
      raise ValueError(f"Unsupported T5 feed_forward_proj {self.feed_forward_proj!r}; use "
                       f"'<act>' or 'gated-<act>' with act in {sorted(_ACTIVATIONS)}.")

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation_name(self) -> str:
    act = self.feed_forward_proj.split("-")[-1]
    # HF's "gated-gelu" means the tanh approximation (its "gelu_new"), as in mesh TF.
    return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> T5Config:
    """From a config.json dict (unknown keys, e.g. decoder settings, are ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})


# T5 v1.1 encoder shapes (google/t5-v1_1-*; flan-t5-* have the same), for benchmarks and
# jax.eval_shape checks at paper scale. Imagen uses T5-XXL (~4.6B encoder parameters).
PRESETS = {
    name: T5Config(d_model=d, d_ff=f, num_layers=n, num_heads=h, feed_forward_proj="gated-gelu")
    for name, d, f, n, h in [("t5-v1_1-small", 512, 1024, 8, 6),
                             ("t5-v1_1-base", 768, 2048, 12, 12),
                             ("t5-v1_1-large", 1024, 2816, 24, 16),
                             ("t5-v1_1-xl", 2048, 5120, 24, 32),
                             ("t5-v1_1-xxl", 4096, 10240, 24, 64)]
}


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int, bidirectional: bool = True) -> np.ndarray:
  """Bucket index [Lq, Lk] (int32) of every relative position ``key - query``.

  Half the buckets (per direction, when bidirectional) hold exact offsets below
  ``num_buckets / 4``; the rest grow logarithmically up to ``max_distance``, beyond which
  all offsets share the last bucket (Raffel et al. 2020, sec. 2.1). The log is evaluated
  in float32, exactly as mesh TF and HF do, so boundary offsets land in the same bucket.
  """
  rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  scaled = (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


# Initial std of each weight, by its module name: HF's T5 initialisation (mesh TF's), under
# which a random T5 is well scaled without the 1/sqrt(d) attention logit factor. RMS norm
# scales start at one. Shared by the Flax initialisers and ``init_params_numpy``.
INIT_STDDEV = {
    "shared": lambda c: 1.0,
    "relative_position_bias": lambda c: c.d_model ** -0.5,
    "query": lambda c: (c.d_model * c.d_kv) ** -0.5,
    "key": lambda c: c.d_model ** -0.5,
    "value": lambda c: c.d_model ** -0.5,
    "out": lambda c: (c.num_heads * c.d_kv) ** -0.5,
    "wi": lambda c: c.d_model ** -0.5,
    "wi_0": lambda c: c.d_model ** -0.5,
    "wi_1": lambda c: c.d_model ** -0.5,
    "wo": lambda c: c.d_ff ** -0.5,
}


def _normal(stddev: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def init_params_numpy(config: T5Config, abstract_params: Any, seed: int) -> dict[str, np.ndarray]:
  """The initialisation of ``T5Encoder.init``'s distribution, drawn on the host with numpy.

  Returns {"/"-joined param path: float32 array}. Deterministic in ``seed``, independent of
  the device layout, and free of XLA compiles (jitting the ~30 random draws of
  ``module.init`` costs seconds of CPU compile time for a model that takes milliseconds).
  """
  rng = np.random.default_rng(seed)
  arrays = {}
  for path, leaf in sorted(traverse_util.flatten_dict(abstract_params).items()):
    if path[-1] == "scale":
      arrays["/".join(path)] = np.ones(leaf.shape, np.float32)
      continue
    owner = path[-2] if path[-1] in ("kernel", "embedding") else path[-1]
    std = INIT_STDDEV[owner](config)
    arrays["/".join(path)] = rng.standard_normal(leaf.shape, np.float32) * np.float32(std)
  return arrays


class RMSNorm(nn.Module):
  """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale, in float32 (Zhang & Sennrich 2019)."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale).astype(self.dtype)


class Projection(nn.Module):
  """Linear map of the last dims: x [..., *in] -> [..., *features], bias optional.

  The kernel [*in, *features] is created at its final rank with its logical names. (Flax's
  DenseGeneral initialises a flattened 2-D kernel and then reshapes it, which breaks a
  3-name logical sharding constraint inside a mesh context.) T5 has no biases; BERT's
  bias [*features] takes the output names.
  """
  features: tuple[int, ...]
  names: tuple[str, ...]
  stddev: float
  dtype: Dtype = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n_in = len(self.names) - len(self.features)
    shape = x.shape[x.ndim - n_in:] + tuple(self.features)
    kernel = self.param("kernel", _normal(self.stddev, self.names), shape, jnp.float32)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
    if not self.use_bias:
      return y
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), self.names[n_in:]), tuple(self.features), jnp.float32)
    return y + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention without logit scaling; [B, L, D] -> [B, L, D]."""
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray, mask_bias: jnp.ndarray) -> jnp.ndarray:
    """bias: relative position bias [1, H, L, L]; mask_bias: padding bias [B, 1, 1, L]."""
    cfg = self.config
    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv

    def proj(name):
      return Projection((h, k), ("embed", "heads", "kv"), INIT_STDDEV[name](cfg), self.dtype,
                        name=name)(x)

    q, key, value = proj("query"), proj("key"), proj("value")
    logits = jnp.einsum("bqhk,bthk->bhqt", q, key).astype(jnp.float32)
    weights = jax.nn.softmax(logits + bias + mask_bias, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqt,bthk->bqhk", weights, value)
    return Projection((d,), ("heads", "kv", "embed"), INIT_STDDEV["out"](cfg), self.dtype,
                      name="out")(out)


class FeedForward(nn.Module):
  """ReLU (v1.0) or gated (v1.1) feed-forward; [B, L, D] -> [B, L, D]."""
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config

    def dense(name, features, names):
      return Projection((features,), names, INIT_STDDEV[name](cfg), self.dtype, name=name)

    act = _ACTIVATIONS[cfg.activation_name]
    d_in = ("embed", "mlp")
    if cfg.is_gated:
      hidden = act(dense("wi_0", cfg.d_ff, d_in)(x)) * dense("wi_1", cfg.d_ff, d_in)(x)
    else:
      hidden = act(dense("wi", cfg.d_ff, d_in)(x))
    return dense("wo", cfg.d_model, ("mlp", "embed"))(hidden)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray, mask_bias: jnp.ndarray) -> jnp.ndarray:
    eps = self.config.layer_norm_epsilon
    h = RMSNorm(eps, self.dtype, name="attention_norm")(x)
    x = x + Attention(self.config, self.dtype, name="attention")(h, bias, mask_bias)
    h = RMSNorm(eps, self.dtype, name="mlp_norm")(x)
    x = x + FeedForward(self.config, self.dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, TOKEN_AXES)


class T5Encoder(nn.Module):
  """T5 encoder stack: tokens [B, L] int32, mask [B, L] bool -> hidden states [B, L, D].

  Outputs at padded positions are computed like any other (they attend to the valid
  tokens), as in HF; mask them downstream. No dropout: the encoder is used frozen, or
  trained jointly without it.
  """
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    length = tokens.shape[1]
    x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, name="shared",
                 embedding_init=_normal(INIT_STDDEV["shared"](cfg), ("vocab", "embed")))(tokens)
    x = nn.with_logical_constraint(x, TOKEN_AXES)
    # One bias for all layers (computed "in the first layer" in HF, then passed on).
    table = self.param("relative_position_bias",
                       _normal(INIT_STDDEV["relative_position_bias"](cfg),
                               ("relpos_buckets", "heads")),
                       (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
    buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # [1, H, L, L]
    mask_bias = jnp.where(mask[:, None, None, :], 0.0, MASK_BIAS).astype(jnp.float32)
    for i in range(cfg.num_layers):
      x = Block(cfg, self.dtype, name=f"block_{i}")(x, bias, mask_bias)
    return RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="final_norm")(x)


def param_sources(config: T5Config) -> dict[tuple[str, ...], Source]:
  """Our flattened param paths -> HF PyTorch tensor names and layout changes.

  PyTorch ``nn.Linear`` stores weight [out, in]; ours are kernels [in, ...out]. The
  attention projections are split into heads: q/k/v [H*K, D] -> [D, H, K], o [D, H*K] ->
  [H, K, D] (HF orders the fused dimension head-major). Only views: no data is copied
  until a device's shard is read.
  """
  h, k, d = config.num_heads, config.d_kv, config.d_model
  qkv = lambda w: w.T.reshape(d, h, k)
  out = lambda w: w.T.reshape(h, k, d)
  linear = lambda w: w.T
  block0 = "encoder.block.0.layer.0.SelfAttention"
  sources = {
      # T5ForConditionalGeneration ties encoder.embed_tokens to shared; either may be saved.
      ("shared", "embedding"): Source(("shared.weight", "encoder.embed_tokens.weight")),
      ("relative_position_bias",): Source((f"{block0}.relative_attention_bias.weight",)),
      ("final_norm", "scale"): Source(("encoder.final_layer_norm.weight",)),
  }
  ffn = ["wi_0", "wi_1"] if config.is_gated else ["wi"]
  for i in range(config.num_layers):
    hf, ours = f"encoder.block.{i}.layer", f"block_{i}"
    attn = f"{hf}.0.SelfAttention"
    sources[(ours, "attention_norm", "scale")] = Source((f"{hf}.0.layer_norm.weight",))
    for name, ours_name in [("q", "query"), ("k", "key"), ("v", "value")]:
      sources[(ours, "attention", ours_name, "kernel")] = Source((f"{attn}.{name}.weight",), qkv)
    sources[(ours, "attention", "out", "kernel")] = Source((f"{attn}.o.weight",), out)
    sources[(ours, "mlp_norm", "scale")] = Source((f"{hf}.1.layer_norm.weight",))
    for name in ffn + ["wo"]:
      sources[(ours, "mlp", name, "kernel")] = Source(
          (f"{hf}.1.DenseReluDense.{name}.weight",), linear)
  return sources


FAMILY = EncoderFamily(
    name="t5",
    config_from_hf=T5Config.from_hf,
    make_module=lambda config, dtype: T5Encoder(config, dtype),
    param_sources=param_sources,
    width=lambda config: config.d_model,
)
