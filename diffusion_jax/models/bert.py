"""BERT encoder in Flax (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding"), loadable from any HF ``BertModel`` checkpoint.

The embedded default text encoder is MiniLM-L6 (Wang et al. 2020, "MiniLM: Deep
Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers";
sentence-transformers' all-MiniLM-L6-v2: 6 layers, width 384, 12 heads), which is a plain
BERT architecture, so this one module covers it as well as bert-base / bert-large.

Architecture, as HF's ``BertModel`` (no pooler: a diffusion model wants token embeddings):
  * embeddings: word + learned absolute position + token type (all type 0, one segment),
    then LayerNorm;
  * post-LN blocks: ``x = LN(x + attn(x))``, ``x = LN(x + ffn(x))``, with biases on every
    projection, scaled dot-product attention (logits / sqrt(head_dim)) and an exact
    (erf) GELU feed-forward (HF's ``"gelu"``; other ``hidden_act`` values as in t5.py).

Parameters carry the logical axis names of t5.py, for ``diffusion_jax.sharding``:
  ``vocab``, ``embed``   rows of the word / position / token-type tables [rows, D]
  ``heads``, ``kv``      attention kernels [D, H, K], [H, K, D] and q/k/v biases [H, K]
  ``mlp``                feed-forward kernels [D, F], [F, D] and bias [F]
  ``norm``               LayerNorm scales and biases [D] (never sharded)
Parameters are float32; ``dtype`` sets the compute dtype (LayerNorm and softmax stay
float32).

``FAMILY`` maps HF checkpoints onto this module (``param_sources``): ``BertModel`` names
(``embeddings.*``, ``encoder.layer.N.*``) or the same under a ``bert.`` prefix (as saved
by ``BertForMaskedLM`` and other heads), with TF-era ``LayerNorm.gamma/beta`` accepted.
Pooler and head weights are not read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.hf_checkpoint import EncoderFamily, Source
from diffusion_jax.models.t5 import _ACTIVATIONS, MASK_BIAS, TOKEN_AXES, Projection

# _ACTIVATIONS, MASK_BIAS and TOKEN_AXES are shared with T5 on purpose: the same HF
# activation names, the same finite padding bias and the same activation sharding names.

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder; field names follow HF's BertConfig (config.json)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  position_embedding_type: str = "absolute"

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"Unsupported BERT hidden_act {self.hidden_act!r}; supported: "
                       f"{sorted(_ACTIVATIONS)}.")
    if self.position_embedding_type != "absolute":
      # relative_key(_query) adds a distance embedding inside attention; not implemented.
      raise ValueError(f"Unsupported BERT position_embedding_type "
                       f"{self.position_embedding_type!r}; only 'absolute' is implemented.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"BERT hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> BertConfig:
    """From a config.json dict (unknown keys, e.g. dropout rates, are ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.items() if k in fields}
    if values.get("position_embedding_type") is None:  # Old configs may write null.
      values.pop("position_embedding_type", None)
    return cls(**values)


# Shapes of published BERT-family encoders, for benchmarks and jax.eval_shape checks.
PRESETS = {
    "minilm-l6": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536),
    "bert-base": BertConfig(),
    "bert-large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096),
}


def _init(stddev: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def _zeros(names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class LayerNorm(nn.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32.

  Written out (rather than nn.LayerNorm) for the two-pass variance, which matches
  PyTorch's LayerNorm to float32 rounding; BERT's eps of 1e-12 gives no slack.
  """
  epsilon: float = 1e-12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (width,), jnp.float32)
    bias = self.param("bias", _zeros(("norm",)), (width,), jnp.float32)
    x = x.astype(jnp.float32)
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    return (centered * jax.lax.rsqrt(variance + self.epsilon) * scale + bias).astype(self.dtype)


def Linear(features, names, stddev, dtype=jnp.float32, name=None):  # noqa: N802
  """t5.Projection with a bias: an affine map of the last dims."""
  return Projection(features=features, names=names, stddev=stddev, dtype=dtype,
                    use_bias=True, name=name)


class Attention(nn.Module):
  """Multi-head scaled dot-product self-attention; [B, L, D] -> [B, L, D]."""
  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask_bias: jnp.ndarray) -> jnp.ndarray:
    """mask_bias: additive padding bias [B, 1, 1, L] (0 valid, MASK_BIAS padded)."""
    cfg = self.config
    h, k, std = cfg.num_attention_heads, cfg.head_dim, cfg.initializer_range

    def proj(name):
      return Linear((h, k), ("embed", "heads", "kv"), std, self.dtype, name=name)(x)

    q, key, value = proj("query"), proj("key"), proj("value")
    # Scaling q [B, L, H, K] rather than the logits [B, H, L, L]: fewer multiplies.
    logits = jnp.einsum("bqhk,bthk->bhqt", q * (k ** -0.5), key).astype(jnp.float32)
    weights = jax.nn.softmax(logits + mask_bias, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqt,bthk->bqhk", weights, value)
    return Linear((cfg.hidden_size,), ("heads", "kv", "embed"), std, self.dtype,
                  name="out")(out)


class Block(nn.Module):
  """Post-LN transformer block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""
  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask_bias: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    eps, std = cfg.layer_norm_eps, cfg.initializer_range
    x = LayerNorm(eps, self.dtype, name="attention_norm")(
        x + Attention(cfg, self.dtype, name="attention")(x, mask_bias))
    hidden = Linear((cfg.intermediate_size,), ("embed", "mlp"), std, self.dtype,
                    name="wi")(x)
    hidden = _ACTIVATIONS[cfg.hidden_act](hidden)
    hidden = Linear((cfg.hidden_size,), ("mlp", "embed"), std, self.dtype, name="wo")(hidden)
    x = LayerNorm(eps, self.dtype, name="mlp_norm")(x + hidden)
    return nn.with_logical_constraint(x, TOKEN_AXES)


class BertEncoder(nn.Module):
  """BERT encoder stack: tokens [B, L] int32, mask [B, L] bool -> hidden states [B, L, D].

  ``token_types`` [B, L] defaults to all zeros (a single segment, as for captions). L may
  not exceed ``max_position_embeddings``. Outputs at padded positions are computed like
  any other (they attend to the valid tokens), as in HF; mask them downstream. No dropout:
  the encoder is used frozen, or trained jointly without it.
  """
  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray,
               token_types: jnp.ndarray | None = None) -> jnp.ndarray:
    cfg = self.config
    length = tokens.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds this BERT's "
                       f"max_position_embeddings ({cfg.max_position_embeddings}).")
    if token_types is None:
      token_types = jnp.zeros_like(tokens)

    def table(name, rows):
      return nn.Embed(rows, cfg.hidden_size, dtype=jnp.float32, name=name,
                      embedding_init=_init(cfg.initializer_range, ("vocab", "embed")))

    # Summed in float32: the three tables differ in scale and LayerNorm follows at once.
    x = (table("word_embeddings", cfg.vocab_size)(tokens)
         + table("position_embeddings", cfg.max_position_embeddings)(jnp.arange(length))[None]
         + table("token_type_embeddings", cfg.type_vocab_size)(token_types))
    x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="embedding_norm")(x)
    x = nn.with_logical_constraint(x, TOKEN_AXES)
    mask_bias = jnp.where(mask[:, None, None, :], 0.0, MASK_BIAS).astype(jnp.float32)
    for i in range(cfg.num_hidden_layers):
      x = Block(cfg, self.dtype, name=f"block_{i}")(x, mask_bias)
    return x


def param_sources(config: BertConfig) -> dict[tuple[str, ...], Source]:
  """Our flattened param paths -> HF PyTorch tensor names and layout changes.

  ``nn.Linear`` weights [out, in] become kernels [in, ...out]; q/k/v are split into heads
  ([H*K, D] -> [D, H, K], biases [H*K] -> [H, K]) and the attention output [D, H*K] ->
  [H, K, D] (HF orders the fused dimension head-major). Only views of the file.
  """
  h, k, d = config.num_attention_heads, config.head_dim, config.hidden_size
  qkv = lambda w: w.T.reshape(d, h, k)
  qkv_bias = lambda b: b.reshape(h, k)
  out = lambda w: w.T.reshape(h, k, d)
  linear = lambda w: w.T

  def names(name):  # BertModel saves bare names; BertFor* heads put them under "bert.".
    return (name, f"bert.{name}")

  def linear_sources(ours, hf, kernel=linear, bias=lambda b: b):
    return {ours + ("kernel",): Source(names(f"{hf}.weight"), kernel),
            ours + ("bias",): Source(names(f"{hf}.bias"), bias)}

  def norm_sources(ours, hf):  # TF-converted checkpoints name LayerNorm params gamma / beta.
    return {ours + ("scale",): Source(names(f"{hf}.weight") + names(f"{hf}.gamma")),
            ours + ("bias",): Source(names(f"{hf}.bias") + names(f"{hf}.beta"))}

  sources = {(f"{t}_embeddings", "embedding"): Source(names(f"embeddings.{t}_embeddings.weight"))
             for t in ("word", "position", "token_type")}
  sources.update(norm_sources(("embedding_norm",), "embeddings.LayerNorm"))
  for i in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}", (f"block_{i}",)
    for name in ("query", "key", "value"):
      sources.update(linear_sources(ours + ("attention", name),
                                    f"{hf}.attention.self.{name}", qkv, qkv_bias))
    sources.update(linear_sources(ours + ("attention", "out"), f"{hf}.attention.output.dense",
                                  out))
    sources.update(norm_sources(ours + ("attention_norm",), f"{hf}.attention.output.LayerNorm"))
    sources.update(linear_sources(ours + ("wi",), f"{hf}.intermediate.dense"))
    sources.update(linear_sources(ours + ("wo",), f"{hf}.output.dense"))
    sources.update(norm_sources(ours + ("mlp_norm",), f"{hf}.output.LayerNorm"))
  return sources


FAMILY = EncoderFamily(
    name="bert",
    config_from_hf=BertConfig.from_hf,
    make_module=lambda config, dtype: BertEncoder(config, dtype),
    param_sources=param_sources,
    width=lambda config: config.hidden_size,
)
