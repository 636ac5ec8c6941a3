"""The Imagen cascade: a base stage and super-resolution stages, sampled in sequence.

A stage is a U-Net, its (EMA) parameters and a ``StageSpec`` of sampling settings. A
stage's network ``unet(x_t, logsnr, text_emb, text_mask, lowres, lowres_logsnr)`` becomes
the diffusion core's conditional model function ``(x_t, logsnr, cond) -> prediction``
(``stage_model_fn``), whose cond pytree carries the text and, for super-resolution
stages, the augmented low-res image and its noise level. For classifier-free guidance
the null condition replaces only the text: the low-res image conditions both halves.

``Cascade.sample`` encodes the prompts once, runs the base stage, and feeds every stage's
output to the next one as its low-res input, noised to the stage's fixed augmentation
level (Imagen section 2.5, noise conditioning augmentation; the level is given to the
U-Net too). A super-resolution stage must follow a stage that samples at the low-res
size it was trained on (``chain_error``; stages trained on random crops only need their
scale factor to chain). Each stage's sampling is one compiled program (compiled once per
batch size). Image i of a call draws all its randomness from
``fold_in(fold_in(key, stage), i)`` (i counted from ``first_index``), so any single image
can be regenerated alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import stage_kinds
from diffusion_jax.diffusion import grids, guidance, guidance_schedules, samplers, schedules
from diffusion_jax.diffusion import preconditioning as preconditioning_lib
from diffusion_jax.models import unet as unet_lib


def stage_model_fn(model: nn.Module, params: Any, preconditioning=None):
  """(x_t, logsnr, cond) -> prediction for a U-Net; cond has text_emb, text_mask and
  optionally lowres, lowres_logsnr, cond_image, image_embed. ``preconditioning`` (an
  ``EDMPreconditioning``, as the stage trained with) wraps the U-Net; the prediction is
  then the denoised image."""
  def cond_model_fn(x_t, logsnr, cond):
    return model.apply({"params": params}, x_t, logsnr, cond["text_emb"], cond["text_mask"],
                       lowres=cond.get("lowres"), lowres_logsnr=cond.get("lowres_logsnr"),
                       cond_image=cond.get("cond_image"), image_embed=cond.get("image_embed"),
                       micro_cond=cond.get("micro_cond"))
  return cond_model_fn if preconditioning is None else preconditioning.wrap(cond_model_fn)


def sample_stage(model: nn.Module, params: Any, text_emb: jnp.ndarray,
                 text_mask: jnp.ndarray, null_cond: dict, key: jax.Array,
                 grid: jnp.ndarray, *, image_shape: tuple[int, int, int],
                 parameterization: str, sampler: str = "ddim",
                 guidance_scale: float | Callable = 1.0,
                 threshold: str = "dynamic", percentile: float = 0.995,
                 lowres: jnp.ndarray | None = None, lowres_logsnr: jnp.ndarray | None = None,
                 sampler_options: dict | None = None, guide=None,
                 preconditioning=None, extra_cond: dict | None = None,
                 null_extra: dict | None = None) -> jnp.ndarray:
  """Samples images [B, H, W, C] for text embeddings [B, L, D] (jit-able).

  ``null_cond``: {"text_emb": [L, D], "text_mask": [L]} (the encoded empty prompt).
  ``key``: one key for the batch (image i from fold_in(key, i)) or one per image [B].
  ``guidance_scale``: the weight w, or a function logsnr [B] -> w [B]
  (guidance_schedules.weight_fn); a constant 1 runs the conditional model alone (one
  network call per step).
  ``guide``: optional ``model_fn -> model_fn`` applied after classifier-free guidance and
  before thresholding (e.g. ``diffusion.clip_guidance.clip_guided``,
  ``diffusion.classifier_guidance.classifier_guided``).
  ``preconditioning``: the stage's EDM wrapper, or None (``stage_model_fn``).
  ``extra_cond`` / ``null_extra``: the stage's other conditions (``guided_model_fn``).
  """
  model_fn = guided_model_fn(model, params, text_emb, text_mask, null_cond,
                             parameterization=parameterization, guidance_scale=guidance_scale,
                             threshold=threshold, percentile=percentile, lowres=lowres,
                             lowres_logsnr=lowres_logsnr, guide=guide,
                             preconditioning=preconditioning, extra_cond=extra_cond,
                             null_extra=null_extra)
  x_T = samplers.initial_noise(key, (text_emb.shape[0], *image_shape))
  return samplers.sample(sampler, model_fn, x_T, grid, key,
                         parameterization=parameterization, **(sampler_options or {}))


def guided_model_fn(model: nn.Module, params: Any, text_emb, text_mask, null_cond: dict, *,
                    parameterization: str, guidance_scale: float | Callable = 1.0,
                    threshold: str = "dynamic", percentile: float = 0.995, lowres=None,
                    lowres_logsnr=None, guide=None, preconditioning=None, extra_cond=None,
                    null_extra=None):
  """The sampler's ``model_fn(x_t, logsnr)`` of a stage: the U-Net on its conditions,
  classifier-free guided (a constant weight 1: the conditional model alone), then ``guide``,
  then thresholded (``sample_stage``'s arguments).

  ``extra_cond``: the stage's other conditions as U-Net keywords (``cond_image``
  [B, H, W, C'], ``image_embed`` [B, D]); the unconditional half gets ``null_extra``
  (leaves broadcastable to ``extra_cond``'s), by default ``extra_cond`` itself: then they
  condition both halves, as the low-res image does (an inpainting stage's masked image);
  zeros there guide on them too (DALL-E 2's decoder guides on the CLIP embedding)."""
  cond = {"text_emb": text_emb, "text_mask": text_mask}
  null = dict(null_cond)
  if lowres is not None:
    cond.update(lowres=lowres, lowres_logsnr=lowres_logsnr)
    null.update(lowres=lowres, lowres_logsnr=lowres_logsnr)
  if extra_cond:
    cond.update(extra_cond)
    null.update(extra_cond if null_extra is None else null_extra)
  cond_model_fn = stage_model_fn(model, params, preconditioning)
  if not callable(guidance_scale) and guidance_scale == 1.0:
    def model_fn(x_t, logsnr):
      return cond_model_fn(x_t, logsnr, cond)
  else:
    model_fn = guidance.classifier_free(cond_model_fn, cond, null, guidance_scale)
  if guide is not None:
    model_fn = guide(model_fn)
  return guidance.thresholded(model_fn, parameterization, threshold, percentile)


def refine_stage(model: nn.Module, params: Any, text_emb, text_mask, null_cond: dict,
                 key: jax.Array, grid, images: jnp.ndarray, strength: float, *,
                 parameterization: str, sampler: str = "ddim", sampler_options=None,
                 **guided) -> jnp.ndarray:
  """A refiner: SDEdit (editing.sdedit) of ``images`` [B, H, W, C] at ``strength`` in
  (0, 1] with a text-to-image stage's guided model, as SDXL's refiner runs on its base
  model's output (jit-able; ``strength`` static). ``guided``: guided_model_fn's options."""
  from diffusion_jax.editing import sdedit

  model_fn = guided_model_fn(model, params, text_emb, text_mask, null_cond,
                             parameterization=parameterization, **guided)
  return sdedit.sdedit(sampler, model_fn, images, grid, strength, key,
                       parameterization=parameterization, **(sampler_options or {}))


# StageSpec.grid_kind: uniform in t, diffusers' spacings of a discrete (DDPM) table, or
# Karras et al.'s sigmas (with rho) over the schedule's range (diffusion/grids.py).
GRID_KINDS = ("uniform", *grids.SPACINGS, "karras")


def sampler_option_names(sampler: str) -> tuple[str, ...]:
  """The options a sampler takes besides ``parameterization`` (ddim: eta, ...)."""
  import inspect

  params = inspect.signature(samplers.get(sampler)).parameters.values()
  return tuple(p.name for p in params
               if p.kind is p.KEYWORD_ONLY and p.name != "parameterization")


def _check_sampler_options(sampler: str, options: dict) -> None:
  accepted = sampler_option_names(sampler)
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    takes = f"takes {', '.join(accepted)}" if accepted else "takes no options"
    raise ValueError(f"sampler {sampler!r} has no option {unknown[0]!r} (it {takes}).")
  for name in ("eta", "churn", "churn_tmin", "noise_scale"):
    if name in options and not options[name] >= 0:
      raise ValueError(f"{name} must be >= 0, got {options[name]}.")
  if options.get("churn_tmax", np.inf) < options.get("churn_tmin", 0.0):
    raise ValueError(f"churn_tmax ({options['churn_tmax']}) must be >= churn_tmin "
                     f"({options.get('churn_tmin', 0.0)}).")
  if options.get("variance", "small") not in ("small", "large"):
    raise ValueError(f"Unknown DDPM variance {options['variance']!r}; choose one of small, "
                     "large.")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """How one stage samples. ``lowres_schedule`` (with ``lowres_schedule_kwargs``) and
  ``aug_level`` (a time t in [0, 1] of that schedule; Imagen sweeps it, 0 is nearly
  clean) are for super-resolution stages.

  ``trained_on_crops``: the (super-resolution) stage was trained on random crops, like
  Imagen's 256 -> 1024 px stage trained on 64 -> 256 px crops. Such a stage is applied
  fully convolutionally, so it takes a low-res input of any size and only its scale
  factor must chain; every other stage must get exactly the low-res size it was trained
  on (``chain_error``).

  ``sampler_options``: the sampler's own options (ddim: eta; ddpm: variance; euler and
  heun: churn, churn_tmin, churn_tmax, noise_scale). ``grid_kind`` (``GRID_KINDS``) and
  ``rho`` (karras only) choose the grid ``grid()`` builds. ``guidance_schedule``
  (guidance_schedules.NAMES) varies the guidance weight from ``guidance_min`` at pure
  noise to ``guidance_scale`` at clean data.
  ``preconditioning`` / ``sigma_data``: the wrapper the stage trained inside ("edm" with
  the config's sigma_data, or "none"); sampling must use the same one.
  ``refine_strength`` in (0, 1]: the stage is a *refiner*: a text-to-image (pixel) stage
  after another stage of its resolution, run as SDEdit on that stage's output from this
  fraction of its grid (``refine_stage``; SDXL's refiner), instead of sampling from noise.
  ``size``: (height, width) of a base stage's output when not ``resolution`` square: one of
  an aspect-bucketed stage's buckets (SDXL's multi-aspect training; ``Cascade`` checks it
  against the stage's ``conditioning``). None: resolution x resolution.
  """

  resolution: int
  parameterization: str = "v"
  schedule: str = "shifted_cosine"
  schedule_kwargs: tuple[tuple[str, Any], ...] = ()
  sampler: str = "ddim"
  num_steps: int = 50
  guidance_scale: float = 3.0
  threshold: str = "dynamic"
  percentile: float = 0.995
  lowres_schedule: str | None = None
  aug_level: float = 0.0
  sampler_options: tuple[tuple[str, Any], ...] = ()
  trained_on_crops: bool = False
  grid_kind: str = "uniform"
  rho: float = 7.0
  guidance_schedule: str = "constant"
  guidance_min: float = 1.0
  lowres_schedule_kwargs: tuple[tuple[str, Any], ...] = ()
  preconditioning: str = "none"
  sigma_data: float = 0.5
  refine_strength: float | None = None
  size: tuple[int, int] | None = None

  def __post_init__(self):
    preconditioning_lib.check_parameterization(self.preconditioner(), self.parameterization)
    samplers.get(self.sampler)
    schedule = self.noise_schedule()
    if self.lowres_schedule is not None:
      schedules.get(self.lowres_schedule, **dict(self.lowres_schedule_kwargs))
    guidance.thresholded(lambda x, s: x, self.parameterization, self.threshold,
                         self.percentile)
    if self.num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {self.num_steps}.")
    if not 0.0 <= self.aug_level <= 1.0:
      raise ValueError(f"aug_level must lie in [0, 1], got {self.aug_level}.")
    _check_sampler_options(self.sampler, dict(self.sampler_options))
    if self.grid_kind not in GRID_KINDS:
      raise ValueError(f"Unknown grid {self.grid_kind!r}; choose one of "
                       f"{', '.join(GRID_KINDS)}.")
    if self.grid_kind in grids.SPACINGS:
      if not isinstance(schedule, schedules.DiscreteSchedule):
        raise ValueError(f"grid {self.grid_kind!r} is a spacing of a discrete schedule's "
                         "timesteps (linear, cosine), but this stage's schedule is "
                         f"{self.schedule!r}: use grid uniform or karras.")
      grids.discrete_timesteps(schedule.num_timesteps, self.num_steps, self.grid_kind)
    if not self.rho > 0:
      raise ValueError(f"rho must be positive, got {self.rho}.")
    guidance_schedules.check(self.guidance_schedule)
    if self.refine_strength is not None and not 0.0 < self.refine_strength <= 1.0:
      raise ValueError(f"refine_strength must lie in (0, 1], got {self.refine_strength}.")
    if self.size is not None:
      size = tuple(self.size)
      if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"size must be (height, width), two positive integers, got {size}.")
      object.__setattr__(self, "size", size)

  @property
  def output_size(self) -> tuple[int, int]:
    """(height, width) of the stage's samples in pixels."""
    return self.size or (self.resolution, self.resolution)

  def noise_schedule(self):
    return schedules.get(self.schedule, **dict(self.schedule_kwargs))

  def preconditioner(self):
    return preconditioning_lib.get(self.preconditioning, self.sigma_data)

  def grid(self) -> np.ndarray:
    """The log-SNR grid [num_steps + 1] the stage samples on (``grid_kind``)."""
    schedule = self.noise_schedule()
    if self.grid_kind == "uniform":
      return grids.uniform_time(schedule, self.num_steps)
    if self.grid_kind == "karras":
      return grids.karras_for_schedule(schedule, self.num_steps, rho=self.rho)
    return grids.discrete(schedule, self.num_steps, self.grid_kind)

  def guidance_weight(self):
    """The guidance weight: a float, or a function logsnr [B] -> w [B]."""
    return guidance_schedules.weight_fn(self.guidance_schedule, self.noise_schedule(),
                                        self.guidance_scale, self.guidance_min)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> StageSpec:
    d = dict(d)
    for name in ("schedule_kwargs", "sampler_options", "lowres_schedule_kwargs"):
      d[name] = tuple((k, v) for k, v in d.get(name, ()))
    if d.get("size") is not None:
      d["size"] = tuple(d["size"])
    return cls(**d)


def _refiner_error(previous, stage) -> str | None:
  """Why ``stage`` (given a refine_strength) cannot refine ``previous``'s output."""
  if stage.super_resolution:
    return ("it is a super-resolution stage; a refiner is a text-to-image stage run as "
            "SDEdit on the output of the stage before it.")
  if stage.kind is not stage_kinds.PIXEL:
    return "it is a latent stage; a refiner works on pixels (a pixel-space stage)."
  if previous.spec.resolution != stage.spec.resolution:
    return (f"it samples at {stage.spec.resolution} px and the stage before it at "
            f"{previous.spec.resolution} px; a refiner keeps the resolution.")
  return None


def chain_error(previous_resolution: int, resolution: int, trained_lowres: int | None,
                trained_resolution: int, trained_on_crops: bool) -> str | None:
  """Why a super-resolution stage cannot follow a stage sampling at
  ``previous_resolution`` px, or None if it can.

  The U-Net resizes whatever low-res image it gets to its output size, so a mismatch
  would not fail, it would silently sample a different upsampling than the one trained
  (a 32 -> 64 px stage after a 64 px stage would make 128 px images).
  """
  if trained_lowres is None:
    return ("its U-Net config has no lowres_resolution, so the low-res size it was "
            "trained on is unknown; set UNetConfig.lowres_resolution.")
  if trained_on_crops:
    scale = trained_resolution / trained_lowres
    if resolution * trained_lowres != previous_resolution * trained_resolution:
      return (f"it was trained on {trained_lowres} -> {trained_resolution} px crops (x"
              f"{scale:g}), so after a {previous_resolution} px stage it must sample at "
              f"{previous_resolution * scale:g} px, not {resolution} px.")
    return None
  if previous_resolution != trained_lowres:
    return (f"it was trained to upsample {trained_lowres} -> {trained_resolution} px, but "
            f"the stage before it samples at {previous_resolution} px: put a stage that "
            f"outputs {trained_lowres} px before it (only a stage trained on random crops, "
            "config.data.crop='random', may take other sizes).")
  if resolution != trained_resolution:
    return (f"it was trained to upsample {trained_lowres} -> {trained_resolution} px, so it "
            f"must sample at {trained_resolution} px, not {resolution} px.")
  return None


@dataclasses.dataclass
class Stage:
  """A U-Net, its params, its sampling spec and its kind (``diffusion_jax.stage_kinds``:
  pixels, or a frozen autoencoder's latents, decoded after sampling). ``spec.resolution``
  is the stage's output size in pixels whatever the kind. ``conditioning``: the
  ``to_json`` of each of the stage's conditions beyond text (``diffusion_jax.conditioning``);
  the cascade fills in those with a sampling default (micro-conditioning), the others need
  their input (edit.py, unclip.py give it)."""

  model: unet_lib.UNet
  params: Any
  spec: StageSpec
  kind: Any = stage_kinds.PIXEL
  conditioning: tuple = ()

  def sampling_inputs(self, batch: int, given: dict | None = None) -> dict:
    """The U-Net keywords the cascade gives this stage's conditions by default, with the
    inputs ``given`` by the caller (e.g. unclip.py's ``image_embed``) in their place."""
    from diffusion_jax import conditioning as conditioning_lib

    given = dict(given or {})
    out = {}
    for described in self.conditioning:
      if conditioning_lib.from_json(described).input_name in given:
        continue
      default = conditioning_lib.sampling_default(described, batch, self.spec.output_size)
      if default is None:
        raise ValueError(f"this stage is conditioned on {described['kind']}, which "
                         "text-to-image sampling cannot give it.")
      for name, value in default.items():  # in the conditions' order, as train_inputs
        out[name] = value if name not in out else jnp.concatenate([out[name], value], -1)
    return {**out, **given}

  @property
  def super_resolution(self) -> bool:
    return self.model.config.super_resolution


class Cascade:
  """An ordered list of stages sharing one text encoder (``encode(prompts) -> (emb,
  mask)``); the first stage is the base stage."""

  def __init__(self, stages: Sequence[Stage], text_encoder, clip_guide=None,
               guides: Sequence = ()):
    """``guides``: what steers the base stage, each with ``encode(prompts)`` -> a pytree of
    [B, ...] arrays and ``wrapper(encoded, parameterization)`` -> a model_fn wrapper
    (``clip_guidance.ClipGuide``, ``classifier_guidance.ClassifierGuide``), applied in
    order after classifier-free guidance; ``clip_guide``: a ClipGuide put first."""
    if not stages:
      raise ValueError("A cascade needs at least one stage.")
    if stages[0].super_resolution:
      raise ValueError("The first stage must be a base (text-to-image) stage.")
    if stages[0].spec.refine_strength is not None:
      raise ValueError("The first stage cannot be a refiner (refine_strength): it has no "
                       "stage's output to refine.")
    from diffusion_jax import conditioning as conditioning_lib

    for number, stage in enumerate(stages, start=1):
      error = conditioning_lib.size_error(stage.conditioning, stage.spec.resolution,
                                          stage.spec.size)
      if error:
        raise ValueError(f"Stage {number} cannot sample at {stage.spec.output_size}: {error}")
    height, width = stages[0].spec.output_size
    if height != width and len(stages) > 1:
      raise ValueError(f"The base stage samples {height}x{width} (an aspect bucket); the "
                       "stages after it chain square images only: sample it alone.")
    for number, (prev, stage) in enumerate(zip(stages, stages[1:], strict=False), start=2):
      if stage.spec.refine_strength is not None:
        error = _refiner_error(prev, stage)
        if error:
          raise ValueError(f"Stage {number} cannot refine: {error}")
        continue
      if not stage.super_resolution:
        raise ValueError("Every stage after the first must be a super-resolution stage (or "
                         "a refiner: a text-to-image stage given a refine_strength).")
      if stage.spec.lowres_schedule is None:
        raise ValueError("A super-resolution stage needs spec.lowres_schedule.")
      cfg = stage.model.config
      error = chain_error(prev.spec.resolution, stage.spec.resolution, cfg.lowres_resolution,
                          cfg.resolution, stage.spec.trained_on_crops)
      if error:
        raise ValueError(f"Stage {number} does not chain: {error}")
    self.stages, self.text_encoder = list(stages), text_encoder
    self.guides = ([clip_guide] if clip_guide is not None else []) + list(guides)
    self._compiled: dict[int, Callable] = {}

  def _stage_fn(self, index: int) -> Callable:
    if index not in self._compiled and self.stages[index].spec.refine_strength is not None:
      self._compiled[index] = self._refiner_fn(self.stages[index])
    if index not in self._compiled:
      stage = self.stages[index]
      spec = stage.spec
      image_shape = stage.kind.sample_shape(spec.output_size, stage.model.config.out_channels)
      lowres_schedule = (schedules.get(spec.lowres_schedule,
                                       **dict(spec.lowres_schedule_kwargs))
                         if spec.lowres_schedule else None)
      grid = spec.grid()  # numpy, built outside the trace
      scale = spec.guidance_weight()

      def run(params, text_emb, text_mask, null_cond, keys, lowres, guide_inputs=None,
              extra_cond=None, null_extra=None):
        extra = {"extra_cond": extra_cond, "null_extra": null_extra}
        if guide_inputs is not None:
          wrappers = [g.wrapper(inputs, spec.parameterization)
                      for g, inputs in zip(self.guides, guide_inputs, strict=True)]
          extra["guide"] = functools.reduce(lambda f, g: lambda m: g(f(m)), wrappers)
        if lowres is not None:
          # Noise-conditioning augmentation at the fixed level aug_level, per-image noise.
          logsnr = jnp.full((lowres.shape[0],), lowres_schedule.logsnr(spec.aug_level))
          noise = jax.vmap(lambda k, x: jax.random.normal(jax.random.fold_in(k, 2**31 - 1),
                                                          x.shape))(keys, lowres)
          extra.update(lowres=schedules.q_sample(lowres, noise, logsnr),
                       lowres_logsnr=logsnr)
        if stage.conditioning:
          extra["extra_cond"] = stage.sampling_inputs(text_emb.shape[0], extra_cond)
          if null_extra is not None:  # the defaults (micro-conditioning) condition both halves
            extra["null_extra"] = {**extra["extra_cond"], **null_extra}
        return sample_stage(
            stage.model, params, text_emb, text_mask, null_cond, keys, grid,
            image_shape=image_shape, parameterization=spec.parameterization,
            sampler=spec.sampler, guidance_scale=scale,
            threshold=spec.threshold, percentile=spec.percentile,
            sampler_options=dict(spec.sampler_options),
            preconditioning=spec.preconditioner(), **extra)

      self._compiled[index] = jax.jit(run)
    return self._compiled[index]

  @staticmethod
  def _refiner_fn(stage: Stage) -> Callable:
    spec = stage.spec
    grid = spec.grid()

    def run(params, text_emb, text_mask, null_cond, keys, previous, guide_inputs=None):
      # A refiner's own conditions (micro-conditioning, an aspect bucket's size) get their
      # sampling defaults, for both guidance halves, as a base stage's do.
      extra = stage.sampling_inputs(text_emb.shape[0]) if stage.conditioning else None
      return refine_stage(
          stage.model, params, text_emb, text_mask, null_cond, keys, grid, previous,
          spec.refine_strength, parameterization=spec.parameterization, sampler=spec.sampler,
          sampler_options=dict(spec.sampler_options), guidance_scale=spec.guidance_weight(),
          threshold=spec.threshold, percentile=spec.percentile,
          preconditioning=spec.preconditioner(), extra_cond=extra)

    return jax.jit(run)

  def sample(self, prompts: Sequence[str], key: jax.Array, *, first_index: int = 0,
             progress: Callable[[str], None] | None = None, extra_cond: dict | None = None,
             null_extra: dict | None = None) -> list[np.ndarray]:
    """Images of every stage, [B, H_k, W_k, C] floats in [-1, 1], base stage first.

    Image b of this call is image ``first_index + b`` of the run seeded by ``key``.
    ``extra_cond`` / ``null_extra``: the base stage's other conditions (U-Net keywords,
    leaves [B, ...], e.g. unCLIP's ``image_embed``; ``guided_model_fn``).
    """
    emb, mask = self.text_encoder.encode(list(prompts))
    null_emb, null_mask = self.text_encoder.encode([""])
    null = {"text_emb": jnp.asarray(null_emb[0]), "text_mask": jnp.asarray(null_mask[0])}
    emb, mask = jnp.asarray(emb), jnp.asarray(mask)
    outputs, lowres = [], None
    for index, stage in enumerate(self.stages):
      keys = samplers.image_keys(jax.random.fold_in(key, index), len(prompts), first_index)
      if progress:
        size = stage.spec.size
        progress(f"stage {index + 1}/{len(self.stages)}: "
                 f"{f'{size[0]}x{size[1]}' if size else stage.spec.resolution} px, "
                 f"{stage.spec.sampler} x {stage.spec.num_steps} steps, guidance "
                 f"{stage.spec.guidance_scale}")
      guide_inputs = (tuple(g.encode(prompts) for g in self.guides)
                      if index == 0 and self.guides else None)
      extra = {"extra_cond": extra_cond, "null_extra": null_extra} if index == 0 else {}
      images = stage.kind.decode(self._stage_fn(index)(stage.params, emb, mask, null, keys,
                                                       lowres, guide_inputs, **extra))
      lowres = images
      outputs.append(np.asarray(jax.device_get(images)))
    return outputs


# ----------------------------------------------------------------------------------------
# Exported stages: EMA params (orbax) + model config and sampling spec (JSON).


def unet_config_to_json(config: unet_lib.UNetConfig) -> dict:
  return dataclasses.asdict(config)


def unet_config_from_json(d: dict) -> unet_lib.UNetConfig:
  d = dict(d)
  d["levels"] = tuple(unet_lib.Level(**level) for level in d["levels"])
  return unet_lib.UNetConfig(**d)


def export_stage(stage: Stage, directory: str | pathlib.Path, text_encoder: dict) -> None:
  """Writes ``stage.json`` and the params (an orbax PyTree) into ``directory``.

  ``text_encoder``: how to rebuild the encoder the stage was trained with, e.g.
  {"encoder": "t5-offline", "max_length": 16, "id": encoder.encoder_id}.
  """
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).resolve()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "params", stage.params, force=True)
  meta = {"unet": unet_config_to_json(stage.model.config), "spec": stage.spec.to_json(),
          "text_encoder": text_encoder, "kind": stage.kind.to_json(),
          "conditioning": list(stage.conditioning)}
  (directory / "stage.json").write_text(json.dumps(meta, indent=2))


def load_exported_stage(directory: str | pathlib.Path) -> tuple[Stage, dict]:
  """(Stage, its text-encoder description) from ``export_stage``'s directory."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).resolve()
  meta_path = directory / "stage.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"{meta_path} not found: {directory} is not an exported stage "
                            "(export one with experiments/sample.py --export_dir).")
  meta = json.loads(meta_path.read_text())
  model = unet_lib.UNet(unet_config_from_json(meta["unet"]))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(directory / "params")
  try:
    kind = stage_kinds.from_json(meta.get("kind"))
  except (FileNotFoundError, ValueError) as e:
    raise FileNotFoundError(f"{meta_path}: its stage kind cannot be loaded: {e}") from None
  return (Stage(model, params, StageSpec.from_json(meta["spec"]), kind,
                tuple(meta.get("conditioning") or ())), meta["text_encoder"])


def replace_spec(stage: Stage, **changes) -> Stage:
  """The same stage with some sampling settings changed (None values are ignored)."""
  changes = {k: v for k, v in changes.items() if v is not None}
  return dataclasses.replace(stage, spec=dataclasses.replace(stage.spec, **changes))

