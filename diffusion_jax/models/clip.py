"""CLIP in Flax (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"), loadable from any Hugging Face ``CLIPModel`` checkpoint.

Architecture, as transformers' ``CLIPModel`` (openai/clip-vit-* and the LAION OpenCLIP
conversions share this layout):
  * image tower (ViT, Dosovitskiy et al. 2021): non-overlapping P x P patches projected
    without bias, a learned class token prepended, learned absolute positions, a
    LayerNorm *before* the blocks (HF's ``pre_layrnorm``), pre-LN blocks
    ``x + attn(LN(x))``, ``x + mlp(LN(x))``, then ``post_layernorm`` of the class token;
  * text tower: token + position embeddings, the same pre-LN blocks under a causal mask,
    a final LayerNorm, pooled at the end-of-text token (the first ``eos_token_id``; old
    configs with ``eos_token_id == 2`` take the largest token id, as HF does);
  * ``visual_projection`` / ``text_projection`` (no bias) into a shared space of width
    ``projection_dim`` and a learned ``logit_scale`` (the log of the inverse temperature).
  Feed-forward activation from config.json: ``quick_gelu`` (x sigmoid(1.702 x), OpenAI)
  or ``gelu`` (exact, LAION) among others.

Noise-aware variant (GLIDE, Nichol et al. 2022, sec. 3.3: CLIP guidance needs an image
encoder trained on noised images): with ``CLIPVisionConfig.noise_aware`` the image tower
also takes the log-SNR [B] of its input x_t; a sinusoidal embedding of it through a
two-layer MLP (``layers.NoiseLevelEmbedding``) is added to every token before
``pre_layrnorm``. Its extra tensors are saved under ``vision_model.embeddings.
noise_embedding.*`` (transformers ignores them; the flag lives in config.json's
``vision_config``).

Parameters carry the logical axis names of bert.py / t5.py (``vocab``, ``embed``, ``heads``,
``kv``, ``mlp``, ``norm``; ``positions`` for position tables, ``patch`` / ``channels`` for
the patch kernel [P, P, C, D], neither sharded). Images are NHWC, already normalised
(``CLIP.preprocess`` maps [-1, 1] images to the checkpoint's input statistics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import layers
from diffusion_jax.models.bert import Attention, LayerNorm, Linear
from diffusion_jax.models.hf_checkpoint import Source
from diffusion_jax.models.t5 import _ACTIVATIONS, MASK_BIAS, Projection

Dtype = Any

ACTIVATIONS = {**_ACTIVATIONS, "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}
# The statistics OpenAI's CLIP images are normalised with (HF's CLIPImageProcessor default).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _from_hf(cls, config: Mapping[str, Any]):
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in config.items() if k in fields and v is not None})


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """What both towers share; field names follow HF's CLIPTextConfig / CLIPVisionConfig."""
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"Unsupported CLIP hidden_act {self.hidden_act!r}; supported: "
                       f"{sorted(ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(TowerConfig):
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407

  from_hf = classmethod(_from_hf)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(TowerConfig):
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  noise_aware: bool = False        # ours: the tower also takes log-SNR (GLIDE)
  noise_features: int = 64         # width of the log-SNR sinusoidal features

  def __post_init__(self):
    super().__post_init__()
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIP image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}.")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  from_hf = classmethod(_from_hf)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> CLIPConfig:
    """From a CLIPModel config.json dict; ValueError for another model type."""
    model_type = config.get("model_type")
    if model_type != "clip":
      raise ValueError(f"config.json has model_type {model_type!r}, not 'clip': this is not "
                       "a CLIPModel checkpoint (pass a directory saved from "
                       "transformers.CLIPModel, e.g. openai/clip-vit-base-patch32).")
    text = CLIPTextConfig.from_hf(config.get("text_config") or {})
    vision = CLIPVisionConfig.from_hf(config.get("vision_config") or {})
    extra = {k: config[k] for k in ("projection_dim", "logit_scale_init_value")
             if config.get(k) is not None}
    return cls(text=text, vision=vision, **extra)

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that transformers' CLIPConfig reads back to this architecture."""
    return {"model_type": "clip", "architectures": ["CLIPModel"],
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": {**dataclasses.asdict(self.text), "projection_dim":
                            self.projection_dim, "bos_token_id": 0, "pad_token_id": 1},
            "vision_config": {**dataclasses.asdict(self.vision),
                              "projection_dim": self.projection_dim}}


def _normal(stddev: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN(x), mask), then x + mlp(LN(x)); [B, L, D] -> [B, L, D]."""
  config: TowerConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask_bias: jnp.ndarray) -> jnp.ndarray:
    """mask_bias: additive attention bias broadcasting to [B, H, L, L]."""
    cfg = self.config
    eps, std = cfg.layer_norm_eps, cfg.initializer_range
    # bert.Attention reads only hidden_size, num_attention_heads, head_dim and
    # initializer_range, which TowerConfig has under the same names.
    x = x + Attention(cfg, self.dtype, name="attention")(
        LayerNorm(eps, self.dtype, name="attention_norm")(x), mask_bias)
    h = LayerNorm(eps, self.dtype, name="mlp_norm")(x)
    h = Linear((cfg.intermediate_size,), ("embed", "mlp"), std, self.dtype, name="fc1")(h)
    h = ACTIVATIONS[cfg.hidden_act](h)
    x = x + Linear((cfg.hidden_size,), ("mlp", "embed"), std, self.dtype, name="fc2")(h)
    return nn.with_logical_constraint(x, layers.TOKEN_AXES)


class TextTower(nn.Module):
  """tokens [B, L] int32, mask [B, L] bool -> pooled end-of-text state [B, D]."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    length = tokens.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"text length {length} exceeds this CLIP's max_position_embeddings "
                       f"({cfg.max_position_embeddings}).")
    x = (nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding",
                  embedding_init=_normal(cfg.initializer_range, ("vocab", "embed")))(tokens)
         + self.param("position_embedding", _normal(0.01, ("positions", "embed")),
                      (cfg.max_position_embeddings, cfg.hidden_size))[None, :length])
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal[None, None] & mask[:, None, None, :]
    mask_bias = jnp.where(allowed, 0.0, MASK_BIAS).astype(jnp.float32)
    for i in range(cfg.num_hidden_layers):
      x = EncoderLayer(cfg, self.dtype, name=f"layer_{i}")(x, mask_bias)
    x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_norm")(x)
    if cfg.eos_token_id == 2:  # configs from before HF's fix: EOS has the largest id
      where = jnp.argmax(tokens, axis=-1)
    else:
      where = jnp.argmax(tokens == cfg.eos_token_id, axis=-1)
    return jnp.take_along_axis(x, where[:, None, None], axis=1)[:, 0]


class VisionTower(nn.Module):
  """pixels [B, H, W, C] (normalised), logsnr [B] (noise-aware only) -> pooled [B, D]."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jnp.ndarray, logsnr: jnp.ndarray | None = None) -> jnp.ndarray:
    cfg = self.config
    b, height, width, c = pixels.shape
    p, d = cfg.patch_size, cfg.hidden_size
    if (height, width, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"CLIP image tower expects [B, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.num_channels}] images, got {pixels.shape}.")
    patches = pixels.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, cfg.num_patches, p, p, c)
    kernel = self.param("patch_embedding", _normal(cfg.initializer_range,
                                                   ("patch", "patch", "channels", "embed")),
                        (p, p, c, d))
    x = jnp.tensordot(patches.astype(self.dtype), kernel.astype(self.dtype), axes=3)
    cls = self.param("class_embedding", _normal(cfg.initializer_range, ("embed",)), (d,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + self.param("position_embedding", _normal(0.01, ("positions", "embed")),
                       (cfg.num_patches + 1, d))[None]
    if cfg.noise_aware:
      if logsnr is None:
        raise ValueError("This CLIP's image tower is noise-aware: pass the log-SNR [B] of "
                         "its input (+inf, clipped, for clean images).")
      x = x + layers.NoiseLevelEmbedding(cfg.noise_features, d, self.dtype,
                                         name="noise_embedding")(
          jnp.broadcast_to(logsnr, (b,)))[:, None]
    x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="pre_norm")(x)
    x = nn.with_logical_constraint(x, layers.TOKEN_AXES)
    for i in range(cfg.num_hidden_layers):
      x = EncoderLayer(cfg, self.dtype, name=f"layer_{i}")(x, jnp.zeros((), jnp.float32))
    return LayerNorm(cfg.layer_norm_eps, self.dtype, name="post_norm")(x[:, 0])


class CLIPModel(nn.Module):
  """Both towers and projections. Methods return *unnormalised* embeddings [B, E] (as HF's
  get_image_features / get_text_features); ``__call__`` returns (image, text, logit_scale)."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.text_model = TextTower(cfg.text, self.dtype)
    self.vision_model = VisionTower(cfg.vision, self.dtype)
    # No biases, as in CLIP.
    self.text_projection = Projection((cfg.projection_dim,), ("embed", "mlp"),
                                      cfg.text.hidden_size ** -0.5, self.dtype)
    self.visual_projection = Projection((cfg.projection_dim,), ("embed", "mlp"),
                                        cfg.vision.hidden_size ** -0.5, self.dtype)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.logit_scale_init_value), ()), ())

  def encode_image(self, pixels: jnp.ndarray, logsnr: jnp.ndarray | None = None):
    return self.visual_projection(self.vision_model(pixels, logsnr))

  def encode_text(self, tokens: jnp.ndarray, mask: jnp.ndarray):
    return self.text_projection(self.text_model(tokens, mask))

  def __call__(self, pixels, tokens, mask, logsnr=None):
    return self.encode_image(pixels, logsnr), self.encode_text(tokens, mask), self.logit_scale


# --- HF checkpoint layout -----------------------------------------------------------------
# Each of our params comes from one HF tensor through a pure transpose / reshape; each
# transform is paired with its inverse so trained models are saved in the HF layout too.
Transform = Callable[[np.ndarray], np.ndarray]


def _layout(config: CLIPConfig) -> dict[tuple[str, ...], tuple[str, Transform, Transform]]:
  """Our flattened param path -> (HF tensor name, HF -> ours, ours -> HF)."""
  ident = (lambda x: x, lambda x: x)
  linear = (lambda w: w.T, lambda k: k.T)
  table = {}

  def tower(ours: str, hf: str, cfg: TowerConfig):
    h, k, d = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    qkv = (lambda w: w.T.reshape(d, h, k), lambda x: x.reshape(d, h * k).T)
    qkv_bias = (lambda b: b.reshape(h, k), lambda x: x.reshape(h * k))
    out = (lambda w: w.T.reshape(h, k, d), lambda x: x.reshape(h * k, d).T)

    def norm(ours_path, hf_name):
      table[ours_path + ("scale",)] = (f"{hf_name}.weight", *ident)
      table[ours_path + ("bias",)] = (f"{hf_name}.bias", *ident)

    for i in range(cfg.num_hidden_layers):
      o, hl = (ours, f"layer_{i}"), f"{hf}.encoder.layers.{i}"
      for name, hf_name in [("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")]:
        table[o + ("attention", name, "kernel")] = (f"{hl}.self_attn.{hf_name}.weight", *qkv)
        table[o + ("attention", name, "bias")] = (f"{hl}.self_attn.{hf_name}.bias",
                                                  *qkv_bias)
      table[o + ("attention", "out", "kernel")] = (f"{hl}.self_attn.out_proj.weight", *out)
      table[o + ("attention", "out", "bias")] = (f"{hl}.self_attn.out_proj.bias", *ident)
      norm(o + ("attention_norm",), f"{hl}.layer_norm1")
      norm(o + ("mlp_norm",), f"{hl}.layer_norm2")
      for name in ("fc1", "fc2"):
        table[o + (name, "kernel")] = (f"{hl}.mlp.{name}.weight", *linear)
        table[o + (name, "bias")] = (f"{hl}.mlp.{name}.bias", *ident)
    return norm

  norm = tower("text_model", "text_model", config.text)
  table[("text_model", "token_embedding", "embedding")] = (
      "text_model.embeddings.token_embedding.weight", *ident)
  table[("text_model", "position_embedding")] = (
      "text_model.embeddings.position_embedding.weight", *ident)
  norm(("text_model", "final_norm"), "text_model.final_layer_norm")
  norm = tower("vision_model", "vision_model", config.vision)
  emb = "vision_model.embeddings"
  table[("vision_model", "patch_embedding")] = (  # conv [D, C, P, P] <-> [P, P, C, D]
      f"{emb}.patch_embedding.weight", lambda w: w.transpose(2, 3, 1, 0),
      lambda x: x.transpose(3, 2, 0, 1))
  table[("vision_model", "class_embedding")] = (f"{emb}.class_embedding", *ident)
  table[("vision_model", "position_embedding")] = (f"{emb}.position_embedding.weight", *ident)
  norm(("vision_model", "pre_norm"), "vision_model.pre_layrnorm")  # HF's spelling
  norm(("vision_model", "post_norm"), "vision_model.post_layernorm")
  if config.vision.noise_aware:
    for dense in ("dense_in", "dense_out"):
      path = ("vision_model", "noise_embedding", dense)
      table[path + ("kernel",)] = (f"{emb}.noise_embedding.{dense}.weight", *linear)
      table[path + ("bias",)] = (f"{emb}.noise_embedding.{dense}.bias", *ident)
  for proj in ("text_projection", "visual_projection"):
    table[(proj, "kernel")] = (f"{proj}.weight", *linear)
  table[("logit_scale",)] = ("logit_scale", *ident)
  return table


def param_sources(config: CLIPConfig) -> dict[tuple[str, ...], Source]:
  """Our flattened param paths -> HF PyTorch tensor names and layout changes, for
  ``hf_checkpoint.load_params``. Linear weights [out, in] become kernels [in, out]; q/k/v
  are split into heads ([H*K, D] -> [D, H, K]); the patch conv [D, C, P, P] becomes
  [P, P, C, D]."""
  return {path: Source((name,), forward) for path, (name, forward, _) in
          _layout(config).items()}


def hf_state_dict(config: CLIPConfig, params: Any) -> dict[str, np.ndarray]:
  """Our params -> {HF tensor name: float32 array}, the inverse of ``param_sources``."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(nn.unbox(params))
  layout = _layout(config)
  return {layout[path][0]: np.array(layout[path][2](np.asarray(v, np.float32)), order="C")
          for path, v in flat.items()}


# --- A loaded model: module + params + tokenizer + input statistics -----------------------


@dataclasses.dataclass(frozen=True)
class CLIP:
  """A CLIP ready to use: ``module`` (a CLIPModel), its ``params``, the HF ``tokenizer`` and
  the per-channel ``image_mean`` / ``image_std`` its image tower was trained with."""
  module: CLIPModel
  params: Any
  tokenizer: Any
  image_mean: tuple[float, float, float] = OPENAI_MEAN
  image_std: tuple[float, float, float] = OPENAI_STD

  @property
  def config(self) -> CLIPConfig:
    return self.module.config

  @property
  def noise_aware(self) -> bool:
    return self.config.vision.noise_aware

  def tokenize(self, prompts) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens [B, L] int32, mask [B, L] bool), L = max_position_embeddings."""
    from diffusion_jax.text import check_prompts
    prompts = check_prompts(prompts)
    length = self.config.text.max_position_embeddings
    out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=length,
                         return_attention_mask=True)
    return (np.asarray(out["input_ids"], np.int32).reshape(len(prompts), length),
            np.asarray(out["attention_mask"], bool).reshape(len(prompts), length))

  def preprocess(self, images: jnp.ndarray) -> jnp.ndarray:
    """Images [B, H, W, C] in [-1, 1] -> the image tower's input [B, S, S, C]: resized
    (antialiased, differentiable) to S = image_size, then normalised per channel."""
    size = self.config.vision.image_size
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]),
                                "linear", antialias=True)
    mean, std = jnp.asarray(self.image_mean), jnp.asarray(self.image_std)
    return ((images + 1.0) / 2.0 - mean) / std

  def image_embeddings(self, params: Any, images: jnp.ndarray,
                       logsnr: jnp.ndarray | None = None) -> jnp.ndarray:
    """Unit-norm image embeddings [B, E] of images [B, H, W, C] in [-1, 1] (pure; for a
    noise-aware model ``logsnr`` [B] is x_t's noise level, None meaning clean)."""
    if self.noise_aware and logsnr is None:
      logsnr = jnp.full(images.shape[:1], layers.LOGSNR_CLIP)
    emb = self.module.apply({"params": params}, self.preprocess(images), logsnr,
                            method=CLIPModel.encode_image)
    return normalize(emb)

  def text_embeddings(self, params: Any, tokens: jnp.ndarray,
                      mask: jnp.ndarray) -> jnp.ndarray:
    """Unit-norm text embeddings [B, E] of tokens / mask [B, L] (pure)."""
    emb = self.module.apply({"params": params}, tokens, mask, method=CLIPModel.encode_text)
    return normalize(emb)

  def encode_prompts(self, prompts) -> jnp.ndarray:
    """Unit-norm text embeddings [B, E] of prompts."""
    tokens, mask = self.tokenize(prompts)
    return _text_jit(self.module, self.params, tokens, mask)


def normalize(x: jnp.ndarray) -> jnp.ndarray:
  """x / |x| over the last axis (float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


# Modules compare by value, so CLIPs of one architecture share compiled code.
_text_jit = jax.jit(lambda module, params, tokens, mask: normalize(module.apply(
    {"params": params}, tokens, mask, method=CLIPModel.encode_text)), static_argnums=0)
PREPROCESSOR_NAME = "preprocessor_config.json"


def abstract_params(module: CLIPModel) -> Any:
  """The params' ShapeDtypeStruct tree, boxed with logical names (nothing allocated)."""
  cfg = module.config
  size, c = cfg.vision.image_size, cfg.vision.num_channels
  return jax.eval_shape(module.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, c), jnp.float32),
                        jax.ShapeDtypeStruct((1, 8), jnp.int32),
                        jax.ShapeDtypeStruct((1, 8), bool),
                        jax.ShapeDtypeStruct((1,), jnp.float32))["params"]


class _ScalarReader(Mapping):
  """SafetensorsReader that also reads 0-d tensors (``logit_scale``), which it returns as
  zeros (its memmap path skips empty shapes)."""

  def __init__(self, files):
    from diffusion_jax.models import hf_checkpoint
    self._reader = hf_checkpoint.SafetensorsReader(files)
    self._files = files

  def __getitem__(self, name):
    if self._reader.shape(name):
      return self._reader[name]
    from safetensors import safe_open
    for path in self._files:
      with safe_open(str(path), "np") as f:
        if name in f.keys():
          return np.asarray(f.get_tensor(name))
    raise KeyError(name)

  def __iter__(self):
    return iter(self._reader)

  def __len__(self):
    return len(self._reader)


def load(path_or_id, *, dtype: Any = jnp.float32, mesh=None, rules=None) -> CLIP:
  """A CLIP from a Hugging Face ``CLIPModel`` directory (or cached hub id): config.json,
  model.safetensors (or shards), tokenizer files and optionally preprocessor_config.json.

  On a ``mesh`` every param is placed shard by shard with the logical ``rules``
  (default FSDP). Raises ValueError / FileNotFoundError with one line on bad input (a
  checkpoint of another model type, missing files, mismatched shapes).
  """
  import json

  from diffusion_jax import sharding as sharding_lib
  from diffusion_jax import text as text_lib
  from diffusion_jax.models import hf_checkpoint

  directory = hf_checkpoint.resolve_directory(path_or_id)
  config = CLIPConfig.from_hf(hf_checkpoint.read_config(directory))
  files = hf_checkpoint.weight_files(directory)
  tokenizer = text_lib._load_tokenizer(directory)
  module = CLIPModel(config, jnp.dtype(dtype))
  abstract = abstract_params(module)
  shardings = (sharding_lib.shardings_from_abstract(
      abstract, mesh, rules or sharding_lib.FSDP_RULES) if mesh is not None else None)
  params = hf_checkpoint.load_params(param_sources(config), nn.unbox(abstract),
                                     _ScalarReader(files), shardings,
                                     where=str(directory))
  stats = {}
  if (directory / PREPROCESSOR_NAME).is_file():
    pre = json.loads((directory / PREPROCESSOR_NAME).read_text())
    stats = {k: tuple(float(v) for v in pre[k]) for k in ("image_mean", "image_std")
             if k in pre}
  return CLIP(module, params, tokenizer, **stats)


def save(clip: CLIP, directory, params: Any = None) -> None:
  """Writes ``clip`` (or it with ``params``) as a HF CLIPModel directory: config.json,
  model.safetensors, the tokenizer files and preprocessor_config.json. transformers'
  ``CLIPModel.from_pretrained`` reads it (a noise-aware model's extra tensors aside)."""
  import json
  import pathlib

  from safetensors.numpy import save_file
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  params = clip.params if params is None else params
  (directory / "config.json").write_text(json.dumps(clip.config.to_hf(), indent=2))
  save_file(hf_state_dict(clip.config, jax.device_get(params)),
            str(directory / "model.safetensors"), metadata={"format": "pt"})
  clip.tokenizer.save_pretrained(str(directory))
  (directory / PREPROCESSOR_NAME).write_text(json.dumps(
      {"image_processor_type": "CLIPImageProcessor", "image_mean": list(clip.image_mean),
       "image_std": list(clip.image_std), "size": {"shortest_edge":
                                                   clip.config.vision.image_size},
       "crop_size": {"height": clip.config.vision.image_size,
                     "width": clip.config.vision.image_size}}, indent=2))


def train_tokenizer(texts, vocab_size: int = 1000) -> Any:
  """A transformers ``CLIPTokenizer`` (CLIP's byte-level BPE and pre-tokenizer) with merges
  learned from ``texts``: for a CLIP trained here on a closed vocabulary (the shapes
  captions), where every word of ``texts`` becomes one token. Printable ASCII characters
  also get their end-of-word token, so no ASCII text maps to the unknown token (which is
  <|endoftext|> and would end the caption early). Ids: 0 <|startoftext|>, 1 <|endoftext|>
  (also padding)."""
  from transformers import CLIPTokenizer
  alphabet = [chr(i) for i in range(33, 127)]
  return CLIPTokenizer().train_new_from_iterator(list(texts) + alphabet, vocab_size)
