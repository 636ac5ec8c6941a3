"""Model FLOPs of one train step of a stage's config, counted without running it: the
ablation harness's equal-compute budgets (a sweep's ``equal_compute``) turn them into each
arm's step count.

The step is lowered (not compiled) on abstract inputs of the config's shapes (batch, image
and low-res sizes, the text encoder's embedding length and width), and XLA's cost analysis
of its unoptimised HLO gives the FLOPs (diffusion_jax.training.flops: with dense attention,
so a pairwise-attention loop is counted in full). A latent stage counts the U-Net's step on
latents; the frozen autoencoder's encoding of each batch is not included. Checked once
against benchmarks/train.py's count on the real step's arrays: equal (9.559 and 5.386
GFLOP for demo_base:smoke and demo_sr:smoke).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import builders
import ml_collections

_CACHE: dict[str, float] = {}


def step_gflop(config: ml_collections.ConfigDict) -> float:
  """GFLOP of one train step of ``config`` (global batch; cached per config)."""
  key = json.dumps(config.to_dict(), sort_keys=True, default=str)
  if key not in _CACHE:
    _CACHE[key] = _count(config)
  return _CACHE[key]


def _count(config) -> float:
  import conditioning_builders
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import latent_builders

  from diffusion_jax import sharding
  from diffusion_jax.models import unet as unet_lib
  from diffusion_jax.training import flops
  from diffusion_jax.training import loop as loop_lib
  from diffusion_jax.training import state as state_lib
  from diffusion_jax.training.step import train_step

  if config.text.trainable:
    raise builders.UserError("equal_compute counts the train step on precomputed text "
                             "embeddings; config.text.trainable=True is not supported.")
  loop = builders.loop_settings(config)
  mesh = sharding.make_mesh({"data": 1})
  _, model_cfg, loop = latent_builders.for_training(config, builders.unet_config(config), loop,
                                                    mesh, loop.rules)
  model = unet_lib.UNet(model_cfg)
  null = loop_lib.encode_null(builders.text_encoder(config))
  text_len, text_dim = null["text_emb"].shape
  inputs = loop_lib.init_inputs(model_cfg, loop.resolution, loop.lowres_resolution, text_len,
                                text_dim)
  tx = state_lib.make_optimizer(builders.optimizer_settings(config))
  init_state, abstract, _ = loop_lib.state_spec(model, tx, inputs, mesh, loop.rules)
  b, c = loop.batch_size, model_cfg.in_channels

  def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)

  batch = {"image": spec((b, loop.resolution, loop.resolution, c)),
           "text_emb": spec((b, text_len, text_dim)), "text_mask": spec((b, text_len), bool)}
  if loop.lowres_resolution is not None:
    batch["lowres"] = spec((b, loop.lowres_resolution, loop.lowres_resolution, c))
  # The conditions' arrays (an image embedding's encoder runs before the step: not counted).
  conds = conditioning_builders.conditions(config, c)
  for condition in conds:
    if condition.batch_key is not None:
      shape = ((b, loop.resolution, loop.resolution, condition.width)
               if condition.batch_ndim == 4 else (b, condition.width))
      batch[condition.batch_key] = spec(shape)
  null = {k: spec(v.shape, v.dtype) for k, v in null.items()}
  state = jax.tree.map(lambda x: spec(x.shape, x.dtype), nn.unbox(abstract))
  settings = builders.step_settings(config)
  settings = dataclasses.replace(
      settings, diffusion=dataclasses.replace(settings.diffusion, conditions=conds))
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, settings=settings))
  with sharding.sharding_context(mesh, loop.rules):
    return flops.model_gflop(step, state, batch, null)
