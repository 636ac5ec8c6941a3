"""Training workdirs or exported stages -> a cascade -> pictures: ``sample_cascade``, a
plain function of keyword arguments that experiments/sample.py (a thin absl layer over
it), the demo and the evaluation call.

Every check runs before a checkpoint is read or anything compiles, and raises
builders.UserError with one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import builders
import guide_builders
import ml_collections
from builders import UserError

from diffusion_jax import text as text_lib
from diffusion_jax.models import unet as unet_lib


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
  encoder = builders.text_encoder(text_config)
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
    raise _restore_error(e, step) from None
  return encoder.with_params(params, f"{encoder.encoder_id}+trained:{workdirs[0]}@{step}")


def _restore_error(e: Exception, step: int | None) -> UserError:
  """A checkpoint restore's error as a UserError. With a step asked for, a
  FileNotFoundError means the workdir has no checkpoint at that step."""
  from diffusion_jax.training import checkpoint

  if isinstance(e, FileNotFoundError) and step is not None:
    return UserError(f"{str(e).removesuffix('.')} (fix --checkpoint_steps).")
  if isinstance(e, checkpoint.CheckpointError) and not isinstance(
      e, checkpoint.CheckpointMismatchError):
    return UserError(f"{e} Load another step with --checkpoint_steps=STEP.")
  return UserError(str(e))


def load_workdir_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a training workdir's checkpoint ``step`` (None: the newest) was written
  with, as stored in that checkpoint; config.json (the latest run's) if it holds none."""
  from diffusion_jax.training import checkpoint

  try:
    stored, _ = checkpoint.stored_config(workdir, step)
  except checkpoint.CheckpointError as e:
    raise _restore_error(e, step) from None
  if stored is not None:
    return ml_collections.ConfigDict(stored)
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
  import latent_builders  # a latent stage's U-Net works on its autoencoder's latents

  from diffusion_jax import cascade

  model_cfg = latent_builders.stage_unet_config(config, builders.unet_config(config))
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
  elif previous_resolution is not None and spec_overrides.get("refine_strength") is None:
    raise UserError(f"{workdir} is a base (text-to-image) stage; every stage after the "
                    "first must be a super-resolution stage, or a refiner (give it a "
                    "--refine_strength).")
  elif previous_resolution is not None and previous_resolution != resolution:
    raise UserError(f"{workdir} cannot refine the stage before it: it samples at "
                    f"{resolution} px and that stage at {previous_resolution} px.")
  if previous_resolution is None and spec_overrides.get("refine_strength") is not None:
    raise UserError(f"--refine_strength for {workdir}: the first stage cannot be a refiner "
                    "(it has no stage's output to refine).")
  # The schedules exactly as training built them (builders.diffusion_settings).
  spec_kwargs = dict(
      resolution=resolution, parameterization=d.parameterization, schedule=d.schedule,
      schedule_kwargs=tuple(sorted(builders.schedule_arguments(d).items())),
      lowres_schedule=d.lowres_schedule, trained_on_crops=crops,
      lowres_schedule_kwargs=tuple(sorted(
          builders.schedule_arguments(d, "lowres_schedule").items()))
      if d.lowres_schedule is not None else (),
      # EDM-trained stages sample inside the same wrapper (older configs have no such
      # field: no preconditioning).
      preconditioning=d.get("preconditioning", "none"), sigma_data=d.get("sigma_data", 0.5),
      **latent_builders.spec_defaults(config))
  spec_kwargs.update({k: v for k, v in spec_overrides.items() if v is not None})
  spec = builders.checked(f"sampling settings of {workdir}", cascade.StageSpec, **spec_kwargs)
  import conditioning_builders

  _check_size(workdir, [c.to_json() for c in conditioning_builders.conditions(
      config, model_cfg.in_channels)], spec)
  return model_cfg, spec


def _check_size(source, conditioning, spec) -> None:
  """UserError unless the stage (its conditions' ``to_json``) can sample at spec's size:
  an aspect-bucketed stage at one of its buckets (``--height`` / ``--width``), any other
  at its square only."""
  from diffusion_jax import conditioning as conditioning_lib

  error = conditioning_lib.size_error(conditioning, spec.resolution, spec.size)
  if error:
    raise UserError(f"--height / --width for {source}: {error}")


def training_stage(workdir: str, config: ml_collections.ConfigDict,
                   model_cfg: unet_lib.UNetConfig, spec, text_width: int,
                   step: int | None = None):
  """(cascade Stage, step loaded) of a training workdir: the EMA params of its latest
  checkpoint, or of checkpoint ``step``, in the U-Net ``model_cfg`` sampled with ``spec``
  (its config.json ``config`` and what ``workdir_stage_spec`` made of it).
  """
  from diffusion_jax import cascade
  from diffusion_jax.training import loop as loop_lib

  model = unet_lib.UNet(model_cfg)
  try:
    params, step = loop_lib.restore_ema_params(
        workdir, model=model,
        loop=builders.loop_settings(config), text_len=config.text.max_length, text_dim=text_width,
        step=step)
  except (FileNotFoundError, ValueError) as e:
    raise _restore_error(e, step) from None
  import conditioning_builders
  import latent_builders

  conditions = conditioning_builders.conditions(config, model_cfg.in_channels)
  return cascade.Stage(model, params, spec, latent_builders.stage_kind(config),
                       tuple(c.to_json() for c in conditions)), step


def _stage_sources(workdirs, exported) -> list:
  """The training workdirs or the exported stage directories, whichever was given."""
  if bool(workdirs) == bool(exported):
    raise UserError("Give the stages either as --workdirs (training runs) or as --stages "
                    "(exported), base stage first.")
  return list(workdirs or exported)


def _with_options(own: dict, sampler: str | None, options) -> dict:
  """Spec overrides with ``sampler_options`` (a dict of new options, or None) merged over
  a stage's own ``options`` of its ``sampler``, which a new sampler drops."""
  own = dict(own)
  new = own.pop("sampler_options", None)
  if new is None and own.get("sampler", sampler) == sampler:
    return own
  kept = dict(options) if own.get("sampler", sampler) == sampler else {}
  own["sampler_options"] = tuple(sorted({**kept, **(new or {})}.items()))
  return own


def _exported_spec(directory, own: dict):
  """An exported stage's StageSpec (its stage.json) with the overrides ``own``."""
  from diffusion_jax import cascade

  path = pathlib.Path(directory).resolve() / "stage.json"
  if not path.exists():
    raise UserError(f"{path} not found: {directory} is not an exported stage (export one "
                    "with experiments/sample.py --export_dir).")
  meta = json.loads(path.read_text())
  spec = cascade.StageSpec.from_json(meta["spec"])
  own = _with_options(own, spec.sampler, spec.sampler_options)
  spec = dataclasses.replace(spec, **own)
  _check_size(directory, meta.get("conditioning") or (), spec)
  return spec


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

  sources = _stage_sources(workdirs, exported)
  per_stage = list(per_stage) if per_stage is not None else [{}] * len(sources)
  if len(per_stage) != len(sources):
    raise UserError(f"{len(per_stage)} per-stage settings for {len(sources)} stages.")
  size = per_stage[0].get("size")
  if size is not None and size[0] != size[1] and len(sources) > 1:
    raise UserError(f"--height={size[0]} --width={size[1]} samples the base stage at an "
                    "aspect bucket; the stages after it chain square images only: sample it "
                    "alone.")
  overrides = [{**spec_overrides, **{k: v for k, v in own.items() if v is not None}}
               for own in per_stage]
  if workdirs:  # (a training workdir's spec has no sampler options of its own)
    overrides = [_with_options(own, None, ()) for own in overrides]
  if checkpoint_steps is not None and exported:
    raise UserError("--checkpoint_steps picks checkpoints of --workdirs; exported --stages "
                    "hold one set of params each.")
  if checkpoint_steps is not None and len(checkpoint_steps) != len(workdirs):
    raise UserError("--checkpoint_steps needs one step per --workdirs entry "
                    f"({len(workdirs)}), got {len(checkpoint_steps)}.")
  steps = list(checkpoint_steps) if checkpoint_steps is not None else [None] * len(sources)
  stages, described, encoder, encoder_ids = [], [], None, set()
  if workdirs:
    configs = [load_workdir_config(w, s) for w, s in zip(workdirs, steps, strict=True)]
    specs, previous = [], None  # (UNetConfig, StageSpec) per workdir
    for workdir, config, own in zip(workdirs, configs, overrides, strict=True):
      specs.append(workdir_stage_spec(workdir, config, previous, **own))
      previous = specs[-1][1].resolution
    texts = {(c.text.encoder, c.text.max_length) for c in configs}
    if len(texts) > 1:
      raise UserError(f"The stages were trained with different text encoders {sorted(texts)};"
                      " a cascade needs one.")
    encoder = sampling_text_encoder(configs, workdirs, checkpoint_steps)
    text_meta = {"encoder": configs[0].text.encoder, "max_length": configs[0].text.max_length,
                 "id": encoder.encoder_id}
    for workdir, config, (model_cfg, spec), step in zip(workdirs, configs, specs, steps,
                                                        strict=True):
      stage, step = training_stage(workdir, config, model_cfg, spec, encoder.width, step)
      stages.append(stage)
      described.append({"source": str(workdir), "step": step, **stage.spec.to_json()})
  else:
    # Every stage.json and its settings first: a bad value stops before params are read.
    specs = [builders.checked(f"sampling settings of {directory}", _exported_spec,
                              directory, own)
             for directory, own in zip(exported, overrides, strict=True)]
    for directory, spec in zip(exported, specs, strict=True):
      try:
        stage, text_meta = cascade.load_exported_stage(directory)
      except FileNotFoundError as e:
        raise UserError(str(e)) from None
      stage = dataclasses.replace(stage, spec=spec)
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


def per_stage_values(flag: str, values, count: int, parse=float, what: str = "stage",
                     choices=None):
  """A flag's values as a list of ``count`` (one value is repeated), each parsed; an
  empty entry (``--eta=,0.5``) is None: that stage's own setting."""
  if values is None or isinstance(values, (str, int, float)):
    values = [] if values is None else [values]
  values = ["" if v is None else str(v).strip() for v in values]
  if not any(values):
    return [None] * count
  if len(values) not in (1, count):
    allowed = "1 value" if count == 1 else f"1 or {count} values"
    raise UserError(f"{flag} needs {allowed} (one per {what}), got {len(values)}: "
                    f"{','.join(values)}.")
  if choices is not None:
    bad = [v for v in values if v and v not in choices]
    if bad:
      raise UserError(f"{flag}={','.join(values)}: unknown {bad[0]!r}; choose one of "
                      f"{', '.join(choices)}.")
  try:
    parsed = [parse(v) if v else None for v in values]
  except ValueError:
    kind = "integers" if parse is int else "numbers"
    raise UserError(f"{flag}={','.join(values)}: not a list of {kind}.") from None
  return parsed * count if len(parsed) == 1 else parsed


def _given(values) -> bool:
  """Whether a per-stage value (None, one value or a list, '' entries unset) sets any."""
  if values is None or isinstance(values, (str, int, float)):
    values = [] if values is None else [values]
  return any(v is not None and str(v).strip() for v in values)


def _choices():
  from diffusion_jax import cascade
  from diffusion_jax.diffusion import guidance, guidance_schedules, samplers

  return {"sampler": tuple(samplers.SAMPLERS), "grid": cascade.GRID_KINDS,
          "threshold": guidance.THRESHOLDS, "guidance_schedule": guidance_schedules.NAMES,
          "variance": ("small", "large")}


# The per-stage settings of sample_cascade (and sample.py's flags of the same names): flag
# -> (cascade.StageSpec field, parse). Each takes one value (all stages) or one per stage.
SPEC_SETTINGS = {
    "sampler": ("sampler", str), "steps": ("num_steps", int),
    "guidance_scale": ("guidance_scale", float),
    "guidance_schedule": ("guidance_schedule", str), "guidance_min": ("guidance_min", float),
    "threshold": ("threshold", str), "percentile": ("percentile", float),
    "grid": ("grid_kind", str), "rho": ("rho", float),
    "refine_strength": ("refine_strength", float),
}
# The samplers' own options (StageSpec.sampler_options; cascade.sampler_option_names):
# ddim eta; ddpm variance; euler / heun churn, churn_tmin, churn_tmax, noise_scale.
SAMPLER_OPTIONS = {"eta": float, "variance": str, "churn": float, "churn_tmin": float,
                   "churn_tmax": float, "noise_scale": float}


@dataclasses.dataclass
class SampleResult:
  """What ``sample_cascade`` made: ``images`` per stage ([B, H_k, W_k, C] floats in
  [-1, 1], base stage first), the ``record`` written as samples.json (prompts, seed, every
  stage's resolved settings and checkpoint step, the regenerate command) and the files
  written (none without an outdir)."""

  images: list
  record: dict
  grids: list[pathlib.Path]
  record_path: pathlib.Path | None


def stage_settings(num_stages: int, *, num_workdirs: int = 0, checkpoint_steps=None,
                   aug_level=None, sampler=None, steps=None, guidance_scale=None,
                   guidance_schedule=None, guidance_min=None, threshold=None, percentile=None,
                   grid=None, rho=None, eta=None, variance=None, churn=None, churn_tmin=None,
                   churn_tmax=None, noise_scale=None, refine_strength=None):
  """(StageSpec overrides per stage, checkpoint steps per workdir or None) from sample.py's
  settings: each per-stage setting (``SPEC_SETTINGS``, ``SAMPLER_OPTIONS``, ``aug_level``
  per super-resolution stage, ``checkpoint_steps`` per workdir: an int, or None /
  'latest') is None (the stage's own), one value for all stages, or a list of one per
  stage. Parsing and choices are checked here (UserError, one line); the values against
  each stage when its spec is built."""
  given = dict(sampler=sampler, steps=steps, guidance_scale=guidance_scale,
               guidance_schedule=guidance_schedule, guidance_min=guidance_min,
               threshold=threshold, percentile=percentile, grid=grid, rho=rho, eta=eta,
               variance=variance, churn=churn, churn_tmin=churn_tmin, churn_tmax=churn_tmax,
               noise_scale=noise_scale, refine_strength=refine_strength)
  choices = _choices()
  per_stage = [{} for _ in range(num_stages)]
  for flag, (field, parse) in SPEC_SETTINGS.items():
    values = per_stage_values(f"--{flag}", given[flag], num_stages, parse=parse,
                              choices=choices.get(flag))
    for own, value in zip(per_stage, values, strict=True):
      own[field] = value
  for flag, parse in SAMPLER_OPTIONS.items():
    values = per_stage_values(f"--{flag}", given[flag], num_stages, parse=parse,
                              choices=choices.get(flag))
    for own, value in zip(per_stage, values, strict=True):
      if value is not None:
        own.setdefault("sampler_options", {})[flag] = value
  aug_levels = [None] * num_stages
  if _given(aug_level):
    if num_stages == 1:
      raise UserError("--aug_level is the low-res augmentation of super-resolution stages, "
                      "and this cascade has none.")
    aug_levels[1:] = per_stage_values("--aug_level", aug_level, num_stages - 1,
                                      what="super-resolution stage")
  for own, level in zip(per_stage, aug_levels, strict=True):
    own["aug_level"] = level
  if not _given(checkpoint_steps):
    checkpoint_steps = None
  elif num_workdirs:
    checkpoint_steps = per_stage_values(
        "--checkpoint_steps", checkpoint_steps, num_workdirs, what="workdir",
        parse=lambda v: None if v == "latest" else int(v))
  return per_stage, checkpoint_steps


# Where a stage conditioned on more than text is sampled.
CONDITIONED_TOOLS = {"masked_image": "experiments/edit.py inpaint --method=stage",
                     "input_image": "experiments/edit.py instruct",
                     "image_embed": "experiments/unclip.py"}


def check_stage_condition(stage, need: str | None, source: str, command: str) -> None:
  """UserError unless ``stage``'s condition beyond text (micro-conditioning aside) is
  ``need`` (None: a text-to-image stage), for ``command`` (e.g. "inpaint --method=stage")."""
  kinds = [d["kind"] for d in stage.conditioning if d["kind"] != "micro"]
  have = kinds[0] if kinds else None
  if have == need:
    return
  if need is None:
    raise UserError(f"{source} is conditioned on {have} as well as text; {command} edits "
                    "with a text-to-image stage (sample it with "
                    f"{CONDITIONED_TOOLS.get(have, 'the tool of that condition')}).")
  raise UserError(f"{command} needs a stage trained with config.conditioning.kind={need!r}; "
                  f"{source} has {have or 'none'}.")


def sample_size(height, width) -> tuple[int, int] | None:
  """(height, width) of ``--height`` / ``--width`` (both or neither; None: the stage's
  square), or a UserError."""
  if height is None and width is None:
    return None
  if height is None or width is None or height < 1 or width < 1:
    raise UserError(f"--height={height} --width={width}: give both, positive (one of an "
                    "aspect-bucketed stage's buckets), or neither (its square).")
  return (int(height), int(width))


def prepare_cascade(*, workdirs=(), stages=(), prompts=None, height: int | None = None,
                    width: int | None = None, **settings):
  """(Cascade, description per stage, text-encoder description) of training ``workdirs``
  (or exported ``stages``), base first, with sample.py's settings (``stage_settings``)
  applied. The guide flags (``guide_builders.FLAGS``) steer the base stage:
  ``clip_guidance_scale`` > 0 with the (noise-aware) CLIP in ``clip_checkpoint`` (GLIDE's
  CLIP guidance, diffusion.clip_guidance), ``classifier_guidance_scale`` > 0 with the
  attribute classifier in ``classifier_checkpoint`` (diffusion.classifier_guidance).
  ``height`` / ``width``: the base stage's output, one of its aspect buckets (SDXL; default
  its square). Every value (and each of ``prompts``, if given, against the guides) is
  checked before a checkpoint is read or anything compiles (UserError, one line).
  """
  guide_settings = {k: settings.pop(k) for k in guide_builders.FLAGS if k in settings}
  workdirs, stages = list(workdirs or ()), list(stages or ())
  sources = _stage_sources(workdirs, stages)
  per_stage, checkpoint_steps = stage_settings(len(sources), num_workdirs=len(workdirs),
                                               **settings)
  per_stage[0]["size"] = sample_size(height, width)
  guides = guide_builders.load_guides(guide_settings)
  if prompts is not None:
    guide_builders.check_prompts(guides, prompts)
  cascade, described, text_meta = load_cascade(
      workdirs, stages, checkpoint_steps=checkpoint_steps, per_stage=per_stage)
  for source, stage in zip(sources, cascade.stages, strict=True):
    for condition in stage.conditioning:
      kind = condition["kind"]
      if kind in CONDITIONED_TOOLS:
        raise UserError(f"{source} is conditioned on {kind} as well as text: sample it with "
                        f"{CONDITIONED_TOOLS[kind]}.")
  guide_builders.check_stage(guides, cascade.stages[0], sources[0])
  cascade.guides = guides
  return cascade, described, text_meta


def sample_cascade(*, workdirs=(), stages=(), prompts=(), prompts_file=None, outdir=None,
                   seed: int = 0, first_index: int = 0, export_dir=None, progress=None,
                   **settings) -> SampleResult:
  """Samples ``prompts`` through the cascade of training ``workdirs`` (or exported
  ``stages``), base stage first, and (with ``outdir``) writes a captioned grid per stage,
  every image alone and samples.json.

  ``settings``: ``prepare_cascade``'s (checkpoint steps, per-stage sampler settings, CLIP
  and classifier guidance). Image i of the run (``first_index`` + its position) draws its
  randomness from the seed and i alone. Every value is checked before a checkpoint is read
  or anything compiles.
  """
  import shlex

  import jax

  from diffusion_jax import cascade as cascade_lib
  from diffusion_jax import images

  prompts = read_prompts(prompts, prompts_file)
  if int(first_index) != first_index or first_index < 0:
    raise UserError(f"--first_index={first_index}; it must be >= 0 (the index of the "
                    "first prompt's image in the run).")
  workdirs, stages = list(workdirs or ()), list(stages or ())
  cascade, described, text_meta = prepare_cascade(workdirs=workdirs, stages=stages,
                                                  prompts=prompts, **settings)
  if export_dir:
    for i, stage in enumerate(cascade.stages):
      cascade_lib.export_stage(stage, pathlib.Path(export_dir) / f"stage_{i + 1}", text_meta)
  outputs = cascade.sample(prompts, jax.random.key(seed), first_index=first_index,
                           progress=progress)
  record = {
      "prompts": prompts, "seed": seed, "first_index": first_index, "stages": described,
      "text_encoder": cascade.text_encoder.encoder_id,
      "checkpoint_steps": [d.get("step") for d in described],
      **guide_builders.record(settings),
      "regenerate": shlex.join(regenerate_command(workdirs, stages, seed, described,
                                                  settings)) +
                    " --prompts=<prompt i> --first_index=<i> --outdir=<dir>",
  }
  if outdir is None:
    return SampleResult(outputs, record, [], None)
  outdir = pathlib.Path(outdir)
  (outdir / "images").mkdir(parents=True, exist_ok=True)
  written = []
  for spec, stage_images in zip(described, outputs, strict=True):
    res = f"{spec['resolution']}" if not spec.get("size") else "x".join(map(str, spec["size"]))
    grid_image = images.make_grid(stage_images, prompts, columns=min(4, len(prompts)),
                                  scale=max(1, 128 // max(stage_images.shape[1:3])))
    written.append(images.save_png(grid_image,
                                   outdir / f"stage{len(written) + 1}_{res}px.png"))
    for b, image in enumerate(images.to_uint8(stage_images)):
      images.save_png(image, outdir / "images" / f"{first_index + b:04d}_{res}px.png")
  record_path = outdir / "samples.json"
  record_path.write_text(json.dumps(record, indent=2))
  return SampleResult(outputs, record, [pathlib.Path(p) for p in written], record_path)


def regenerate_command(workdirs, stages, seed: int, described: list[dict],
                       guide_settings: dict | None = None) -> list[str]:
  """The sample.py command (without prompts and outdir) that samples the same images:
  the loaded checkpoints pinned by step (so it still holds after training continues) and
  every stage's resolved setting spelt out, so no default can change under it."""
  command = ["python", "experiments/sample.py"]
  if workdirs:
    command += [f"--workdirs={','.join(map(str, workdirs))}",
                f"--checkpoint_steps={','.join(str(d['step']) for d in described)}"]
  else:
    command += [f"--stages={','.join(map(str, stages))}"]
  command.append(f"--seed={seed}")
  if described[0].get("size"):
    command += [f"--height={described[0]['size'][0]}", f"--width={described[0]['size'][1]}"]
  for flag, (field, _) in SPEC_SETTINGS.items():
    values = ["" if d.get(field) is None else str(d[field]) for d in described]
    if any(values):  # (refine_strength is None, so absent, unless a stage refines)
      command.append(f"--{flag}={','.join(values)}")
  if len(described) > 1:
    command.append(f"--aug_level={','.join(str(d['aug_level']) for d in described[1:])}")
  options = [dict(d["sampler_options"]) for d in described]
  for name in SAMPLER_OPTIONS:
    if any(name in own for own in options):  # '' for a stage whose sampler lacks it
      command.append(f"--{name}={','.join(str(own.get(name, '')) for own in options)}")
  return command + guide_builders.regenerate_flags(guide_settings or {})
