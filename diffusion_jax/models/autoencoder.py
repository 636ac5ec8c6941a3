"""A KL-regularised autoencoder with diffusers' ``AutoencoderKL`` architecture, in Flax.

The first stage of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", section 3 and appendix G): an encoder maps an image
[B, H, W, C] in [-1, 1] to the mean and log-variance of a diagonal Gaussian over latents
[B, H/f, W/f, latent_channels] (f = 2 ** (levels - 1)); a decoder maps latents back. The
layout is the one Stable Diffusion 1.x / 2.x and SDXL VAEs ship in (diffusers'
``AutoencoderKL``), so their ``diffusion_pytorch_model.safetensors`` loads onto it:

  encoder: conv_in -> per level: ``layers_per_block`` ResNet blocks (GN -> SiLU -> conv3x3,
    twice, 1x1 shortcut when the width changes), then (not at the last level) a stride-2
    conv3x3 padded on the bottom/right only -> mid block (ResNet, single-head
    self-attention, ResNet) -> GN -> SiLU -> conv3x3 to 2 * latent_channels;
  quant_conv (1x1) -> (mean, logvar), logvar clipped to [-30, 20];
  post_quant_conv (1x1) -> decoder: conv_in -> mid block -> per level, widest first:
    ``layers_per_block + 1`` ResNet blocks, then (not at the last) nearest x2 + conv3x3
    -> GN -> SiLU -> conv3x3 to out_channels.

Diffusion runs on ``scaled = (z - shift_factor) * scaling_factor`` (``to_diffusion`` /
``from_diffusion``): SD's 0.18215 makes its latents about unit variance.

Parameters carry logical axis names (``conv_in``/``conv_out`` on kernels, ``embed``/``mlp``
on attention projections, ``norm``), so they shard with the U-Net's rules. Flax module
names mirror the PyTorch state-dict names (``down_blocks_0`` <-> ``down_blocks.0``), which
makes the conversion a rename plus a transpose (``param_sources``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import sharding
from diffusion_jax.models import hf_checkpoint, layers

Dtype = Any

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_NAME = "diffusion_pytorch_model.bin"
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
NORM_EPS = 1e-6  # every GroupNorm of AutoencoderKL


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Static description of an AutoencoderKL (the fields of its diffusers config.json)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: str = "float32"

  def __post_init__(self):
    for width in self.block_out_channels:
      if width % self.norm_num_groups:
        raise ValueError(f"block_out_channels {self.block_out_channels} must divide by "
                         f"norm_num_groups={self.norm_num_groups}")
    if self.scaling_factor <= 0:
      raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any], dtype: str = "float32") -> AutoencoderConfig:
    """From a diffusers ``AutoencoderKL`` config.json dict; ValueError for other models."""
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"config.json describes a {name}, not an AutoencoderKL")
    for key, expected in (("down_block_types", "DownEncoderBlock2D"),
                          ("up_block_types", "UpDecoderBlock2D")):
      kinds = set(d.get(key, [expected]))
      if kinds != {expected}:
        raise ValueError(f"config.json {key}={sorted(kinds)}: only {expected} is supported")
    if d.get("act_fn", "silu") != "silu":
      raise ValueError(f"config.json act_fn={d['act_fn']!r}: only silu is supported")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    kwargs = {k: d[k] for k in fields if d.get(k) is not None}
    if "block_out_channels" in kwargs:
      kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return cls(**kwargs, dtype=dtype)


def _conv(features: int, dtype: Dtype, kernel_size: int = 3, strides: int = 1,
          padding: Any = "SAME", name: str | None = None) -> nn.Conv:
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
      dtype=dtype, name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
          (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def _group_norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(
      num_groups=groups, epsilon=NORM_EPS, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without time embedding: [B, H, W, Cin] -> [B, H, W, out]."""

  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, self.dtype, name="conv1")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.out_channels, self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, self.dtype, kernel_size=1, name="conv_shortcut")(x)
    return layers.image_constraint(x + h)


class MidAttention(nn.Module):
  """Single-head self-attention over the H*W positions with a GroupNorm and a residual
  (the mid block's ``Attention``, heads = channels / attention_head_dim = 1)."""

  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = _group_norm(self.groups, self.dtype, "group_norm")(x)
    h = h.reshape(batch, 1, height * width, channels)  # [B, heads=1, L, C]
    project = lambda name, a, b: layers.dense(channels, a, b, self.dtype, name=name)
    q, k, v = (project(n, "embed", "mlp")(h) for n in ("to_q", "to_k", "to_v"))
    out = layers.attention(q, k, v)
    out = project("to_out_0", "mlp", "embed")(out)
    return layers.image_constraint(x + out.reshape(x.shape))


class MidBlock(nn.Module):
  groups: int
  add_attention: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = MidAttention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(channels, self.groups, self.dtype, name="resnets_1")(x)


class Resample(nn.Module):
  """diffusers' Downsample2D / Upsample2D with a conv (the module holds one ``conv``).

  Down: pad one row / column at the bottom / right, then a stride-2 conv3x3 without
  padding (what diffusers does; 'SAME' would pad the top-left too). Up: nearest x2, conv3x3.
  """

  channels: int
  up: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    if not self.up:
      return _conv(self.channels, self.dtype, strides=2, padding=((0, 1), (0, 1)),
                   name="conv")(h)
    batch, height, width, channels = h.shape
    # A broadcast + reshape is a plain copy; jax.image.resize would build a gather.
    h = jnp.broadcast_to(h[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    h = h.reshape(batch, 2 * height, 2 * width, channels)
    return _conv(self.channels, self.dtype, name="conv")(h)


class Block(nn.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D: ``num_layers`` ResNet blocks, then an optional
  resampler."""

  channels: int
  num_layers: int
  groups: int
  resample: str | None  # None, "down" or "up"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    for j in range(self.num_layers):
      h = ResnetBlock(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(h)
    if self.resample is not None:
      name = "upsamplers_0" if self.resample == "up" else "downsamplers_0"
      h = Resample(self.channels, self.resample == "up", self.dtype, name=name)(h)
    return h


class Encoder(nn.Module):
  """Image [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (mean, logvar)."""

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    groups, widths = cfg.norm_num_groups, cfg.block_out_channels
    h = _conv(widths[0], dtype, name="conv_in")(x.astype(dtype))
    for i, width in enumerate(widths):
      h = Block(width, cfg.layers_per_block, groups, "down" if i < len(widths) - 1 else None,
                dtype, name=f"down_blocks_{i}")(h)
    h = MidBlock(groups, cfg.mid_block_add_attention, dtype, name="mid_block")(h)
    h = nn.silu(_group_norm(groups, dtype, "conv_norm_out")(h))
    return _conv(2 * cfg.latent_channels, dtype, name="conv_out")(h)


class Decoder(nn.Module):
  """Latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, z):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    groups, widths = cfg.norm_num_groups, tuple(reversed(cfg.block_out_channels))
    h = _conv(widths[0], dtype, name="conv_in")(z.astype(dtype))
    h = MidBlock(groups, cfg.mid_block_add_attention, dtype, name="mid_block")(h)
    for i, width in enumerate(widths):
      h = Block(width, cfg.layers_per_block + 1, groups, "up" if i < len(widths) - 1 else None,
                dtype, name=f"up_blocks_{i}")(h)
    h = nn.silu(_group_norm(groups, dtype, "conv_norm_out")(h))
    return _conv(cfg.out_channels, dtype, name="conv_out")(h)


class AutoencoderKL(nn.Module):
  """The autoencoder; ``apply(v, x, method="encode")`` -> (mean, logvar), each
  [B, H/f, W/f, latent_channels] float32; ``apply(v, z, method="decode")`` -> image
  [B, H, W, out_channels] float32; ``apply(v, x, key)`` -> (reconstruction of a posterior
  sample (of the mean when key is None), mean, logvar) for training."""

  config: AutoencoderConfig

  def setup(self):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, dtype, kernel_size=1)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, dtype, kernel_size=1)

  def encode(self, x):
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(jnp.dtype(self.config.dtype)))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x, key=None):
    mean, logvar = self.encode(x)
    z = mean if key is None else posterior_sample(key, mean, logvar)
    return self.decode(z), mean, logvar


def posterior_sample(key: jax.Array, mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (the reparameterisation trick)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example [B], summed over latent elements."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(axis=-1)


def to_diffusion(z: jnp.ndarray, scaling_factor: float, shift_factor: float | None = None):
  """Latents as diffusion sees them: (z - shift) * scale."""
  return (z - (shift_factor or 0.0)) * scaling_factor


def from_diffusion(latents: jnp.ndarray, scaling_factor: float,
                   shift_factor: float | None = None):
  """Inverse of ``to_diffusion``: what the decoder takes."""
  return latents / scaling_factor + (shift_factor or 0.0)


def example_input(config: AutoencoderConfig, resolution: int | None = None, batch: int = 1):
  res = resolution or 2 * config.downsample_factor
  return jnp.zeros((batch, res, res, config.in_channels), jnp.float32)


def abstract_params(config: AutoencoderConfig) -> Any:
  """Boxed (logically named) ShapeDtypeStructs of the params (nothing allocated)."""
  model = AutoencoderKL(config)
  return jax.eval_shape(lambda k: model.init(k, example_input(config))["params"],
                        jax.random.key(0))


# ----------------------------------------------------------------------------------------
# diffusers checkpoints.

# Names of the mid-block attention in checkpoints saved before diffusers renamed them.
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _torch_name(path: tuple[str, ...]) -> str:
  """Flax module path -> PyTorch's: ("down_blocks_0", "resnets_1") -> "down_blocks.0.resnets.1"."""
  return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


def param_sources(config: AutoencoderConfig) -> dict[tuple[str, ...], hf_checkpoint.Source]:
  """Flattened Flax param path -> where it is in a diffusers AutoencoderKL state dict."""
  flat = traverse_util.flatten_dict(nn.unbox(abstract_params(config)))
  sources = {}
  for path, leaf in flat.items():
    module, kind = _torch_name(path[:-1]), path[-1]
    names = [module]
    for new, old in _LEGACY_ATTENTION.items():
      if module.endswith("attentions.0." + new):
        names.append(module[: -len(new)] + old)
    suffix = "bias" if kind == "bias" else "weight"
    if kind == "kernel" and len(leaf.shape) == 4:
      transform = lambda w: w.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    elif kind == "kernel":
      # Linear [out, in] -> [in, out]; legacy 1x1-conv attention weights are [out, in, 1, 1].
      transform = lambda w: w.reshape(w.shape[0], w.shape[1]).T
    else:
      transform = lambda w: w
    sources[path] = hf_checkpoint.Source(tuple(f"{n}.{suffix}" for n in names), transform)
  return sources


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors file(s) of a diffusers model directory, or a one-line error."""
  single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
  if single.is_file():
    return [single]
  if index.is_file():
    import json
    shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
      raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}.")
    return [directory / s for s in shards]
  if (directory / PICKLE_NAME).is_file():
    raise ValueError(f"{directory} has only PyTorch pickle weights ({PICKLE_NAME}); they are "
                     "not loaded because unpickling can run arbitrary code. Re-save them with "
                     "`AutoencoderKL.from_pretrained(d).save_pretrained(d)` (safetensors).")
  raise FileNotFoundError(f"{directory} has no autoencoder weights ({WEIGHTS_NAME}); pass a "
                          "diffusers AutoencoderKL directory (e.g. a VAE's 'vae/' folder).")


@dataclasses.dataclass(frozen=True)
class PretrainedAutoencoder:
  """A loaded autoencoder: module, params (placed on their shardings) and config."""

  model: AutoencoderKL
  params: Any
  config: AutoencoderConfig


def load_diffusers(directory: str | pathlib.Path, *, mesh=None,
                   rules: sharding.LogicalRules = sharding.FSDP_RULES,
                   dtype: str = "float32") -> PretrainedAutoencoder:
  """Loads a diffusers ``AutoencoderKL`` directory (config.json +
  diffusion_pytorch_model.safetensors). With ``mesh``, every parameter is placed straight
  onto the NamedSharding its logical axis names and ``rules`` give it.

  Raises FileNotFoundError / ValueError with one line for a missing directory, config or
  weights, a config of another model, or weights that do not match the config.
  """
  directory = pathlib.Path(directory).expanduser()
  if not directory.is_dir():
    raise FileNotFoundError(f"autoencoder directory {directory.resolve()} does not exist; "
                            "pass a diffusers AutoencoderKL directory (config.json + "
                            f"{WEIGHTS_NAME}).")
  config = AutoencoderConfig.from_diffusers(hf_checkpoint.read_config(directory), dtype)
  files = weight_files(directory)
  boxed = abstract_params(config)
  shardings = (None if mesh is None
               else sharding.shardings_from_abstract(boxed, mesh, rules))
  params = hf_checkpoint.load_params(param_sources(config), nn.unbox(boxed),
                                     hf_checkpoint.SafetensorsReader(files), shardings,
                                     where=str(directory))
  return PretrainedAutoencoder(AutoencoderKL(config), params, config)


def encode_fn(model: AutoencoderKL, params: Any, *, sample: bool = False):
  """(images [B, H, W, C] in [-1, 1][, key]) -> diffusion latents [B, h, w, latent]
  (scaled); the posterior mean unless ``sample``."""
  cfg = model.config

  def encode(images, key=None):
    mean, logvar = model.apply({"params": params}, images, method="encode")
    z = posterior_sample(key, mean, logvar) if sample else mean
    return to_diffusion(z, cfg.scaling_factor, cfg.shift_factor)
  return encode


def decode_fn(model: AutoencoderKL, params: Any):
  """(diffusion latents [B, h, w, latent]) -> images [B, H, W, C] (about [-1, 1])."""
  cfg = model.config

  def decode(latents):
    z = from_diffusion(latents, cfg.scaling_factor, cfg.shift_factor)
    return model.apply({"params": params}, z, method="decode")
  return decode


def diffusers_config(config: AutoencoderConfig, sample_size: int | None = None) -> dict:
  """The diffusers config.json of ``config`` (what ``from_diffusers`` reads back)."""
  n = len(config.block_out_channels)
  d = {"_class_name": "AutoencoderKL", "act_fn": "silu",
       "down_block_types": ["DownEncoderBlock2D"] * n,
       "up_block_types": ["UpDecoderBlock2D"] * n, "force_upcast": False}
  d.update({k: v for k, v in dataclasses.asdict(config).items() if k != "dtype"})
  d["block_out_channels"] = list(config.block_out_channels)
  if sample_size is not None:
    d["sample_size"] = sample_size
  return d


def save_diffusers(directory: str | pathlib.Path, config: AutoencoderConfig, params: Any,
                   sample_size: int | None = None) -> pathlib.Path:
  """Writes params in diffusers' layout (config.json + diffusion_pytorch_model.safetensors),
  so ``load_diffusers`` and diffusers' ``AutoencoderKL.from_pretrained`` both read them."""
  import json

  from safetensors.numpy import save_file

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  sources = param_sources(config)
  tensors = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":  # inverse of param_sources' transforms
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    tensors[sources[path].names[0]] = np.ascontiguousarray(value)
  save_file(tensors, str(directory / WEIGHTS_NAME))
  (directory / hf_checkpoint.CONFIG_NAME).write_text(
      json.dumps(diffusers_config(config, sample_size), indent=2))
  return directory
