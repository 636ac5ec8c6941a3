"""Loading for experiments/unclip.py (no flags defined here, so tests import it): the
decoder cascade of training workdirs (refused unless its first stage was trained with a CLIP
image embedding), the CLIP it was trained against, the prior (refused when trained
against another CLIP) and the input image. Each raises UserError with one line."""

from __future__ import annotations

import json
import pathlib

import guide_builders
import sampler_flags
import sampling
from builders import UserError


def read_image(path: str, resolution: int):
  """--image as floats [R, R, 3] in [-1, 1] (resized to the decoder's size)."""
  import cli

  if not path:
    raise UserError("variations needs --image=PNG (the image to make variations of).")
  return cli.read_png(path, "--image", resolution).astype("float32") / 127.5 - 1.0

def load_clip_dir(path, flag: str):
  """(CLIP, its directory) of ``path`` (a train_clip workdir or CLIP directory) named by
  ``flag``, or UserError (one line)."""
  from diffusion_jax import unclip

  if not path:
    raise UserError(f"{flag} is required: a CLIP directory (experiments/train_clip.py's "
                    "workdir, or a Hugging Face CLIPModel directory).")
  try:
    return unclip.load_clip(path)
  except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as e:
    raise UserError(f"{flag}={path}: {e}") from None


def decoder_config(workdir: str):
  """The decoder workdir's config, refused unless it was trained with an image embedding."""
  import conditioning_builders

  config = sampling.load_workdir_config(workdir)
  kind = conditioning_builders.kind(config)
  if kind != "image_embed":
    raise UserError(f"--workdirs: {workdir} was not trained with a CLIP image embedding "
                    f"(its config.conditioning.kind is {kind!r}); the first stage must be an "
                    "unCLIP decoder (experiments/train.py --config="
                    "configs/unclip_decoder_shapes.py).")
  return config


def load_clip(f, config):
  """(ImageEmbedder of the decoder's CLIP, its CLIP) (UserError, one line)."""
  from diffusion_jax import unclip

  flag = "--clip_dir" if f.clip_dir else f"{f.workdirs[0]}'s config.conditioning.clip_dir"
  clip, directory = load_clip_dir(f.clip_dir or config.conditioning.clip_dir, flag)
  embed_dim = config.conditioning.get("embed_dim")
  if embed_dim is not None and embed_dim != clip.config.projection_dim:
    raise UserError(f"{flag}: the CLIP in {directory} embeds into "
                    f"{clip.config.projection_dim} dimensions, the decoder was trained on "
                    f"{embed_dim}.")
  return unclip.ImageEmbedder(clip, directory), clip


def _same_clip(a: str, b: str) -> bool:
  """Whether two CLIP directories hold the same weights (same path, or same bytes)."""
  import hashlib

  pa, pb = pathlib.Path(a).resolve(), pathlib.Path(b).resolve()
  if pa == pb:
    return True
  digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
  try:
    return digest(pa) == digest(pb)
  except OSError:
    return False


def load_prior(f, embedder, clip):
  """The prior's sampler, with the decoder's CLIP (refused if the prior's was another)."""
  from diffusion_jax.training import prior_train

  path = pathlib.Path(f.prior) / prior_train.PRIOR_JSON
  if not path.is_file():
    raise UserError(f"--prior: {path} not found: {f.prior} is not a prior workdir (train one "
                    "with experiments/train_prior.py --workdir=...).")
  trained_with = json.loads(path.read_text()).get("clip_dir", "")
  if not f.clip_dir and not _same_clip(trained_with, embedder.directory):
    raise UserError(f"--prior was trained against the CLIP in {trained_with}, the decoder "
                    f"against {embedder.directory}: their embedding spaces differ (train both "
                    "with one CLIP, or pass --clip_dir to insist).")
  try:
    return prior_train.load_sampler(f.prior, clip, f.prior_checkpoint_step,
                                    num_steps=f.prior_steps,
                                    guidance_scale=f.prior_guidance_scale,
                                    num_candidates=f.prior_candidates)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"--prior={f.prior}: {e}") from None


def load_decoder(f):
  """(Cascade of the decoder and SR stages, descriptions, ImageEmbedder, CLIP, config)."""
  config = decoder_config(f.workdirs[0])
  embedder, clip = load_clip(f, config)
  settings = {name: getattr(f, name) for name in sampler_flags.NAMES
              if name not in ("workdirs", "stages", "seed", *guide_builders.FLAGS)}
  for kind in guide_builders.KINDS:
    if getattr(f, kind.scale_flag):
      raise UserError(f"--{kind.scale_flag} is not supported by unclip.py.")
  per_stage, steps = sampling.stage_settings(len(f.workdirs), num_workdirs=len(f.workdirs),
                                             **settings)
  cascade, described, _ = sampling.load_cascade(f.workdirs, checkpoint_steps=steps,
                                                per_stage=per_stage)
  return cascade, described, embedder, clip, config
