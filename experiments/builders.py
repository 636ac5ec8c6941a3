"""Config -> library objects for training, shared by the experiment scripts (sampling's
side, training workdirs -> a cascade, is experiments/sampling.py).

Library code never reads a ConfigDict; this module is where a config becomes keyword
arguments and frozen dataclasses. Every check here runs before anything compiles, and
raises ConfigError with one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections
from cli import UserError  # noqa: F401  (one UserError for every script; re-exported)

from diffusion_jax import sharding
from diffusion_jax import text as text_lib
from diffusion_jax.diffusion import noise_levels, preconditioning, schedules
from diffusion_jax.models import fast_conv
from diffusion_jax.models import unet as unet_lib
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib


class ConfigError(UserError, ValueError):
  """A config value is wrong; the message says which and how to fix it."""


RULES = {"fsdp": sharding.FSDP_RULES, "data_parallel": sharding.DATA_PARALLEL_RULES}


def checked(what: str, fn, *args, **kwargs):
  """fn(*args, **kwargs), its ValueError / TypeError turned into a ConfigError about `what`."""
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
  conv_impl = m.get("conv_impl", "xla")  # configs stored before the field: the default
  if conv_impl not in fast_conv.IMPLS:
    raise ConfigError(f"config.model.conv_impl={conv_impl!r}; use one of "
                      f"{', '.join(fast_conv.IMPLS)}.")
  cfg = dataclasses.replace(unet_lib.PRESETS[m.preset], dtype=m.dtype, remat=m.remat,
                            dropout=m.dropout, conv_impl=conv_impl)
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


def schedule_arguments(diffusion: ml_collections.ConfigDict, field: str = "schedule") -> dict:
  """The keyword arguments of the schedule ``config.diffusion.<field>`` names, from
  ``config.diffusion.<field>_kwargs``: one sub-dict per schedule (configs/common.py), so
  switching schedules never carries another schedule's arguments along. A flat dict (the
  chosen schedule's own arguments: config.json files written before) is taken as is."""
  kwargs = diffusion.get(f"{field}_kwargs")
  kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs or {})
  name = diffusion.get(field)
  if isinstance(kwargs.get(name), dict):
    return dict(kwargs[name])
  if any(isinstance(v, dict) for v in kwargs.values()):
    return {}  # per-schedule, but not for this name: schedules.get names the known ones
  return kwargs


def diffusion_settings(config: ml_collections.ConfigDict) -> step_lib.DiffusionSettings:
  d = config.diffusion
  schedule = checked(f"config.diffusion.schedule={d.schedule!r}", schedules.get, d.schedule,
                     **schedule_arguments(d))
  lowres_schedule = None
  if d.lowres_schedule is not None:
    lowres_schedule = checked(f"config.diffusion.lowres_schedule={d.lowres_schedule!r}",
                              schedules.get, d.lowres_schedule,
                              **schedule_arguments(d, "lowres_schedule"))
  elif config.data.lowres_resolution is not None:
    raise ConfigError("A super-resolution stage needs config.diffusion.lowres_schedule "
                      "(e.g. 'shifted_cosine') for noise-conditioning augmentation.")
  precond, noise_sampler = edm_settings(config, schedule)
  return checked("config.diffusion", step_lib.DiffusionSettings, schedule=schedule,
               parameterization=d.parameterization, weighting=d.weighting,
               min_snr_gamma=d.min_snr_gamma, sigma_data=d.sigma_data,
               cond_drop_prob=d.cond_drop_prob, lowres_schedule=lowres_schedule,
               lowres_aug_max_t=d.lowres_aug_max_t, noise_sampler=noise_sampler,
               preconditioning=precond)


def edm_settings(config: ml_collections.ConfigDict, schedule):
  """(preconditioning or None, noise-level sampler) of config.diffusion."""
  d = config.diffusion
  precond = checked("config.diffusion.preconditioning", preconditioning.get,
                    d.preconditioning, d.sigma_data)
  if precond is not None and d.parameterization != "x0":
    raise ConfigError(f"config.diffusion.preconditioning='edm' makes the model output the "
                      f"denoised image, so it needs config.diffusion.parameterization='x0' "
                      f"(not {d.parameterization!r}); the paper's loss also sets "
                      "weighting='edm' and noise_sampling='edm_lognormal'.")
  sampler = checked("config.diffusion.noise_sampling", noise_levels.get, d.noise_sampling,
                    schedule, p_mean=d.p_mean, p_std=d.p_std)
  return precond, sampler


def step_settings(config: ml_collections.ConfigDict) -> step_lib.StepSettings:
  t = config.train
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"config.train.batch_size={t.batch_size} must divide by "
                      f"config.train.grad_accum_steps={t.grad_accum_steps}.")
  return checked("config.train", step_lib.StepSettings, diffusion_settings(config),
               ema_decay=t.ema_decay, ema_warmup=t.ema_warmup,
               grad_accum_steps=t.grad_accum_steps)


def optimizer_settings(config: ml_collections.ConfigDict) -> state_lib.OptimizerSettings:
  return checked("config.optimizer", state_lib.OptimizerSettings, **config.optimizer.to_dict())


def loop_settings(config: ml_collections.ConfigDict) -> loop_lib.LoopSettings:
  t = config.train
  if config.mesh.rules not in RULES:
    raise ConfigError(f"config.mesh.rules={config.mesh.rules!r}; choose one of "
                      f"{', '.join(RULES)}.")
  return checked(
      "config.train", loop_lib.LoopSettings, num_steps=t.num_steps, batch_size=t.batch_size,
      resolution=config.data.resolution, lowres_resolution=config.data.lowres_resolution,
      time_budget_s=t.time_budget_s, seed=t.seed, log_every=t.log_every,
      checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
      max_nonfinite_in_a_row=t.max_nonfinite_in_a_row,
      mesh_axes=(("data", config.mesh.data), ("model", config.mesh.model)),
      rules=RULES[config.mesh.rules], preview_every=t.preview_every,
      preview_prompts=tuple(t.preview_prompts), preview_steps=t.preview_steps,
      preview_guidance_scale=t.preview_guidance_scale,
      allow_data_restart=t.get("allow_data_restart", False),
      recover_from_intact=t.get("recover_from_intact", False),
      # (workdirs written before config.eval existed have none)
      eval_every=config.eval.every if config.get("eval") is not None else 0)


def resume_rules():
  """What a resumed run may change (configs/common.py: MAY_CHANGE_ON_RESUME)."""
  from configs import common
  from diffusion_jax.training import resume

  return resume.ResumeRules(may_change=common.MAY_CHANGE_ON_RESUME,
                            compared_whole=common.COMPARED_WHOLE_ON_RESUME,
                            defaults=common.get_config().to_dict())


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


def shapes_single_size(config: ml_collections.ConfigDict) -> str | None:
  """``config.data.shapes_single_size`` checked: "small", "large", or None for either size
  ("any" also means None: a command line cannot set a str field to None)."""
  from diffusion_jax.data import shapes

  single_size = config.data.get("shapes_single_size")
  if single_size in (None, "any"):
    return None
  if single_size not in shapes.SIZES:
    raise ConfigError(f"config.data.shapes_single_size={single_size!r}: use one of "
                      f"{', '.join(repr(s) for s in shapes.SIZES)}, or 'any' / None for "
                      "either size.")
  return single_size


def dataset_name(config: ml_collections.ConfigDict) -> str:
  """The TFDS name to read; for the built-in shapes dataset, prepared first if missing."""
  d = config.data
  import instruct_builders  # the edit pairs an InstructPix2Pix stage trains on

  if d.dataset == instruct_builders.DATASET:
    return instruct_builders.dataset_name(config)
  if d.dataset != "shapes":
    return real_dataset_name(config) if _is_real_dataset(d.dataset) else d.dataset
  from diffusion_jax.data import multihost, shapes_tfds

  render = d.shapes_resolution or d.resolution
  if render < d.resolution:
    raise ConfigError(f"config.data.shapes_resolution={render} is smaller than "
                      f"config.data.resolution={d.resolution}; render at least at the "
                      "training resolution (larger, with crop='random', trains on crops).")
  single_size = shapes_single_size(config)
  builder = shapes_tfds.shapes_builder(d.data_dir, render, d.shapes_num_train,
                                       max_objects=d.shapes_max_objects, single_size=single_size)
  name = f"shapes/{builder.builder_config.name}"
  if d.prepare:
    # Every process calls this, prepared or not: process 0 prepares (if needed) while the
    # others wait, then they find it prepared (diffusion_jax.data.multihost).
    multihost.prepare_once(
        lambda: shapes_tfds.prepare_shapes(d.data_dir, render, d.shapes_num_train,
                                           max_objects=d.shapes_max_objects, log=print,
                                           single_size=single_size),
        key=f"{name}@{d.data_dir}")
  elif not builder.is_prepared():
    raise UserError(f"Dataset {name} is not prepared in {d.data_dir}; run "
                    f"{shapes_tfds.prepare_command(d.data_dir, name.split('/', 1)[1])} "
                    "or set config.data.prepare=True.")
  return name


def _is_real_dataset(dataset: str) -> bool:
  from diffusion_jax.data import real_tfds

  return real_tfds.is_real_dataset(dataset)


def real_dataset_name(config: ml_collections.ConfigDict) -> str:
  """A real-data set (diffusion_jax.data.real_tfds), prepared first from the installed
  packages' files (or config.data.source_dir) if missing and config.data.prepare."""
  from diffusion_jax.data import multihost, real_tfds

  d = config.data
  try:
    builder = real_tfds.real_builder(d.dataset, d.data_dir, d.source_dir)
    name = f"{builder.name}/{builder.builder_config.name}"
    if d.prepare:  # every process calls this; process 0 prepares (see dataset_name)
      multihost.prepare_once(lambda: real_tfds.prepare(name, d.data_dir, d.source_dir, log=print),
                             key=f"{name}@{d.data_dir}")
    elif not builder.is_prepared():
      raise UserError(f"Dataset {name} is not prepared in {d.data_dir}; run "
                      f"{real_tfds.prepare_command(d.data_dir, name)} or set "
                      "config.data.prepare=True.")
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"config.data.dataset={d.dataset!r}: {e}") from None
  return name


def data_factory(config: ml_collections.ConfigDict, dataset: str | None = None):
  """A zero-argument function returning the training input pipeline (checked now).

  ``dataset``: ``dataset_name(config)`` if already known (it may prepare the data).
  """
  import conditioning_builders
  import instruct_builders  # an input_image stage reads the dataset's input images too

  from diffusion_jax.data import buckets, pipeline

  d = config.data
  if conditioning_builders.aspect_buckets(config):  # SDXL's aspect buckets: rendered
    kwargs = dict(dataset=dataset or dataset_name(config), data_dir=d.data_dir,
                  split=d.split, buckets=conditioning_builders.aspect_buckets(config),
                  weights=tuple(d.get("bucket_weights") or ()),
                  global_batch_size=config.train.batch_size, seed=config.train.seed,
                  crop=d.crop, max_rescale=d.get("max_rescale", 1.5))
    return _checked_factory(lambda: buckets.BucketedShapesPipeline(**kwargs))
  kwargs = dict(
      dataset=dataset or dataset_name(config), data_dir=d.data_dir, split=d.split,
      image_key=d.image_key,
      caption_key=None if d.label_key is not None else d.caption_key,
      label_key=d.label_key, caption_template=d.caption_template,
      resolution=d.resolution, lowres_resolution=d.lowres_resolution, crop=d.crop,
      global_batch_size=config.train.batch_size, seed=config.train.seed, shuffle=True,
      paired_image_keys=instruct_builders.paired_image_keys(config))
  if d.crop == "random_rescale":
    kwargs["max_rescale"] = d.get("max_rescale", 1.5)

  return _checked_factory(lambda: pipeline.InputPipeline(**kwargs))


def _checked_factory(make):
  try:
    make()  # fail now, with the data's own message, rather than after compiling
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise UserError(f"config.data: {e}") from None
  return make


def dataset_captions(config: ml_collections.ConfigDict,
                     dataset: str | None = None) -> list[str] | None:
  """Every caption of the training split when they can be listed cheaply, else None: the
  shapes dataset's (read from its prepared split without decoding images, ~2 s for 20k)
  or a class-label dataset's (its caption template over the label names).

  ``dataset``: ``dataset_name(config)`` if already known (it may prepare the data)."""
  import tensorflow_datasets as tfds

  d = config.data
  if d.label_key is not None:
    builder = tfds.builder(dataset or dataset_name(config), data_dir=d.data_dir)
    names = getattr(builder.info.features[d.label_key], "names", None)
    if not names:
      return None
    return [d.caption_template.format(label=n.replace("_", " ")) for n in names]
  if d.dataset != "shapes":
    return None  # an open-ended caption set: encoded (and cached) as batches arrive
  builder = tfds.builder(dataset or dataset_name(config), data_dir=d.data_dir)
  source = builder.as_data_source(split=d.split,
                                  decoders={d.image_key: tfds.decode.SkipDecoding()})
  examples = source.__getitems__(range(len(source)))
  captions = (e[d.caption_key] for e in examples)
  return [c.decode() if isinstance(c, bytes) else str(c) for c in captions]


def run_training(config: ml_collections.ConfigDict, workdir: str, make_evaluator=None):
  """Validates the whole config, then trains (resuming from ``workdir`` if possible).

  ``make_evaluator(config, model_cfg, text_encoder, kind) -> evaluator or None`` builds the
  loop's in-training evaluator; default ``evaluating.training_evaluator`` (a benchmark
  passes its own probe and wraps the evaluator to time it: benchmarks/convergence.py).
  """
  from diffusion_jax.training import loop as loop_lib

  dist = config.distributed
  try:
    sharding.maybe_initialize_distributed(dist.coordinator_address, dist.num_processes,
                                          dist.process_id)
  except ValueError as e:
    raise ConfigError(f"config.distributed: {e}.") from None
  import latent_builders

  model_cfg = unet_config(config)
  # The stage's kind and conditions (no weights read): config errors now, before the lock.
  latent_builders.stage_unet_config(config, model_cfg)
  steps, optimizer, loop = step_settings(config), optimizer_settings(config), \
      loop_settings(config)
  try:
    loop_lib.check_workdir(workdir)  # before minutes of loading data and the encoder
  except ValueError as e:
    raise ConfigError(str(e)) from None
  from diffusion_jax.training import checkpoint, resume, workdir_lock

  try:  # held from here (before the data and the encoder load) to the end of the run
    with workdir_lock.hold(workdir):
      # The early look, before minutes of loading; the loop checks again against the
      # checkpoint it restores (and offers an intact one if the newest is unreadable).
      try:
        stored, step = checkpoint.stored_config(workdir)
      except checkpoint.CheckpointError:
        stored, step = None, None
      resume.check_config(stored, config.to_dict(), resume_rules(),
                          f"{workdir}/checkpoints/{step}")
      return _train_in_workdir(config, workdir, model_cfg, steps, optimizer, loop,
                               make_evaluator)
  except (workdir_lock.WorkdirLockedError, resume.IncompatibleResumeError) as e:
    raise UserError(str(e)) from None


def _train_in_workdir(config, workdir, model_cfg, steps, optimizer, loop, make_evaluator):
  import jax

  from diffusion_jax.training import checkpoint, resume
  from diffusion_jax.training import loop as loop_lib

  try:
    mesh = sharding.make_mesh(dict(loop.mesh_axes))
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  if loop.batch_size % mesh.shape["data"]:
    raise ConfigError(f"config.train.batch_size={loop.batch_size} must divide by the "
                      f"mesh's data axis ({mesh.shape['data']} devices).")
  import latent_builders  # the stage kind: pixels, or a frozen autoencoder's latents
  kind, model_cfg, loop = latent_builders.for_training(config, model_cfg, loop, mesh,
                                                       loop.rules)
  import conditioning_builders  # input images, masks, image embeddings

  steps = conditioning_builders.for_training(config, steps, model_cfg, mesh)
  trainable = bool(config.text.trainable)
  encoder = text_encoder(config, mesh if trainable else process_local_mesh(config))
  dataset = dataset_name(config)  # once: for shapes, a prepare round-trip between processes
  factory = data_factory(config, dataset)
  if isinstance(encoder, CachedTextEncoder):
    captions = dataset_captions(config, dataset)
    if captions:
      # Each process fills its share; on a shared cache_dir that is all of them, and the
      # rest of a local one is filled as batches arrive.
      mine = captions[jax.process_index()::jax.process_count()]
      new = encoder.cache.precompute(mine)
      print(f"Text embedding cache {config.text.cache_dir}: {len(set(mine))} captions, "
            f"{new} newly encoded.", flush=True)
  import evaluating  # (experiments/; imports this module)

  evaluator = (make_evaluator or evaluating.training_evaluator)(config, model_cfg, encoder, kind)
  try:
    return loop_lib.train(
        workdir, model=unet_lib.UNet(model_cfg), loop=loop, step_settings=steps,
        optimizer=optimizer, data_factory=factory, text_encoder=encoder,
        config_json=config.to_dict(), resume_rules=resume_rules(),
        stage_kind=kind, evaluator=evaluator)
  except (loop_lib.NonFiniteError, loop_lib.DataRestartError, loop_lib.WorkdirWriteError,
          resume.IncompatibleResumeError, checkpoint.CheckpointError) as e:
    raise UserError(str(e)) from None


def classifier_train_settings(config: ml_collections.ConfigDict):
  """configs/attribute_classifier_shapes.py -> ``ClassifierTrainSettings`` (ConfigError)."""
  from diffusion_jax.training import classifier_train

  fields = config.to_dict()
  fields["schedule_kwargs"] = tuple(sorted(fields["schedule_kwargs"].items()))
  fields["eval_times"] = tuple(fields["eval_times"])
  return checked("--config", classifier_train.ClassifierTrainSettings, **fields)


def setup_compilation_cache() -> None:
  """A persistent XLA compilation cache (repo/.cache/jax unless JAX_COMPILATION_CACHE_DIR
  is set), so re-running an experiment does not recompile."""
  import os

  import jax

  root = pathlib.Path(__file__).resolve().parent.parent
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(root / ".cache" / "jax")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
