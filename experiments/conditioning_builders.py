"""``config.conditioning`` (and ``config.data.aspect_buckets``) -> the stage's conditions
(diffusion_jax/conditioning.py) and the U-Net inputs they need. ``conditions`` validates
without loading anything (run_training calls it, through ``stage_unet_config``, before the
workdir lock); ``stage_unet_config`` gives the U-Net its inputs
(latent_builders.stage_unet_config calls it, so training and sampling agree);
``for_training`` attaches the conditions to the step settings, loading what must be
loaded (an image embedding's frozen encoder)."""

from __future__ import annotations

import dataclasses

import ml_collections
from builders import ConfigError

from diffusion_jax import conditioning

KINDS = ("none", "input_image", "masked_image", "image_embed")


def _section(config: ml_collections.ConfigDict):
  return config.get("conditioning")  # None in config.json files written before it


def kind(config: ml_collections.ConfigDict) -> str:
  c = _section(config)
  name = "none" if c is None else c.kind
  if name not in KINDS:
    raise ConfigError(f"config.conditioning.kind={name!r}; choose one of {', '.join(KINDS)}.")
  return name


def conditions(config: ml_collections.ConfigDict, channels: int = 3) -> tuple:
  """The conditions ``config.conditioning`` describes for images of ``channels``
  channels (the U-Net's in_channels: a latent's for latent stages), without loading
  anything (an image embedding has no encoder yet: ``for_training`` adds it)."""
  name = kind(config)
  c = _section(config)
  micro = ()
  if c is not None and c.get("micro", False):
    if config.data.crop != "random_rescale":
      raise ConfigError("config.conditioning.micro=True conditions on each training crop's "
                        "size and offsets: set config.data.crop='random_rescale'.")
    micro = (conditioning.MicroConditioning(),)
  buckets = aspect_buckets(config)
  if buckets and name == "image_embed":
    raise ConfigError("config.data.aspect_buckets with config.conditioning.kind='image_embed'"
                      ": the CLIP image tower embeds square images; unset one of them.")
  target = (conditioning.TargetSize(buckets),) if buckets else ()
  return _kind_conditions(config, name, channels) + micro + target


def aspect_buckets(config: ml_collections.ConfigDict) -> tuple:
  """``config.data.aspect_buckets`` checked ((height, width) pairs; () when off), but for
  the U-Net's divisor (``stage_unet_config`` checks it), and ``bucket_weights`` with it."""
  from diffusion_jax.data import buckets as buckets_lib

  d = config.get("data")
  raw = (d.get("aspect_buckets") if d else None) or ()  # (older configs: no such field)
  if not raw:
    return ()
  if d.dataset != "shapes":
    raise ConfigError(f"config.data.aspect_buckets renders each batch's scenes at its bucket "
                      f"(the shapes dataset), so it needs config.data.dataset='shapes', not "
                      f"{d.dataset!r}.")
  if d.lowres_resolution is not None:
    raise ConfigError("config.data.aspect_buckets is for base stages; unset "
                      "config.data.lowres_resolution or the buckets.")
  if d.crop not in buckets_lib.CROPS:
    raise ConfigError(f"config.data.aspect_buckets renders every bucket whole: use "
                      f"config.data.crop {' or '.join(map(repr, buckets_lib.CROPS))} (SDXL's "
                      f"crops), not {d.crop!r}.")
  try:
    checked = buckets_lib.check_buckets(raw, d.resolution)
  except ValueError as e:
    raise ConfigError(f"config.data.aspect_buckets: {e}") from None
  try:
    buckets_lib.bucket_probabilities(d.get("bucket_weights"), len(checked))
  except ValueError as e:
    raise ConfigError(f"config.data.bucket_weights: {e}") from None
  return checked


def _kind_conditions(config, name: str, channels: int) -> tuple:
  if name == "none":
    return ()
  c = _section(config)
  drop = {} if c.drop_prob is None else {"drop_prob": c.drop_prob}
  if name == "image_embed":  # (its own one-line ConfigError, outside the wrapping below)
    embed_dim = c.embed_dim if c.embed_dim is not None else clip_embed_dim(c.clip_dir)
  try:
    if name == "input_image":
      return (conditioning.InputImage(channels=channels, **drop),)
    if name == "masked_image":
      return (conditioning.MaskedImage(channels=channels, min_fraction=c.mask_min_fraction,
                                       max_fraction=c.mask_max_fraction,
                                       full_prob=c.mask_full_prob, **drop),)
    return (conditioning.ImageEmbedding(dim=embed_dim, source=c.clip_dir, **drop),)
  except ValueError as e:
    raise ConfigError(f"config.conditioning: {e}") from None


def stage_unet_config(config: ml_collections.ConfigDict, unet_cfg, latent: bool = False):
  """``unet_cfg`` with the inputs its conditions need (cond_image_channels,
  image_embed_dim); ``latent``: the stage diffuses in an autoencoder's latents."""
  if latent and kind(config) == "input_image":
    raise ConfigError("config.conditioning.kind='input_image' needs a pixel stage: the "
                      "dataset's input images are pixels (unset config.autoencoder.directory "
                      "or use masked_image).")
  buckets = aspect_buckets(config)
  if buckets:  # each side must survive the autoencoder (latent) and every U-Net level
    f = config.data.resolution // unet_cfg.resolution
    levels = len(unet_cfg.levels)
    why = f"the U-Net's {levels} levels halve it {levels - 1} times" + (
        f" after the autoencoder's {f}x" if latent else "")
    from diffusion_jax.data import buckets as buckets_lib
    try:
      buckets_lib.check_buckets(buckets, config.data.resolution, f * 2 ** (levels - 1))
    except ValueError as e:
      raise ConfigError(f"config.data.aspect_buckets: {str(e).rstrip('.')} ({why}).") from None
  fields = conditioning.unet_requirements(conditions(config, unet_cfg.in_channels))
  if all(getattr(unet_cfg, k) == v for k, v in fields.items()):
    return unet_cfg  # (a text-only stage: the very config it was given)
  return dataclasses.replace(unet_cfg, **fields)


def clip_embed_dim(clip_dir) -> int:
  """The projection width of the CLIP in ``clip_dir`` (a train_clip workdir or a Hugging
  Face CLIPModel directory), read from its config.json alone (no weights)."""
  import json

  from diffusion_jax import unclip
  from diffusion_jax.models import clip as clip_lib

  if not clip_dir:
    raise ConfigError("config.conditioning.kind='image_embed' needs "
                      "config.conditioning.clip_dir: the frozen CLIP whose image embeddings "
                      "condition the stage (experiments/train_clip.py's workdir, or a Hugging "
                      "Face CLIPModel directory; config.conditioning.embed_dim, its "
                      "projection width, is read from it when unset).")
  try:
    path = unclip.clip_directory(clip_dir) / "config.json"
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found: not a CLIPModel directory.")
    return clip_lib.CLIPConfig.from_hf(json.loads(path.read_text())).projection_dim
  except (FileNotFoundError, ValueError, OSError) as e:
    raise ConfigError(f"config.conditioning.clip_dir={clip_dir}: {e}") from None


def image_embed_encoder(config: ml_collections.ConfigDict, mesh=None):
  """The frozen image encoder of an ``image_embed`` stage: a jitted CLIP image tower,
  images [B, H, W, C] in [-1, 1] -> unit-norm [B, embed_dim] (``unclip.ImageEmbedder``:
  the space the unCLIP prior samples in). ``mesh`` is unused: the tower's params are
  small and replicated; its output keeps the batch's sharding."""
  del mesh
  from diffusion_jax import unclip

  c = _section(config)
  dim = conditions(config)[0].dim  # checks clip_dir and embed_dim without loading weights
  if not c.clip_dir:  # (embed_dim given, so conditions() did not need it)
    clip_embed_dim(c.clip_dir)  # raises its one-line ConfigError
  try:
    clip, directory = unclip.load_clip(c.clip_dir)
  except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as e:
    raise ConfigError(f"config.conditioning.clip_dir={c.clip_dir}: {e}") from None
  if clip.config.projection_dim != dim:
    raise ConfigError(f"config.conditioning.embed_dim={dim}, but the CLIP in {directory} "
                      f"embeds into {clip.config.projection_dim} dimensions; unset embed_dim "
                      "(it defaults to the CLIP's) or fix it.")
  return unclip.ImageEmbedder(clip, directory)


def for_training(config: ml_collections.ConfigDict, steps, unet_cfg, mesh=None):
  """``steps`` (StepSettings) with the conditions of a stage whose U-Net is ``unet_cfg``
  attached, encoders loaded."""
  conds = conditions(config, unet_cfg.in_channels)
  loaded = []
  for condition in conds:
    if isinstance(condition, conditioning.ImageEmbedding) and condition.encoder is None:
      condition = dataclasses.replace(condition, encoder=image_embed_encoder(config, mesh))
    loaded.append(condition)
  diffusion = dataclasses.replace(steps.diffusion, conditions=tuple(loaded))
  return dataclasses.replace(steps, diffusion=diffusion)
