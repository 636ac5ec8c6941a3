"""The guides of sample.py's base stage from its flags: CLIP guidance (GLIDE;
``--clip_guidance_scale`` / ``--clip_checkpoint``) and classifier guidance with a
noise-aware attribute classifier (Dhariwal & Nichol 2021; ``--classifier_guidance_scale``
/ ``--classifier_checkpoint``). Each kind is one row of ``KINDS``: its flags, what loads
its checkpoint, how it is recorded and respelt in a regenerate command."""

from __future__ import annotations

import dataclasses
import math

from cli import UserError


@dataclasses.dataclass(frozen=True)
class GuideKind:
  name: str          # samples.json's key: "clip_guidance", "classifier_guidance"
  scale_flag: str
  checkpoint_flag: str
  what: str          # "CLIP", "attribute-classifier"
  hint: str          # where a checkpoint comes from


KINDS = (
    GuideKind("clip_guidance", "clip_guidance_scale", "clip_checkpoint", "CLIP",
              "a CLIP directory, e.g. <workdir>/clip written by experiments/train_clip.py "
              "with configs/clip_shapes.py:noisy"),
    GuideKind("classifier_guidance", "classifier_guidance_scale", "classifier_checkpoint",
              "attribute-classifier", "an attribute-classifier directory, e.g. "
              "<workdir>/classifier written by experiments/train_classifier.py with "
              "configs/attribute_classifier_shapes.py"),
)
# The sampler flags that are guides, not per-stage settings.
FLAGS = tuple(name for k in KINDS for name in (k.scale_flag, k.checkpoint_flag))


def _scale(kind: GuideKind, settings: dict) -> float:
  scale = float(settings.get(kind.scale_flag) or 0.0)
  if not (math.isfinite(scale) and scale >= 0):  # (a NaN scale would make every image NaN)
    raise UserError(f"--{kind.scale_flag}={scale}; it must be >= 0 and finite (0: no "
                    f"{kind.name.replace('_', ' ')}).")
  return scale


def check(settings: dict) -> None:
  """UserError (one line) for a negative or non-finite scale or a scale without a
  checkpoint, read from ``settings`` (sample.py's flag names) without loading anything.
  A checkpoint with scale 0 is guidance off (a sweep's scale axis passes through 0)."""
  for kind in KINDS:
    if _scale(kind, settings) and not settings.get(kind.checkpoint_flag):
      raise UserError(f"--{kind.scale_flag} needs --{kind.checkpoint_flag}: {kind.hint}.")


def _load(kind: GuideKind, checkpoint: str, scale: float):
  if kind.name == "clip_guidance":
    from diffusion_jax.diffusion import clip_guidance
    from diffusion_jax.models import clip as clip_lib
    return clip_guidance.ClipGuide(clip_lib.load(checkpoint), scale)
  from diffusion_jax.diffusion import classifier_guidance
  from diffusion_jax.models import attribute_classifier
  return classifier_guidance.ClassifierGuide(attribute_classifier.load(checkpoint), scale)


def load_guides(settings: dict) -> list:
  """The guides ``settings`` turn on, loaded (UserError, one line, on bad input)."""
  check(settings)
  guides = []
  for kind in KINDS:
    scale = _scale(kind, settings)
    if not scale:
      continue
    checkpoint = settings[kind.checkpoint_flag]
    try:
      guides.append(_load(kind, checkpoint, scale))
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as e:
      raise UserError(f"--{kind.checkpoint_flag}={checkpoint}: {e}") from None
  return guides


def check_stage(guides: list, stage, source: str) -> None:
  """UserError unless every guide can read the images ``stage`` (the base) samples."""
  shape = stage.kind.sample_shape(stage.spec.output_size, stage.model.config.out_channels)
  for guide in guides:
    if stage.kind.name != "pixel":  # a CLIP or classifier reads pixels, not latents
      flag = "--clip_checkpoint" if guide.__class__.__name__ == "ClipGuide" else (
          "--classifier_checkpoint")
      raise UserError(f"{flag} with {source}: guidance needs a pixel base stage, and this "
                      f"one is a {stage.kind.name} stage (its samples are not images "
                      f"until decoded).")
    if hasattr(guide, "check_image_shape"):
      try:
        guide.check_image_shape(shape)
      except ValueError as e:
        raise UserError(f"--classifier_checkpoint with {source}: {e}") from None


def check_prompts(guides: list, prompts, hint: str = "") -> None:
  """UserError (one line, ``hint`` appended) for a prompt a guide cannot read, before
  anything compiles."""
  for guide in guides:
    try:
      if hasattr(guide, "check_prompts"):  # (a CLIP reads any prompt)
        guide.check_prompts(list(prompts))
    except ValueError as e:
      raise UserError(f"{e}{hint}") from None


def record(settings: dict) -> dict:
  """samples.json's entries: {kind name: {"scale", "checkpoint"} or None}."""
  out = {}
  for kind in KINDS:
    scale = float(settings.get(kind.scale_flag) or 0.0)
    out[kind.name] = ({"scale": scale, "checkpoint": str(settings.get(kind.checkpoint_flag))}
                      if scale else None)
  return out


def regenerate_flags(settings: dict) -> list[str]:
  """The guide flags of a regenerate command."""
  flags = []
  for kind in KINDS:
    scale = float(settings.get(kind.scale_flag) or 0.0)
    if scale:
      flags += [f"--{kind.scale_flag}={scale}",
                f"--{kind.checkpoint_flag}={settings.get(kind.checkpoint_flag)}"]
  return flags
