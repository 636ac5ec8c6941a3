"""Preview grids during training: the EMA params sampled for a few fixed prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax import cascade, images, stage_kinds
from diffusion_jax.diffusion import grids
from diffusion_jax.training.step import StepSettings


def _trainable(text_encoder) -> bool:
  return bool(getattr(text_encoder, "trainable", False))


def make_preview(model, step_settings: StepSettings, loop, text_encoder, null_cond,
                 stage_kind=stage_kinds.PIXEL):
  """A jitted EMA sampler for the preview prompts (base stages) of ``loop`` (a
  loop.LoopSettings), or None. A trainable text encoder encodes them with its EMA params,
  as sampling the checkpoint will; ``stage_kind`` decodes the samples (latent stages)."""
  # Stages conditioned on more than text (low-res images, input images, embeddings) have
  # nothing to condition a preview on.
  if (not loop.preview_every or not loop.preview_prompts or loop.lowres_resolution
      or step_settings.diffusion.conditions):
    return None
  diffusion = step_settings.diffusion
  prompts = list(loop.preview_prompts)
  trainable_text = _trainable(text_encoder)
  if trainable_text:
    tokens, mask = text_encoder.tokenize(prompts)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  else:
    emb, mask = text_encoder.encode(prompts)
    emb, mask = jnp.asarray(emb), jnp.asarray(mask)
  grid = grids.uniform_time(diffusion.schedule, loop.preview_steps)
  image_shape = (loop.resolution, loop.resolution, model.config.out_channels)

  @jax.jit
  def sample(params, text_params, key):
    null = null_cond
    if trainable_text:
      text_emb = text_encoder.apply(text_params, tokens, mask)
      null = {"text_emb": text_encoder.apply(text_params, null_cond["text_tokens"][None],
                                             null_cond["text_mask"][None])[0],
              "text_mask": null_cond["text_mask"]}
    else:
      text_emb = emb
    return cascade.sample_stage(
        model, params, text_emb, mask, null, key, grid,
        image_shape=image_shape, parameterization=diffusion.parameterization,
        sampler="ddim", guidance_scale=loop.preview_guidance_scale,
        threshold=stage_kind.default_threshold, preconditioning=diffusion.preconditioning)

  def preview(state, step, writer, workdir):
    out = stage_kind.decode(sample(state.ema_params, state.text_ema_params,
                                   jax.random.key(loop.seed)))
    if not out.is_fully_addressable:  # sharded over several processes: every one runs this
      from jax.experimental import multihost_utils
      out = multihost_utils.process_allgather(out, tiled=True)
    grid_image = images.make_grid(np.asarray(jax.device_get(out)), prompts, columns=4,
                                  scale=2)
    if jax.process_index() == 0:
      images.save_png(grid_image, epath.Path(workdir) / "previews" / f"step_{step}.png")
      writer.write_image(step, "preview", grid_image)

  return preview

