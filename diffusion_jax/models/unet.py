"""Imagen's Efficient U-Net (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion
Models with Deep Language Understanding", section 2.4 and appendix F).

What makes it "efficient" compared with the ADM U-Net (Dhariwal & Nichol 2021):
  * one skip connection per resolution level, scaled by 1/sqrt(2);
  * reordered resampling: on the way down a level starts with its strided convolution
    (DBlock: downsample, then the residual blocks), on the way up it ends with it
    (UBlock: residual blocks, then upsample), so the blocks run at the cheaper resolution;
  * parameters shifted to low resolutions by giving levels different block counts.

Conditioning: the noise level enters as an embedding of log-SNR (not a step index); the
text enters twice, as a mask-aware pooled vector added to that embedding and through
cross-attention over its tokens. A super-resolution stage also sees the low-resolution
image, resized to the output resolution and concatenated with x_t, and the log-SNR of its
noise-conditioning augmentation, embedded and added to the conditioning.

The network does not know its parameterization: it maps
``x_t [B, H, W, C], logsnr [B], text [B, L, D], mask [B, L]`` to an image-shaped tensor.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

SKIP_SCALE = 1.0 / math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class Level:
  """One resolution level: width = base_channels * channel_mult, blocks, attention on/off."""

  channel_mult: int
  num_res_blocks: int
  self_attention: bool = False
  cross_attention: bool = False


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Static description of a U-Net; the module is ``UNet(config)``.

  Attributes:
    levels: resolution levels from the highest resolution to the lowest; each level
      after the first halves the resolution.
    base_channels: width unit multiplied by each level's ``channel_mult``.
    in_channels / out_channels: image channels of x_t and of the prediction.
    cond_dim: width of the conditioning embedding (noise level + pooled text + low-res
      noise level) and of the projected text tokens; default 4 * base_channels (ADM).
    num_heads, head_dim: attention heads and width per head (None: channels / heads).
    attention_every_block: True puts the level's attention layers after every residual
      block (ADM / Imagen's 64 px base model); False once per DBlock / UBlock, after the
      last residual block (Imagen's Efficient U-Net, imagen-pytorch).
    extra_up_blocks: residual blocks the way up has beyond the way down (ADM uses 1).
    text_pooling: 'mean' or 'attention' (mask-aware either way).
    dropout: dropout rate inside residual blocks (only with ``train=True``).
    super_resolution: expect ``lowres`` and ``lowres_logsnr``.
    cond_image_channels: channels of ``cond_image`` (0: no such input).
    image_embed_dim: width of ``image_embed`` (None: no such input); it becomes
      ``image_embed_tokens`` context tokens besides its pooled projection.
    micro_cond_dim: number of ``micro_cond`` values (0: no such input).
    remat: rematerialise every block in the backward pass (``nn.remat``): activation
      memory of one block instead of all, for about one more forward pass of compute.
    dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32.
    conv_impl: how convolutions are computed (``fast_conv.IMPLS``): 'xla' (lax.conv),
      'matmul' (im2col + one dot) or 'shifted' (one dot per kernel tap). The parameters
      are the same whichever is chosen.
    resolution, text_width, text_length: the input sizes the preset was designed for
      (used by shape checks and benchmarks; the module accepts any divisible size).
  """

  levels: tuple[Level, ...]
  base_channels: int = 64
  in_channels: int = 3
  out_channels: int = 3
  cond_dim: int | None = None
  num_heads: int = 8
  head_dim: int | None = None
  attention_every_block: bool = False
  extra_up_blocks: int = 0
  text_pooling: str = "mean"
  dropout: float = 0.0
  super_resolution: bool = False
  cond_image_channels: int = 0
  image_embed_dim: int | None = None
  image_embed_tokens: int = 4
  micro_cond_dim: int = 0
  remat: bool = False
  dtype: str = "float32"
  conv_impl: str = "xla"
  resolution: int = 64
  lowres_resolution: int | None = None
  text_width: int = 256
  text_length: int = 16

  @property
  def embedding_dim(self) -> int:
    return self.cond_dim or 4 * self.base_channels

  def channels(self, level: int) -> int:
    return self.base_channels * self.levels[level].channel_mult

  def heads_dim(self, channels: int) -> int:
    return self.head_dim or channels // self.num_heads


class ResAttentionBlock(nn.Module):
  """ResBlock, then optional self-attention and text cross-attention: [B,H,W,*] -> [B,H,W,C]."""

  out_channels: int
  self_attention: bool
  cross_attention: bool
  num_heads: int
  head_dim: int
  dropout: float
  dtype: jnp.dtype
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, cond, context, context_mask, train: bool):
    h = layers.ResBlock(self.out_channels, self.dropout, self.dtype, self.conv_impl,
                        name="res")(x, cond, train)
    if self.self_attention:
      h = layers.SelfAttention(self.num_heads, self.head_dim, self.dtype, name="self_attn")(h)
    if self.cross_attention:
      h = layers.CrossAttention(self.num_heads, self.head_dim, self.dtype,
                                name="cross_attn")(h, context, context_mask)
    return h


def _check_inputs(config: UNetConfig, x_t, logsnr, text_emb, text_mask, lowres, lowres_logsnr,
                  cond_image, image_embed, micro_cond=None):
  """Raises one readable ValueError for inputs the network cannot take."""
  if x_t.ndim != 4:
    raise ValueError(f"x_t must be NHWC [B, H, W, C], got shape {x_t.shape}")
  batch, height, width, _ = x_t.shape
  factor = 2 ** (len(config.levels) - 1)
  if height % factor or width % factor:
    raise ValueError(f"image size {height}x{width} must be divisible by {factor} "
                     f"({len(config.levels)} levels)")
  if logsnr.shape != (batch,):
    raise ValueError(f"logsnr must have shape [B]=({batch},), got {logsnr.shape}")
  if text_emb.ndim != 3 or text_emb.shape[0] != batch:
    raise ValueError(f"text_emb must be [B, L, D] with B={batch}, got {text_emb.shape}")
  if text_mask.shape != text_emb.shape[:2]:
    raise ValueError(f"text_mask must be [B, L]={text_emb.shape[:2]}, got {text_mask.shape}")
  if config.super_resolution:
    if lowres is None or lowres_logsnr is None:
      raise ValueError("a super-resolution U-Net needs lowres [B, h, w, C] and lowres_logsnr [B]")
    if lowres.ndim != 4 or lowres.shape[0] != batch:
      raise ValueError(f"lowres must be [B, h, w, C] with B={batch}, got {lowres.shape}")
    if lowres_logsnr.shape != (batch,):
      raise ValueError(f"lowres_logsnr must have shape ({batch},), got {lowres_logsnr.shape}")
  elif lowres is not None:
    raise ValueError("lowres given to a U-Net built without super_resolution=True")
  if config.cond_image_channels:
    want = (batch, height, width, config.cond_image_channels)
    if cond_image is None or cond_image.shape != want:
      got = None if cond_image is None else cond_image.shape
      raise ValueError(f"this U-Net takes cond_image of shape {want}, got {got}")
  elif cond_image is not None:
    raise ValueError("cond_image given to a U-Net built with cond_image_channels=0")
  if config.image_embed_dim is not None:
    want = (batch, config.image_embed_dim)
    if image_embed is None or image_embed.shape != want:
      got = None if image_embed is None else image_embed.shape
      raise ValueError(f"this U-Net takes image_embed of shape {want}, got {got}")
  elif image_embed is not None:
    raise ValueError("image_embed given to a U-Net built without image_embed_dim")
  if config.micro_cond_dim:
    want = (batch, config.micro_cond_dim)
    if micro_cond is None or micro_cond.shape != want:
      got = None if micro_cond is None else micro_cond.shape
      raise ValueError(f"this U-Net takes micro_cond of shape {want}, got {got}")
  elif micro_cond is not None:
    raise ValueError("micro_cond given to a U-Net built with micro_cond_dim=0")


class UNet(nn.Module):
  """Imagen's Efficient U-Net; see the module docstring.

  Call: ``UNet(config).apply(variables, x_t, logsnr, text_emb, text_mask, lowres=None,
  lowres_logsnr=None, cond_image=None, image_embed=None, micro_cond=None, train=False,
  rngs={'dropout': key})`` with
    x_t [B, H, W, C] in about [-1, 1], logsnr [B], text_emb [B, L, D], text_mask [B, L]
    bool, lowres [B, h, w, C] and lowres_logsnr [B] for super-resolution stages,
    cond_image [B, H, W, cond_image_channels], image_embed [B, image_embed_dim] and
    micro_cond [B, micro_cond_dim] when the config has them;
  returns the prediction [B, H, W, out_channels] in x_t's dtype.
  """

  config: UNetConfig

  @nn.compact
  def __call__(self, x_t, logsnr, text_emb, text_mask, lowres=None, lowres_logsnr=None,
               cond_image=None, image_embed=None, micro_cond=None, *, train: bool = False):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    logsnr = jnp.asarray(logsnr)
    _check_inputs(cfg, x_t, logsnr, text_emb, text_mask, lowres, lowres_logsnr, cond_image,
                  image_embed, micro_cond)
    text_mask = text_mask.astype(bool)
    emb_dim = cfg.embedding_dim

    # Text tokens are projected once to the model's width; cross-attention and pooling
    # read the projection (at T5-XXL's 4096 wide tokens, per-layer projections would cost
    # tens of millions of parameters each).
    context = layers.layer_norm(dtype, name="text_norm")(text_emb.astype(dtype))
    context = layers.dense(emb_dim, "text_embed", "embed", dtype, name="text_proj")(context)
    context = nn.with_logical_constraint(context, layers.TOKEN_AXES)

    cond = layers.NoiseLevelEmbedding(cfg.base_channels, emb_dim, dtype, name="noise_emb")(logsnr)
    cond = cond + layers.TextPooling(emb_dim, cfg.text_pooling, cfg.num_heads, dtype,
                                     name="text_pool")(context, text_mask)
    if cfg.image_embed_dim is not None:
      # DALL-E 2's decoder: the embedding is added to the timestep embedding and becomes
      # extra tokens of the cross-attention context (pooled over the text only).
      embed = image_embed.astype(dtype)
      cond = cond + layers.dense(emb_dim, "embed", "embed", dtype,
                                 name="image_embed_proj")(embed)
      tokens = layers.dense(emb_dim * cfg.image_embed_tokens, "embed", "mlp", dtype,
                            name="image_embed_tokens")(embed)
      tokens = tokens.reshape(tokens.shape[0], cfg.image_embed_tokens, emb_dim)
      context = jnp.concatenate([context, tokens.astype(context.dtype)], axis=1)
      context = nn.with_logical_constraint(context, layers.TOKEN_AXES)
      text_mask = jnp.concatenate(
          [text_mask, jnp.ones((text_mask.shape[0], cfg.image_embed_tokens), bool)], axis=1)
    if cfg.micro_cond_dim:
      feats = layers.sinusoidal_features(micro_cond, cfg.base_channels)
      feats = feats.reshape(feats.shape[0], -1).astype(dtype)
      micro = layers.dense(emb_dim, "embed", "mlp", dtype, name="micro_cond_in")(feats)
      cond = cond + layers.dense(emb_dim, "mlp", "embed", dtype,
                                 name="micro_cond_out")(nn.silu(micro))
    h = x_t
    if cfg.super_resolution:
      # Antialiased bilinear resize: upsampling is plain bilinear, a smaller target
      # (e.g. crops) is low-pass filtered first.
      upsampled = jax.image.resize(lowres.astype(jnp.float32), x_t.shape[:3] + lowres.shape[3:],
                                   method="bilinear", antialias=True)
      h = jnp.concatenate([x_t.astype(jnp.float32), upsampled], axis=-1)
      cond = cond + layers.NoiseLevelEmbedding(cfg.base_channels, emb_dim, dtype,
                                               name="lowres_noise_emb")(lowres_logsnr)
    if cfg.cond_image_channels:
      h = jnp.concatenate([h.astype(jnp.float32), cond_image.astype(jnp.float32)], axis=-1)

    block_cls = nn.remat(ResAttentionBlock, static_argnums=(5,)) if cfg.remat else (
        ResAttentionBlock)

    def level_blocks(h, level_index, direction):
      level = cfg.levels[level_index]
      channels = cfg.channels(level_index)
      num_blocks = level.num_res_blocks + (cfg.extra_up_blocks if direction == "up" else 0)
      for j in range(num_blocks):
        with_attention = cfg.attention_every_block or j == num_blocks - 1
        h = block_cls(
            channels, level.self_attention and with_attention,
            level.cross_attention and with_attention, cfg.num_heads,
            cfg.heads_dim(channels), cfg.dropout, dtype, cfg.conv_impl,
            name=f"{direction}_{level_index}_block_{j}")(h, cond, context, text_mask, train)
      return h

    conv_impl = cfg.conv_impl
    h = layers.image_constraint(layers.conv(cfg.channels(0), dtype, name="stem",
                                            impl=conv_impl)(h.astype(dtype)))
    skips = []
    for i in range(len(cfg.levels)):
      if i > 0:  # DBlock: downsample first, then the blocks run at the lower resolution.
        h = layers.Downsample(cfg.channels(i), dtype, conv_impl, name=f"down_{i}_resample")(h)
      h = level_blocks(h, i, "down")
      skips.append(h)
    for i in reversed(range(len(cfg.levels))):
      h = jnp.concatenate([h, skips.pop() * jnp.asarray(SKIP_SCALE, dtype)], axis=-1)
      h = level_blocks(h, i, "up")
      if i > 0:  # UBlock: the blocks run first, then upsample.
        h = layers.Upsample(cfg.channels(i - 1), dtype, conv_impl, name=f"up_{i}_resample")(h)

    h = nn.silu(layers.group_norm(h.shape[-1], dtype, name="out_norm")(h))
    out = layers.conv(cfg.out_channels, dtype, name="out_conv", zero_init=True,
                      impl=conv_impl)(h)
    return out.astype(x_t.dtype)


def example_inputs(config: UNetConfig, batch: int = 1, resolution: int | None = None):
  """Zero inputs of the preset's sizes, as ShapeDtypeStructs-compatible arrays (for init)."""
  res = resolution or config.resolution
  args = dict(
      x_t=jnp.zeros((batch, res, res, config.in_channels), jnp.float32),
      logsnr=jnp.zeros((batch,), jnp.float32),
      text_emb=jnp.zeros((batch, config.text_length, config.text_width), jnp.float32),
      text_mask=jnp.ones((batch, config.text_length), bool))
  if config.super_resolution:
    low = config.lowres_resolution or res // 4
    args["lowres"] = jnp.zeros((batch, low, low, config.in_channels), jnp.float32)
    args["lowres_logsnr"] = jnp.zeros((batch,), jnp.float32)
  if config.cond_image_channels:
    args["cond_image"] = jnp.zeros((batch, res, res, config.cond_image_channels), jnp.float32)
  if config.image_embed_dim is not None:
    args["image_embed"] = jnp.zeros((batch, config.image_embed_dim), jnp.float32)
  if config.micro_cond_dim:
    args["micro_cond"] = jnp.zeros((batch, config.micro_cond_dim), jnp.float32)
  return args


def _levels(mults, blocks, self_attn, cross_attn):
  return tuple(Level(m, b, s, c) for m, b, s, c in zip(mults, blocks, self_attn, cross_attn,
                                                        strict=True))


PRESETS: dict[str, UNetConfig] = {
    # imagen-pytorch's Unet(dim=64, dim_mults=(1, 2, 4), num_resnet_blocks=2,
    # layer_attns=(F, T, T), layer_cross_attns=(F, T, T), cond_dim=256, attn_heads=8,
    # attn_dim_head=64, text_embed_dim=256): the CPU benchmark's peer.
    "imagen_pytorch_cpu": UNetConfig(
        levels=_levels((1, 2, 4), (2, 2, 2), (False, True, True), (False, True, True)),
        base_channels=64, cond_dim=256, num_heads=8, head_dim=64, resolution=32,
        text_width=256, text_length=16),
    # The small base model of the CPU demo (1.1M params): 32 base channels train 1.46x
    # faster than 40 (55.7 vs 38.2 img/s at batch 32 on 2 cores), and the demo is
    # budgeted in minutes, so more steps beat more width.
    "demo_base": UNetConfig(
        levels=_levels((1, 2, 2), (1, 1, 1), (False, False, True), (False, True, True)),
        base_channels=32, num_heads=4, attention_every_block=True, extra_up_blocks=1,
        resolution=32, text_width=384, text_length=16),
    # The demo's 32 -> 64 px super-resolution stage: no self-attention (like SR1024).
    "demo_sr": UNetConfig(
        levels=_levels((1, 2, 4), (1, 1, 2), (False, False, False), (False, False, True)),
        base_channels=32, cond_dim=128, num_heads=4, super_resolution=True, resolution=64,
        lowres_resolution=32, text_width=384, text_length=16),
    # Paper scale (Imagen appendix F), shape-checked only. Text: T5-XXL, 4096 wide.
    # 64 px base, 2B: 512 channels, multipliers (1, 2, 3, 4), 3 blocks per level,
    # self- and cross-attention at 32, 16 and 8 px after every block, one more block on
    # the way up (the ADM layout the paper adapts; the Efficient U-Net is for SR stages).
    "imagen_base64": UNetConfig(
        levels=_levels((1, 2, 3, 4), (3, 3, 3, 3), (False, True, True, True),
                       (False, True, True, True)),
        base_channels=512, num_heads=8, attention_every_block=True, extra_up_blocks=1,
        text_pooling="attention", resolution=64, text_width=4096, text_length=128),
    # 64 -> 256 px, 600M: Efficient U-Net, 128 channels, multipliers (1, 2, 4, 8) with
    # (2, 4, 8, 8) blocks, self- and cross-attention at the lowest resolution.
    "imagen_sr256": UNetConfig(
        levels=_levels((1, 2, 4, 8), (2, 4, 8, 8), (False, False, False, True),
                       (False, False, False, True)),
        base_channels=128, num_heads=8, attention_every_block=True, text_pooling="attention",
        super_resolution=True, resolution=256, lowres_resolution=64, text_width=4096,
        text_length=128),
    # 256 -> 1024 px, 400M: as sr256 without self-attention, trained on 256 px crops.
    "imagen_sr1024": UNetConfig(
        levels=_levels((1, 2, 4, 8), (2, 4, 8, 8), (False, False, False, False),
                       (False, False, False, True)),
        base_channels=128, num_heads=8, text_pooling="attention", super_resolution=True,
        resolution=256, lowres_resolution=64, text_width=4096, text_length=128),
}

# Parameter counts the Imagen paper reports (section 4 / appendix F).
PAPER_PARAMS = {"imagen_base64": 2.0e9, "imagen_sr256": 600e6, "imagen_sr1024": 400e6}


def count_params(config: UNetConfig, resolution: int | None = None) -> int:
  """Number of parameters, from ``jax.eval_shape`` of init (nothing is allocated)."""
  model = UNet(config)
  inputs = example_inputs(config, batch=1, resolution=resolution)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))
