"""Building blocks of the Efficient U-Net (Saharia et al. 2022, "Imagen", appendix F).

Every parameter carries logical axis names (``nn.with_logical_partitioning``) so that
``diffusion_jax.sharding`` can map them onto a device mesh with a table of rules:

  ``conv_in``, ``conv_out``  input / output channels of a convolution kernel
  ``embed``                  the model-width side of a dense kernel (FSDP shards it)
  ``mlp``                    the expanded side of a dense kernel (conditioning MLP, FiLM)
  ``heads``, ``kv``          attention heads and per-head width
  ``text_embed``             width of the (frozen) text encoder's token embeddings
  ``norm``                   scales and offsets of normalisation layers (never sharded)

Images are NHWC; activations carry ``('batch', 'height', 'width', 'embed')`` constraints.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import sharding
from diffusion_jax.models import fast_conv

Dtype = Any

# Log-SNR of a usable noise level lies in about [-20, 20]; +-inf (clean / pure noise) is
# clipped so that the embedding stays finite.
LOGSNR_CLIP = 30.0
# Sinusoidal embeddings were designed for integer steps in [0, 1000]; scaling log-SNR by
# 25 spreads [-20, 20] over a range of the same size, so the fastest frequencies still
# resolve small differences in noise level.
LOGSNR_SCALE = 25.0

IMAGE_AXES = ("batch", "height", "width", "embed")
TOKEN_AXES = ("batch", "length", "embed")


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def dense(features, in_name, out_name, dtype, name=None, zero_init=False):
  """nn.Dense whose kernel is named (in_name, out_name) and bias (out_name,)."""
  kernel_init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(
      features, dtype=dtype, name=name,
      kernel_init=_partitioned(kernel_init, (in_name, out_name)),
      bias_init=_partitioned(nn.initializers.zeros_init(), (out_name,)))


class HeadsProjection(nn.Module):
  """Per-head linear maps, heads-first: [B, L, C] -> [B, N, L, D] (``to_heads``) or
  [B, N, L, D] -> [B, L, C] (``from_heads``, zero-initialised: a new block is identity).

  Heads-first keeps the attention matmuls in XLA's canonical batch-major layout; the
  [B, L, N, D] layout made XLA CPU transpose the score tensors, costing about 40% of a
  self-attention layer's time at 16x16 positions. Kernels are [C, N, D] / [N, D, C],
  named ('embed', 'heads', 'kv') / ('heads', 'kv', 'embed').
  """

  num_heads: int
  head_dim: int
  out_channels: int | None = None  # None: to_heads; an int: from_heads with that width
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    heads = (self.num_heads, self.head_dim)
    if self.out_channels is None:
      kernel = self.param("kernel", _partitioned(
          nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv")),
          (x.shape[-1], *heads))
      bias = self.param("bias", _partitioned(nn.initializers.zeros_init(), ("heads", "kv")),
                        heads)
      x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (x, kernel, bias))
      return jnp.einsum("blc,cnd->bnld", x, kernel) + bias[None, :, None, :]
    kernel = self.param("kernel", _partitioned(nn.initializers.zeros_init(),
                                               ("heads", "kv", "embed")),
                        (*heads, self.out_channels))
    bias = self.param("bias", _partitioned(nn.initializers.zeros_init(), ("embed",)),
                      (self.out_channels,))
    x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (x, kernel, bias))
    return jnp.einsum("bnld,ndc->blc", x, kernel) + bias


def conv(features: int, dtype: Dtype, kernel_size: int = 3, strides: int = 1, name=None,
         zero_init: bool = False, impl: str = "xla") -> nn.Conv:
  """A 'SAME'-padded 2-D convolution whose kernel is named (_, _, conv_in, conv_out).

  ``impl`` (``fast_conv.IMPLS``): 'xla' is lax.conv; 'matmul' / 'shifted' compute it with
  dots (``fast_conv.conv2d``). The parameters are nn.Conv's whichever runs.
  """
  kernel_init = (nn.initializers.zeros_init() if zero_init
                 else nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"))
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides), padding="SAME",
      dtype=dtype, name=name, conv_general_dilated=fast_conv.conv_general_dilated(impl),
      kernel_init=_partitioned(kernel_init, (None, None, "conv_in", "conv_out")),
      bias_init=_partitioned(nn.initializers.zeros_init(), ("conv_out",)))


def num_groups(channels: int, max_groups: int = 32) -> int:
  """Largest group count <= max_groups dividing channels (GroupNorm, Wu & He 2018)."""
  for groups in range(min(max_groups, channels), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


def group_norm(channels: int, dtype: Dtype, name=None) -> nn.GroupNorm:
  return nn.GroupNorm(
      num_groups=num_groups(channels), dtype=dtype, name=name,
      scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
      bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)))


def layer_norm(dtype: Dtype, name=None) -> nn.LayerNorm:
  return nn.LayerNorm(
      dtype=dtype, name=name,
      scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
      bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)))


def image_constraint(x: jnp.ndarray) -> jnp.ndarray:
  """Pins a [B, H, W, C] activation to the mesh: batch sharded, the rest by the rules."""
  return nn.with_logical_constraint(x, IMAGE_AXES)


def logsnr_features(logsnr: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
  """Sinusoidal features [B, dim] of a scaled, clipped log-SNR [B].

  The transformer position encoding (Vaswani et al. 2017) applied to the noise level
  itself rather than an integer step, as in VDM (Kingma et al. 2021): the network then
  works with any continuous schedule.
  """
  if dim % 2:
    raise ValueError(f"noise embedding width must be even, got {dim}")
  x = jnp.clip(jnp.asarray(logsnr, jnp.float32), -LOGSNR_CLIP, LOGSNR_CLIP) * LOGSNR_SCALE
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = x[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sinusoidal_features(x: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
  """Transformer position features [..., dim] of real values [...] (no scaling or clipping:
  pixel counts, as SDXL embeds sizes and crop offsets)."""
  if dim % 2:
    raise ValueError(f"sinusoidal feature width must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(x, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class NoiseLevelEmbedding(nn.Module):
  """log-SNR [B] -> sinusoidal features -> 2-layer SiLU MLP -> [B, out_dim]."""

  features_dim: int
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, logsnr: jnp.ndarray) -> jnp.ndarray:
    h = logsnr_features(logsnr, self.features_dim).astype(self.dtype)
    h = dense(self.out_dim, "embed", "mlp", self.dtype, name="dense_in")(h)
    h = nn.silu(h)
    return dense(self.out_dim, "mlp", "embed", self.dtype, name="dense_out")(h)


# Above this many (query, key) positions per head, attention runs pair by pair (see
# ``attention``). Measured on the 2-core CPU, batch 16, 8 heads of 64, forward + backward:
# 256 x 256: dense 108 ms, pairwise 132 ms; 512 x 512: 458 vs 342 ms; 1024 x 1024: 1869 vs
# 1276 ms, with 169 MiB of temporaries instead of 1056 MiB.
PAIRWISE_MIN_POSITIONS = 512 * 512


def dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                    key_mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Multi-head scaled dot-product attention (Vaswani et al. 2017), heads-first.

  q [B, N, Lq, D], k and v [B, N, Lk, D], key_mask [B, Lk] bool (True = attend).
  Returns [B, N, Lq, D]. Logits and softmax statistics are float32 whatever the input
  dtype. Masked keys get weight exactly 0 (exp(-inf)), so their values cannot leak into
  the output; at least one key per row must be unmasked.
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bnqd,bnkd->bnqk", q * scale, k, preferred_element_type=jnp.float32)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
  # Softmax with the normalisation applied after the value matmul, on [.., Lq, D] instead
  # of [.., Lq, Lk]: one fewer pass over the score tensor (the max shift is exact, so it
  # needs no gradient).
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  out = jnp.einsum("bnqk,bnkd->bnqd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)


def _attention_by_pairs(q, k, v, key_mask):
  """``dense_attention`` on one (image, head) pair at a time, each recomputed in the
  backward pass: a ``lax.map`` over the B * N pairs of these (local) arrays."""
  batch, heads = q.shape[:2]
  pairs = lambda x: x.reshape(batch * heads, 1, 1, *x.shape[2:])
  xs = (pairs(q), pairs(k), pairs(v))
  if key_mask is not None:
    xs += (jnp.repeat(key_mask, heads, axis=0)[:, None, :],)
  out = jax.lax.map(lambda args: jax.checkpoint(dense_attention)(*args), xs)
  return out.reshape(*q.shape[:3], v.shape[-1])


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
              key_mask: jnp.ndarray | None = None, *,
              pairwise: bool | None = None) -> jnp.ndarray:
  """Multi-head attention, heads-first: ``dense_attention``'s contract and result.

  For long sequences (Lq * Lk >= PAIRWISE_MIN_POSITIONS, or ``pairwise=True``) it runs one
  (image, head) pair at a time and recomputes each pair's scores in the backward pass
  instead of storing them: at 64 px the 32x32-position self-attention would otherwise
  write and keep [B, N, 1024, 1024] float32 score tensors (537 MB at batch 16), and
  XLA:CPU spends most of the layer's time streaming them through memory. One pair's
  4 MiB of scores stays in cache. (Flash attention's idea, at the granularity XLA:CPU
  can express; it adds one forward pass of the layer's matmuls.)

  On a device mesh (``jax.set_mesh``, as ``sharding.sharding_context`` sets it) the pairs
  are mapped inside ``jax.shard_map``, each device over its own shard of the batch and
  heads (as the current logical rules place them): a ``lax.map`` over an axis that is
  sharded would make XLA gather it first.
  """
  if pairwise is None:
    pairwise = q.shape[2] * k.shape[2] >= PAIRWISE_MIN_POSITIONS
  if not pairwise:
    return dense_attention(q, k, v, key_mask)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _attention_by_pairs(q, k, v, key_mask)
  rules = tuple(nn.get_logical_axis_rules())
  spec = sharding.logical_to_mesh_spec(("batch", "heads", None, None), q.shape, rules, mesh)
  spec_kv = sharding.logical_to_mesh_spec(("batch", "heads", None, None), k.shape, rules,
                                          mesh)
  if spec_kv != spec:  # e.g. an indivisible dimension: keep q, k and v on the same devices
    spec = jax.sharding.PartitionSpec()
  in_specs = (spec, spec, spec)
  args = (q, k, v)
  if key_mask is not None:
    in_specs += (jax.sharding.PartitionSpec(spec[0] if len(spec) else None, None),)
    args += (key_mask,)
  local = lambda q, k, v, mask=None: _attention_by_pairs(q, k, v, mask)
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec,
                       check_vma=False)(*args)


class SelfAttention(nn.Module):
  """Pre-norm multi-head self-attention over the H*W positions of [B, H, W, C], residual.

  The output projection starts at zero, so a new block is the identity (Goyal et al. 2017).
  """

  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, height, width, channels = x.shape
    h = group_norm(channels, self.dtype, name="norm")(x).reshape(batch, height * width, channels)
    to_heads = lambda name: HeadsProjection(self.num_heads, self.head_dim, None, self.dtype,
                                            name=name)
    out = attention(to_heads("query")(h), to_heads("key")(h), to_heads("value")(h))
    out = HeadsProjection(self.num_heads, self.head_dim, channels, self.dtype, name="out")(out)
    return image_constraint(x + out.reshape(x.shape))


class CrossAttention(nn.Module):
  """Pre-norm attention from image positions [B, H, W, C] to text tokens [B, L, D], residual.

  A learned "null" key/value is always attendable (as in imagen-pytorch), so a caption
  whose tokens are all masked (classifier-free guidance's dropped condition) is well
  defined; padded tokens (mask False) get weight exactly 0 and cannot change the output.

  ``attention_edit`` (attention control, e.g. Prompt-to-Prompt, Hertz et al. 2022): a
  jit-able function of the attention probabilities [B, N, H*W, 1 + L] (key 0 is the null
  token, keys 1.. the text tokens) returning probabilities of that shape, applied before
  the value matmul. None (the default) runs the unchanged path. The U-Net does not pass
  it: an editor sets it with ``flax.linen.intercept_methods`` (``editing/prompt_to_prompt``).
  """

  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray,
               context_mask: jnp.ndarray, attention_edit=None) -> jnp.ndarray:
    batch, height, width, channels = x.shape
    h = layer_norm(self.dtype, name="norm")(x).reshape(batch, height * width, channels)
    heads = (self.num_heads, self.head_dim)
    to_heads = lambda name: HeadsProjection(*heads, None, self.dtype, name=name)
    q, k, v = to_heads("query")(h), to_heads("key")(context), to_heads("value")(context)
    null_init = _partitioned(nn.initializers.normal(1.0), ("heads", "kv"))
    null_k = self.param("null_key", null_init, heads).astype(k.dtype)
    null_v = self.param("null_value", null_init, heads).astype(v.dtype)
    null_shape = (batch, self.num_heads, 1, self.head_dim)
    k = jnp.concatenate([jnp.broadcast_to(null_k[None, :, None], null_shape), k], axis=2)
    v = jnp.concatenate([jnp.broadcast_to(null_v[None, :, None], null_shape), v], axis=2)
    mask = jnp.concatenate([jnp.ones((batch, 1), bool), context_mask.astype(bool)], axis=1)
    if attention_edit is None:
      out = attention(q, k, v, mask)
    else:
      out = _edited_attention(q, k, v, mask, attention_edit)
    out = HeadsProjection(*heads, channels, self.dtype, name="out")(out)
    return image_constraint(x + out.reshape(x.shape))


def _edited_attention(q, k, v, key_mask, edit):
  """``dense_attention`` with explicit probabilities [B, N, Lq, Lk] passed through ``edit``
  (text keys are few, so the probabilities are small even at high resolution)."""
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bnqd,bnkd->bnqk", q * scale, k, preferred_element_type=jnp.float32)
  logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
  probs = edit(jax.nn.softmax(logits, axis=-1))
  out = jnp.einsum("bnqk,bnkd->bnqd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(v.dtype)


class TextPooling(nn.Module):
  """Mask-aware pooling of text tokens [B, L, D] (mask [B, L]) into one vector [B, out_dim].

  ``mean``: the average of unmasked tokens (zero vector when none is unmasked).
  ``attention``: a learned query attends over the unmasked tokens plus a learned null token
  (the attention pooling of CLIP / imagen-pytorch). Padded tokens never contribute.
  """

  out_dim: int
  kind: str = "mean"
  num_heads: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    mask = mask.astype(bool)
    if self.kind == "mean":
      weights = mask.astype(tokens.dtype)[..., None]
      count = jnp.maximum(weights.sum(axis=1), 1.0)
      pooled = (tokens * weights).sum(axis=1) / count
    elif self.kind == "attention":
      batch, _, width = tokens.shape
      if width % self.num_heads:
        raise ValueError(f"text width {width} is not divisible by {self.num_heads} heads")
      heads = (self.num_heads, width // self.num_heads)
      query = self.param("query", _partitioned(nn.initializers.normal(1.0), ("heads", "kv")),
                         heads).astype(self.dtype)
      null = self.param("null_token", _partitioned(nn.initializers.normal(1.0), ("embed",)),
                        (width,)).astype(tokens.dtype)
      tokens = jnp.concatenate([jnp.broadcast_to(null, (batch, 1, width)), tokens], axis=1)
      mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
      k = HeadsProjection(*heads, None, self.dtype, name="key")(tokens)
      v = HeadsProjection(*heads, None, self.dtype, name="value")(tokens)
      q = jnp.broadcast_to(query[None, :, None, :], (batch, heads[0], 1, heads[1]))
      pooled = attention(q, k, v, mask).reshape(batch, width)
    else:
      raise ValueError(f"text pooling must be 'mean' or 'attention', got {self.kind!r}")
    pooled = layer_norm(self.dtype, name="norm")(pooled)
    return dense(self.out_dim, "mlp", "embed", self.dtype, name="proj")(pooled)


class ResBlock(nn.Module):
  """BigGAN-style residual block with FiLM conditioning (Dhariwal & Nichol 2021, "ADM").

  x [B, H, W, Cin], cond [B, E] -> [B, H, W, out_channels]:
  GN -> SiLU -> conv3x3 -> GN -> (1 + scale) * h + shift -> SiLU -> dropout -> conv3x3
  (zero-initialised, so the block starts as its skip path) + skip (1x1 conv if Cin differs).
  """

  out_channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"  # fast_conv.IMPLS

  @nn.compact
  def __call__(self, x: jnp.ndarray, cond: jnp.ndarray, train: bool) -> jnp.ndarray:
    h = nn.silu(group_norm(x.shape[-1], self.dtype, name="norm_in")(x))
    h = image_constraint(conv(self.out_channels, self.dtype, name="conv_in",
                              impl=self.conv_impl)(h))
    film = dense(2 * self.out_channels, "embed", "mlp", self.dtype, name="film")(nn.silu(cond))
    scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
    h = group_norm(self.out_channels, self.dtype, name="norm_out")(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.out_channels, self.dtype, name="conv_out", zero_init=True,
             impl=self.conv_impl)(h)
    skip = x if x.shape[-1] == self.out_channels else conv(
        self.out_channels, self.dtype, kernel_size=1, name="skip", impl=self.conv_impl)(x)
    return image_constraint(h + skip)


class Downsample(nn.Module):
  """Strided 3x3 convolution: [B, H, W, Cin] -> [B, H/2, W/2, out_channels] (Imagen DBlock)."""

  out_channels: int
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"  # fast_conv.IMPLS

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return image_constraint(conv(self.out_channels, self.dtype, strides=2, name="conv",
                                 impl=self.conv_impl)(x))


class Upsample(nn.Module):
  """Nearest-neighbour x2 then 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, out_channels] (UBlock)."""

  out_channels: int
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"  # fast_conv.IMPLS

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, height, width, channels = x.shape
    # A broadcast + reshape is a plain copy; jax.image.resize would build a gather.
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    x = x.reshape(batch, 2 * height, 2 * width, channels)
    return image_constraint(conv(self.out_channels, self.dtype, name="conv",
                                 impl=self.conv_impl)(x))
