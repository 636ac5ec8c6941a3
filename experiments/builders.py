"""Config -> library objects, shared by the experiment scripts.

Library code never reads a ConfigDict; this module is where a config becomes keyword
arguments and frozen dataclasses. Every check here runs before anything compiles, and
raises ConfigError with one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import ml_collections

from diffusion_jax import sharding
from diffusion_jax import text as text_lib
from diffusion_jax.diffusion import schedules
from diffusion_jax.models import unet as unet_lib
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib


class UserError(Exception):
  """Something the user can fix (config, missing data or checkpoint); one-line message."""


class ConfigError(UserError, ValueError):
  """A config value is wrong; the message says which and how to fix it."""


RULES = {"fsdp": sharding.FSDP_RULES, "data_parallel": sharding.DATA_PARALLEL_RULES}


def _wrap(what: str, fn, *args, **kwargs):
  try:
    return fn(*args, **kwargs)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{what}: {e}") from None


def unet_config(config: ml_collections.ConfigDict) -> unet_lib.UNetConfig:
  m = config.model
  if m.preset not in unet_lib.PRESETS:
    raise ConfigError(f"config.model.preset={m.preset!r} is not a U-Net preset; choose one "
                      f"of {', '.join(unet_lib.PRESETS)}.")
  if m.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype={m.dtype!r}; use float32 or bfloat16.")
  cfg = dataclasses.replace(unet_lib.PRESETS[m.preset], dtype=m.dtype, remat=m.remat,
                            dropout=m.dropout)
  res = config.data.resolution
  factor = 2 ** (len(cfg.levels) - 1)
  if res % factor:
    raise ConfigError(f"config.data.resolution={res} must divide by {factor} for preset "
                      f"{m.preset!r} ({len(cfg.levels)} levels).")
  low = config.data.lowres_resolution
  if cfg.super_resolution and low is None:
    raise ConfigError(f"preset {m.preset!r} is a super-resolution stage: set "
                      "config.data.lowres_resolution (and config.diffusion.lowres_schedule).")
  if not cfg.super_resolution and low is not None:
    raise ConfigError(f"preset {m.preset!r} is a base stage; unset "
                      "config.data.lowres_resolution or pick a super-resolution preset.")
  return dataclasses.replace(cfg, resolution=res, lowres_resolution=low)


def diffusion_settings(config: ml_collections.ConfigDict) -> step_lib.DiffusionSettings:
  d = config.diffusion
  schedule = _wrap("config.diffusion.schedule", schedules.get, d.schedule,
                   **d.schedule_kwargs.to_dict())
  lowres_schedule = None
  if d.lowres_schedule is not None:
    lowres_schedule = _wrap("config.diffusion.lowres_schedule", schedules.get,
                            d.lowres_schedule)
  elif config.data.lowres_resolution is not None:
    raise ConfigError("A super-resolution stage needs config.diffusion.lowres_schedule "
                      "(e.g. 'shifted_cosine') for noise-conditioning augmentation.")
  return _wrap("config.diffusion", step_lib.DiffusionSettings, schedule=schedule,
               parameterization=d.parameterization, weighting=d.weighting,
               min_snr_gamma=d.min_snr_gamma, sigma_data=d.sigma_data,
               cond_drop_prob=d.cond_drop_prob, lowres_schedule=lowres_schedule,
               lowres_aug_max_t=d.lowres_aug_max_t)


def step_settings(config: ml_collections.ConfigDict) -> step_lib.StepSettings:
  t = config.train
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"config.train.batch_size={t.batch_size} must divide by "
                      f"config.train.grad_accum_steps={t.grad_accum_steps}.")
  return _wrap("config.train", step_lib.StepSettings, diffusion_settings(config),
               ema_decay=t.ema_decay, ema_warmup=t.ema_warmup,
               grad_accum_steps=t.grad_accum_steps)


def optimizer_settings(config: ml_collections.ConfigDict) -> state_lib.OptimizerSettings:
  return _wrap("config.optimizer", state_lib.OptimizerSettings, **config.optimizer.to_dict())


def loop_settings(config: ml_collections.ConfigDict) -> loop_lib.LoopSettings:
  t = config.train
  if config.mesh.rules not in RULES:
    raise ConfigError(f"config.mesh.rules={config.mesh.rules!r}; choose one of "
                      f"{', '.join(RULES)}.")
  return _wrap(
      "config.train", loop_lib.LoopSettings, num_steps=t.num_steps, batch_size=t.batch_size,
      resolution=config.data.resolution, lowres_resolution=config.data.lowres_resolution,
      time_budget_s=t.time_budget_s, seed=t.seed, log_every=t.log_every,
      checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
      max_nonfinite_in_a_row=t.max_nonfinite_in_a_row,
      mesh_axes=(("data", config.mesh.data), ("model", config.mesh.model)),
      rules=RULES[config.mesh.rules], preview_every=t.preview_every,
      preview_prompts=tuple(t.preview_prompts), preview_steps=t.preview_steps,
      preview_guidance_scale=t.preview_guidance_scale)


class CachedTextEncoder:
  """A frozen TextEncoder whose encode() goes through an EmbeddingCache (files on disk,
  each read once, then kept in memory)."""

  def __init__(self, encoder: text_lib.TextEncoder, cache: text_lib.EmbeddingCache):
    self.encoder, self.cache = encoder, cache

  @property
  def encoder_id(self) -> str:
    return self.encoder.encoder_id

  @property
  def width(self) -> int:
    return self.encoder.width

  def encode(self, prompts):
    return self.cache.encode_cached(list(prompts))


def process_local_mesh(config: ml_collections.ConfigDict):
  """A mesh over this process's devices only (the config's model-axis size if it divides
  them), for an encoder that encodes this process's own captions."""
  import jax

  local = jax.local_devices()
  model = config.mesh.model if config.mesh.model > 0 and not len(local) % config.mesh.model \
      else 1
  return sharding.make_mesh({"data": -1, "model": model}, devices=local)


def text_encoder(config: ml_collections.ConfigDict, mesh=None):
  """The configured text encoder, wrapped in its embedding cache if one is set.

  ``mesh``: where its params live. A frozen encoder that the training loop calls on the
  host must be process-local (``process_local_mesh``): every process encodes its own
  captions, which ``TextEncoder.encode`` on a mesh spanning processes cannot do. A
  trainable encoder (``config.text.trainable``) belongs on the training mesh: its params
  join the train state.
  """
  t = config.text
  trainable = bool(t.get("trainable", False))
  cache_dir = t.get("cache_dir")
  if trainable and cache_dir:
    raise ConfigError("config.text.trainable=True trains the encoder, so its embeddings "
                      f"cannot be cached in config.text.cache_dir={cache_dir!r}; unset it "
                      "(--config.text.cache_dir=).")
  try:
    encoder = text_lib.TextEncoder.from_pretrained(t.encoder, max_length=t.max_length,
                                                   mesh=mesh, rules=RULES[config.mesh.rules],
                                                   trainable=trainable)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"config.text.encoder={t.encoder!r}: {e}") from None
  if not cache_dir:  # None, or '' from --config.text.cache_dir=
    return encoder
  return CachedTextEncoder(encoder, text_lib.EmbeddingCache(cache_dir, encoder))


def sampling_text_encoder(configs, workdirs, steps=None):
  """The one frozen text encoder a cascade of training workdirs samples with.

  The configured encoder; or, when a run trained its encoder with its U-Net
  (``config.text.trainable``), that encoder with the EMA params of the run's checkpoint
  (at ``steps[0]``, default the latest) under an id of its own. Such a stage is sampled
  alone: the stages of a cascade share one encoder, and every other stage was trained
  on other embeddings.
  """
  from diffusion_jax.training import loop as loop_lib

  first = configs[0]
  text_config = ml_collections.ConfigDict({
      "text": dict(first.text.to_dict(), cache_dir=None, trainable=False),
      "mesh": first.mesh.to_dict()})
  encoder = text_encoder(text_config)
  trained = [w for w, c in zip(workdirs, configs, strict=True)
             if c.text.get("trainable", False)]
  if not trained:
    return encoder
  if len(workdirs) > 1:
    raise UserError(f"{trained[0]} trained its own text encoder (config.text.trainable=True)"
                    ", but the stages of a cascade share one: sample that stage alone.")
  step = steps[0] if steps else None
  try:
    params, step = loop_lib.restore_text_ema_params(workdirs[0], encoder, step)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  return encoder.with_params(params, f"{encoder.encoder_id}+trained:{workdirs[0]}@{step}")


def dataset_name(config: ml_collections.ConfigDict) -> str:
  """The TFDS name to read; for the built-in shapes dataset, prepared first if missing."""
  d = config.data
  if d.dataset != "shapes":
    return d.dataset
  from diffusion_jax.data import multihost, shapes_tfds

  render = d.shapes_resolution or d.resolution
  if render < d.resolution:
    raise ConfigError(f"config.data.shapes_resolution={render} is smaller than "
                      f"config.data.resolution={d.resolution}; render at least at the "
                      "training resolution (larger, with crop='random', trains on crops).")
  builder = shapes_tfds.shapes_builder(d.data_dir, render, d.shapes_num_train,
                                       max_objects=d.shapes_max_objects)
  name = f"shapes/{builder.builder_config.name}"
  if d.prepare:
    # Every process calls this, prepared or not: process 0 prepares (if needed) while the
    # others wait, then they find it prepared (diffusion_jax.data.multihost).
    multihost.prepare_once(
        lambda: shapes_tfds.prepare_shapes(d.data_dir, render, d.shapes_num_train,
                                           max_objects=d.shapes_max_objects, log=print),
        key=f"{name}@{d.data_dir}")
  elif not builder.is_prepared():
    raise UserError(f"Dataset {name} is not prepared in {d.data_dir}; run "
                    f"{shapes_tfds.prepare_command(d.data_dir, name.split('/', 1)[1])} "
                    "or set config.data.prepare=True.")
  return name


def data_factory(config: ml_collections.ConfigDict):
  """A zero-argument function returning the training input pipeline (checked now)."""
  from diffusion_jax.data import pipeline

  d = config.data
  kwargs = dict(
      dataset=dataset_name(config), data_dir=d.data_dir, split=d.split,
      image_key=d.image_key,
      caption_key=None if d.label_key is not None else d.caption_key,
      label_key=d.label_key, caption_template=d.caption_template,
      resolution=d.resolution, lowres_resolution=d.lowres_resolution, crop=d.crop,
      global_batch_size=config.train.batch_size, seed=config.train.seed, shuffle=True)

  def make():
    return pipeline.InputPipeline(**kwargs)

  try:
    make()  # fail now, with the data's own message, rather than after compiling
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise UserError(f"config.data: {e}") from None
  return make


def dataset_captions(config: ml_collections.ConfigDict) -> list[str] | None:
  """Every caption of the training split when they can be listed cheaply, else None: the
  shapes dataset's (read from its prepared split without decoding images, ~2 s for 20k)
  or a class-label dataset's (its caption template over the label names)."""
  import tensorflow_datasets as tfds

  d = config.data
  if d.label_key is not None:
    builder = tfds.builder(dataset_name(config), data_dir=d.data_dir)
    names = getattr(builder.info.features[d.label_key], "names", None)
    if not names:
      return None
    return [d.caption_template.format(label=n.replace("_", " ")) for n in names]
  if d.dataset != "shapes":
    return None  # an open-ended caption set: encoded (and cached) as batches arrive
  builder = tfds.builder(dataset_name(config), data_dir=d.data_dir)
  source = builder.as_data_source(split=d.split,
                                  decoders={d.image_key: tfds.decode.SkipDecoding()})
  examples = source.__getitems__(range(len(source)))
  captions = (e[d.caption_key] for e in examples)
  return [c.decode() if isinstance(c, bytes) else str(c) for c in captions]


def run_training(config: ml_collections.ConfigDict, workdir: str):
  """Validates the whole config, then trains (resuming from ``workdir`` if possible)."""
  import jax

  from diffusion_jax.training import loop as loop_lib

  dist = config.distributed
  try:
    sharding.maybe_initialize_distributed(dist.coordinator_address, dist.num_processes,
                                          dist.process_id)
  except ValueError as e:
    raise ConfigError(f"config.distributed: {e}.") from None
  model_cfg = unet_config(config)
  steps, optimizer, loop = step_settings(config), optimizer_settings(config), \
      loop_settings(config)
  try:
    loop_lib.check_workdir(workdir)  # before minutes of loading data and the encoder
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    mesh = sharding.make_mesh(dict(loop.mesh_axes))
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  if loop.batch_size % mesh.shape["data"]:
    raise ConfigError(f"config.train.batch_size={loop.batch_size} must divide by the "
                      f"mesh's data axis ({mesh.shape['data']} devices).")
  trainable = bool(config.text.trainable)
  encoder = text_encoder(config, mesh if trainable else process_local_mesh(config))
  factory = data_factory(config)
  if isinstance(encoder, CachedTextEncoder):
    captions = dataset_captions(config)
    if captions:
      # Each process fills its share; on a shared cache_dir that is all of them, and the
      # rest of a local one is filled as batches arrive.
      mine = captions[jax.process_index()::jax.process_count()]
      new = encoder.cache.precompute(mine)
      print(f"Text embedding cache {config.text.cache_dir}: {len(set(mine))} captions, "
            f"{new} newly encoded.", flush=True)
  try:
    return loop_lib.train(
        workdir, model=unet_lib.UNet(model_cfg), loop=loop, step_settings=steps,
        optimizer=optimizer, data_factory=factory, text_encoder=encoder,
        config_json=config.to_dict())
  except loop_lib.NonFiniteError as e:
    raise UserError(str(e)) from None


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise UserError(f"{path} not found: {workdir} is not a training workdir (train a stage "
                    "with experiments/train.py --workdir=...).")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def workdir_stage_spec(workdir: str, config: ml_collections.ConfigDict,
                       previous_resolution: int | None, **spec_overrides):
  """(UNetConfig, StageSpec) of a training workdir's stage, checked against the stage
  before it (``previous_resolution``, None for the first stage) without reading params.

  A super-resolution stage samples at its trained resolution and must follow a stage
  that samples at its trained ``lowres_resolution``: the U-Net would silently resize any
  other low-res size. A stage trained on random crops (``config.data.crop='random'``,
  Imagen's 1024 px stage) is applied fully convolutionally instead, at
  ``previous_resolution`` times its trained scale factor.
  """
  from diffusion_jax import cascade

  model_cfg = unet_config(config)
  d = config.diffusion
  resolution = config.data.resolution
  crops = model_cfg.super_resolution and config.data.get("crop", "center") == "random"
  if model_cfg.super_resolution:
    if previous_resolution is None:
      raise UserError(f"{workdir} is a super-resolution stage, but the first stage of a "
                      "cascade must be a base stage: list the base stage's workdir first.")
    if crops:
      resolution = previous_resolution * resolution // config.data.lowres_resolution
    error = cascade.chain_error(previous_resolution, resolution,
                                config.data.lowres_resolution, config.data.resolution, crops)
    if error:
      raise UserError(f"{workdir} does not chain with the stage before it: {error}")
  elif previous_resolution is not None:
    raise UserError(f"{workdir} is a base (text-to-image) stage; every stage after the "
                    "first must be a super-resolution stage.")
  spec_kwargs = dict(resolution=resolution, parameterization=d.parameterization,
                     schedule=d.schedule,
                     schedule_kwargs=tuple(sorted(d.schedule_kwargs.to_dict().items())),
                     lowres_schedule=d.lowres_schedule, trained_on_crops=crops)
  spec_kwargs.update({k: v for k, v in spec_overrides.items() if v is not None})
  return model_cfg, _wrap(f"sampling settings of {workdir}", cascade.StageSpec,
                          **spec_kwargs)


def training_stage(workdir: str, text_width: int, previous_resolution: int | None = None,
                   step: int | None = None, **spec_overrides):
  """(cascade Stage, config, step loaded) from a training workdir: its config.json and
  the EMA params of its latest checkpoint, or of checkpoint ``step``.

  ``previous_resolution``: what the stage before samples at (None: this is the first
  stage); see ``workdir_stage_spec``. ``spec_overrides`` (None values ignored) change
  sampling settings: sampler, num_steps, guidance_scale, threshold, percentile, aug_level.
  """
  from diffusion_jax import cascade
  from diffusion_jax.training import checkpoint as ckpt_lib
  from diffusion_jax.training import loop as loop_lib

  config = load_workdir_config(workdir)
  model_cfg, spec = workdir_stage_spec(workdir, config, previous_resolution,
                                       **spec_overrides)
  if step is not None:
    checkpointer = ckpt_lib.Checkpointer(workdir)
    try:
      available = sorted(checkpointer.all_steps())
    finally:
      checkpointer.close()
    if step not in available:
      raise UserError(f"{workdir} has no checkpoint at step {step}; it has steps "
                      f"{available or 'none'} (fix --checkpoint_steps).")
  model = unet_lib.UNet(model_cfg)
  try:
    params, step = loop_lib.restore_ema_params(
        workdir, model=model, optimizer=optimizer_settings(config),
        loop=loop_settings(config), text_len=config.text.max_length, text_dim=text_width,
        step=step)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  return cascade.Stage(model, params, spec), config, step


def load_cascade(workdirs=(), exported=(), *, checkpoint_steps=None, per_stage=None,
                 **spec_overrides):
  """(Cascade, description per stage, text-encoder description) from training workdirs or
  exported stage directories.

  ``checkpoint_steps``: one step (or None: the latest) per workdir. ``per_stage``: one
  dict of spec overrides per stage, applied over ``spec_overrides`` (None values are
  ignored). Everything that can be checked without params (stage order, resolutions
  chaining, settings) is checked before any checkpoint is read.
  """
  from diffusion_jax import cascade

  if bool(workdirs) == bool(exported):
    raise UserError("Give the stages either as --workdirs (training runs) or as --stages "
                    "(exported), base stage first.")
  sources = list(workdirs or exported)
  per_stage = list(per_stage) if per_stage is not None else [{}] * len(sources)
  if len(per_stage) != len(sources):
    raise UserError(f"{len(per_stage)} per-stage settings for {len(sources)} stages.")
  overrides = [{**spec_overrides, **{k: v for k, v in own.items() if v is not None}}
               for own in per_stage]
  if checkpoint_steps is not None and (exported or len(checkpoint_steps) != len(workdirs)):
    raise UserError("--checkpoint_steps needs one step per --workdirs entry "
                    f"({len(workdirs)}), got {len(checkpoint_steps)}"
                    f"{' (exported --stages hold one set of params each)' if exported else ''}.")
  steps = list(checkpoint_steps) if checkpoint_steps is not None else [None] * len(sources)
  stages, described, encoder, encoder_ids = [], [], None, set()
  if workdirs:
    configs = [load_workdir_config(w) for w in workdirs]
    previous = None
    for workdir, config, own in zip(workdirs, configs, overrides, strict=True):
      previous = workdir_stage_spec(workdir, config, previous, **own)[1].resolution
    texts = {(c.text.encoder, c.text.max_length) for c in configs}
    if len(texts) > 1:
      raise UserError(f"The stages were trained with different text encoders {sorted(texts)};"
                      " a cascade needs one.")
    encoder = sampling_text_encoder(configs, workdirs, checkpoint_steps)
    text_meta = {"encoder": configs[0].text.encoder, "max_length": configs[0].text.max_length,
                 "id": encoder.encoder_id}
    previous = None
    for workdir, own, step in zip(workdirs, overrides, steps, strict=True):
      stage, _, step = training_stage(workdir, encoder.width, previous, step, **own)
      previous = stage.spec.resolution
      stages.append(stage)
      described.append({"source": str(workdir), "step": step, **stage.spec.to_json()})
  else:
    for directory, own in zip(exported, overrides, strict=True):
      try:
        stage, text_meta = cascade.load_exported_stage(directory)
      except FileNotFoundError as e:
        raise UserError(str(e)) from None
      stage = _wrap(f"sampling settings of {directory}", cascade.replace_spec, stage, **own)
      encoder_ids.add(json.dumps(text_meta, sort_keys=True))
      stages.append(stage)
      described.append({"source": str(directory), **stage.spec.to_json()})
    if len(encoder_ids) > 1:
      raise UserError(f"The stages use different text encoders {sorted(encoder_ids)}.")
    text_meta = json.loads(encoder_ids.pop())
    try:
      encoder = text_lib.TextEncoder.from_pretrained(text_meta["encoder"],
                                                     max_length=text_meta["max_length"])
    except (FileNotFoundError, ValueError) as e:
      raise UserError(f"text encoder {text_meta['encoder']!r} of the exported stages: "
                      f"{e}") from None
    if encoder.encoder_id != text_meta["id"]:
      raise UserError(f"The exported stages were made with text encoder {text_meta['id']!r},"
                      f" but {text_meta['encoder']!r} now loads as {encoder.encoder_id!r}.")
  try:
    return cascade.Cascade(stages, encoder), described, text_meta
  except ValueError as e:
    raise UserError(str(e)) from None


def read_prompts(prompts, prompts_file) -> list[str]:
  prompts = list(prompts)
  if prompts_file:
    path = pathlib.Path(prompts_file)
    if not path.exists():
      raise UserError(f"--prompts_file {path} does not exist.")
    if not path.is_file():
      raise UserError(f"--prompts_file {path} is not a file; give a text file with one "
                      "prompt per line.")
    from_file = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not from_file and not prompts:
      raise UserError(f"--prompts_file {path} holds no prompts (blank lines are skipped); "
                      "write one prompt per line.")
    prompts += from_file
  if not prompts:
    raise UserError("No prompts: pass --prompts=... (repeatable) or --prompts_file=FILE.")
  return prompts


def per_stage_values(flag: str, values, count: int, parse=float, what: str = "stage"):
  """A flag's values as a list of ``count`` (one value is repeated), each parsed."""
  if values is None or isinstance(values, (str, int, float)):
    values = [] if values is None else [values]
  values = [v for v in values if str(v).strip() != ""]
  if not values:
    return [None] * count
  if len(values) not in (1, count):
    allowed = "1 value" if count == 1 else f"1 or {count} values"
    raise UserError(f"{flag} needs {allowed} (one per {what}), got {len(values)}: "
                    f"{','.join(map(str, values))}.")
  try:
    parsed = [parse(v) for v in values]
  except ValueError:
    raise UserError(f"{flag}={','.join(map(str, values))}: not a list of numbers.") from None
  return parsed * count if len(parsed) == 1 else parsed


def run_sampling(flags_values) -> pathlib.Path:
  """experiments/sample.py's work, from its absl flag values. Every flag is checked before
  a checkpoint is read or anything compiles."""
  import shlex

  import jax

  from diffusion_jax import cascade as cascade_lib
  from diffusion_jax import images

  f = flags_values
  prompts = read_prompts(f.prompts, f.prompts_file)
  if f.first_index < 0:
    raise UserError(f"--first_index={f.first_index}; it must be >= 0 (the index of the "
                    "first prompt's image in the run).")
  if bool(f.workdirs) == bool(f.stages):
    raise UserError("Give the stages either as --workdirs (training runs) or as --stages "
                    "(exported), base stage first.")
  num_stages = len(f.workdirs or f.stages)
  scales = per_stage_values("--guidance_scale", f.guidance_scale, num_stages)
  aug_levels = [None]
  if f.aug_level:
    if num_stages == 1:
      raise UserError("--aug_level is the low-res augmentation of super-resolution stages, "
                      "and this cascade has none.")
    aug_levels += per_stage_values("--aug_level", f.aug_level, num_stages - 1,
                                   what="super-resolution stage")
  else:
    aug_levels *= num_stages
  checkpoint_steps = getattr(f, "checkpoint_steps", None)  # (experiments/demo.py has none)
  if checkpoint_steps:
    if f.stages:
      raise UserError("--checkpoint_steps picks checkpoints of --workdirs; exported --stages "
                      "hold one set of params each.")
    checkpoint_steps = per_stage_values(
        "--checkpoint_steps", checkpoint_steps, len(f.workdirs), what="workdir",
        parse=lambda v: None if v == "latest" else int(v))
  else:
    checkpoint_steps = None
  per_stage = [dict(guidance_scale=w, aug_level=a)
               for w, a in zip(scales, aug_levels, strict=True)]
  overrides = dict(sampler=f.sampler, num_steps=f.steps, threshold=f.threshold,
                   percentile=f.percentile)
  cascade, described, text_meta = load_cascade(
      f.workdirs, f.stages, checkpoint_steps=checkpoint_steps, per_stage=per_stage,
      **overrides)
  outdir = pathlib.Path(f.outdir)
  (outdir / "images").mkdir(parents=True, exist_ok=True)
  if f.export_dir:
    for i, stage in enumerate(cascade.stages):
      cascade_lib.export_stage(stage, pathlib.Path(f.export_dir) / f"stage_{i + 1}",
                               text_meta)
  outputs = cascade.sample(prompts, jax.random.key(f.seed), first_index=f.first_index,
                           progress=lambda msg: print(msg, flush=True))
  written = []
  for spec, stage_images in zip(described, outputs, strict=True):
    res = spec["resolution"]
    grid = images.make_grid(stage_images, prompts, columns=min(4, len(prompts)),
                            scale=max(1, 128 // res))
    written.append(images.save_png(grid, outdir / f"stage{len(written) + 1}_{res}px.png"))
    for b, image in enumerate(images.to_uint8(stage_images)):
      images.save_png(image, outdir / "images" / f"{f.first_index + b:04d}_{res}px.png")
  # The command that regenerates image i alone: the loaded checkpoints pinned by step (so
  # it still holds after training continues) and every resolved per-stage setting.
  command = ["python", "experiments/sample.py"]
  if f.workdirs:
    command += [f"--workdirs={','.join(f.workdirs)}",
                f"--checkpoint_steps={','.join(str(d['step']) for d in described)}"]
  else:
    command += [f"--stages={','.join(f.stages)}"]
  command += [f"--seed={f.seed}",
              f"--guidance_scale={','.join(str(d['guidance_scale']) for d in described)}"]
  if len(described) > 1:
    command += [f"--aug_level={','.join(str(d['aug_level']) for d in described[1:])}"]
  for flag, value in (("sampler", f.sampler), ("steps", f.steps), ("threshold", f.threshold),
                      ("percentile", f.percentile)):
    if value is not None:
      command.append(f"--{flag}={value}")
  record = {
      "prompts": prompts, "seed": f.seed, "first_index": f.first_index, "stages": described,
      "text_encoder": cascade.text_encoder.encoder_id,
      "checkpoint_steps": [d.get("step") for d in described],
      "regenerate": shlex.join(command) + " --prompts=<prompt i> --first_index=<i> "
                    "--outdir=<dir>",
  }
  (outdir / "samples.json").write_text(json.dumps(record, indent=2))
  print("wrote " + ", ".join(str(p) for p in written) + f" and {outdir / 'samples.json'}")
  return written[-1]


def setup_compilation_cache() -> None:
  """A persistent XLA compilation cache (repo/.cache/jax unless JAX_COMPILATION_CACHE_DIR
  is set), so re-running an experiment does not recompile."""
  import os

  import jax

  root = pathlib.Path(__file__).resolve().parent.parent
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(root / ".cache" / "jax")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
