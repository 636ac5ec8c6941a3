"""Training workdirs or exported stages -> a cascade -> pictures: the body of
experiments/sample.py (and the demo's sampling).

Every check runs before a checkpoint is read or anything compiles, and raises
builders.UserError with one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import pathlib

import builders
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
  if isinstance(e, FileNotFoundError) and step is not None:
    return UserError(f"{str(e).removesuffix('.')} (fix --checkpoint_steps).")
  return UserError(str(e))


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

  model_cfg = builders.unet_config(config)
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
                     lowres_schedule=d.lowres_schedule, trained_on_crops=crops,
                     # EDM-trained stages sample inside the same wrapper (older configs
                     # have no such field: no preconditioning).
                     preconditioning=d.get("preconditioning", "none"),
                     sigma_data=d.get("sigma_data", 0.5))
  spec_kwargs.update({k: v for k, v in spec_overrides.items() if v is not None})
  return model_cfg, builders.checked(f"sampling settings of {workdir}", cascade.StageSpec,
                          **spec_kwargs)


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
  return cascade.Stage(model, params, spec), step


def _stage_sources(workdirs, exported) -> list:
  """The training workdirs or the exported stage directories, whichever was given."""
  if bool(workdirs) == bool(exported):
    raise UserError("Give the stages either as --workdirs (training runs) or as --stages "
                    "(exported), base stage first.")
  return list(workdirs or exported)


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
  overrides = [{**spec_overrides, **{k: v for k, v in own.items() if v is not None}}
               for own in per_stage]
  if checkpoint_steps is not None and exported:
    raise UserError("--checkpoint_steps picks checkpoints of --workdirs; exported --stages "
                    "hold one set of params each.")
  if checkpoint_steps is not None and len(checkpoint_steps) != len(workdirs):
    raise UserError("--checkpoint_steps needs one step per --workdirs entry "
                    f"({len(workdirs)}), got {len(checkpoint_steps)}.")
  steps = list(checkpoint_steps) if checkpoint_steps is not None else [None] * len(sources)
  stages, described, encoder, encoder_ids = [], [], None, set()
  if workdirs:
    configs = [load_workdir_config(w) for w in workdirs]
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
    for directory, own in zip(exported, overrides, strict=True):
      try:
        stage, text_meta = cascade.load_exported_stage(directory)
      except FileNotFoundError as e:
        raise UserError(str(e)) from None
      stage = builders.checked(f"sampling settings of {directory}", cascade.replace_spec,
                               stage, **own)
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
  num_stages = len(_stage_sources(f.workdirs, f.stages))  # (the per-stage flags need it)
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
  # (experiments/demo.py has no --checkpoint_steps; load_cascade rejects them with --stages)
  checkpoint_steps = getattr(f, "checkpoint_steps", None) or None
  if checkpoint_steps and f.workdirs:
    checkpoint_steps = per_stage_values(
        "--checkpoint_steps", checkpoint_steps, len(f.workdirs), what="workdir",
        parse=lambda v: None if v == "latest" else int(v))
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
