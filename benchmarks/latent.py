"""Latent vs pixel diffusion at the same output resolution, side by side in one run: train
and sample images/s of the same U-Net preset diffusing 64 px pixels or the 16x16x4 latents
of an f = 4 autoencoder (configs/autoencoder_shapes.py's layout, random weights).

The latent rows include the autoencoder's work: encoding each training batch (jitted, the
posterior mean) and decoding the samples. Params are random (speed does not depend on
their values); text is random [B, 16, 384] embeddings. "train" is the median of
``--repeats`` steady train steps (encode + step for latents) at ``--batch``; "sample" the
median of steady ``Cascade.sample`` calls (DDIM, ``--steps`` steps, guidance 3, decode).

  python benchmarks/latent.py [--resolution 64] [--batch 8] [--steps 20] [--repeats 3]
      [--preset demo_base] [--f 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import numpy as np

from benchmarks import common
from diffusion_jax import cascade as cascade_lib
from diffusion_jax import sharding, stage_kinds
from diffusion_jax.models import autoencoder as ae
from diffusion_jax.models import unet as unet_lib
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib

TEXT_LEN, TEXT_DIM = 16, 384


class RandomText:
  def encode(self, prompts):
    rng = np.random.default_rng(len(prompts))
    return (rng.standard_normal((len(prompts), TEXT_LEN, TEXT_DIM)).astype(np.float32),
            np.ones((len(prompts), TEXT_LEN), bool))


def autoencoder_kind(f: int, resolution: int) -> stage_kinds.LatentKind:
  widths = {4: (32, 64, 64), 8: (32, 64, 64, 64)}[f]
  cfg = ae.AutoencoderConfig(block_out_channels=widths, norm_num_groups=16)
  model = ae.AutoencoderKL(cfg)
  params = jax.jit(lambda k: model.init(k, ae.example_input(cfg, resolution))["params"])(
      jax.random.key(1))
  return stage_kinds.LatentKind(ae.PretrainedAutoencoder(model, params, cfg), "random")


def measure(kind, preset: str, resolution: int, batch: int, steps: int, repeats: int) -> dict:
  channels = 3
  shape = kind.sample_shape(resolution, channels)
  unet_cfg = dataclasses.replace(unet_lib.PRESETS[preset], in_channels=shape[-1],
                                 out_channels=shape[-1], resolution=shape[0],
                                 text_width=TEXT_DIM, text_length=TEXT_LEN)
  model = unet_lib.UNet(unet_cfg)
  mesh = sharding.make_mesh()
  rules = sharding.FSDP_RULES
  tx = state_lib.make_optimizer(state_lib.OptimizerSettings(warmup_steps=1))
  inputs = loop_lib.init_inputs(unet_cfg, shape[0], None, TEXT_LEN, TEXT_DIM)
  init_state, _, shardings = loop_lib.state_spec(model, tx, inputs, mesh, rules)
  state, _ = sharding.init_sharded(init_state, mesh, rules, jax.random.key(0))
  settings = step_lib.StepSettings(step_lib.DiffusionSettings())
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, settings=settings),
                 donate_argnums=0)
  rng = np.random.default_rng(0)
  emb, mask = RandomText().encode(["x"] * batch)
  host = {"image": rng.uniform(-1, 1, (batch, resolution, resolution, channels)).astype(
      np.float32), "text_emb": emb, "text_mask": mask}
  null = {"text_emb": jax.numpy.asarray(emb[0]), "text_mask": jax.numpy.asarray(mask[0])}
  holder = [state]

  def train_once():
    with sharding.sharding_context(mesh, rules):
      batch = kind.encode_batch(sharding.host_local_to_global(host, mesh, rules))
      holder[0], metrics = step(holder[0], batch, null)
    return metrics["loss"]

  train_s = common.median_seconds(train_once, repeats)
  spec = cascade_lib.StageSpec(resolution=resolution, num_steps=steps,
                               threshold=kind.default_threshold)
  cascade = cascade_lib.Cascade(
      [cascade_lib.Stage(model, holder[0].ema_params, spec, kind)], RandomText())
  prompts = ["x"] * batch
  sample_s = common.median_seconds(lambda: cascade.sample(prompts, jax.random.key(0))[-1],
                                   repeats)
  params = sum(x.size for x in jax.tree.leaves(holder[0].params))
  return {"kind": kind.name, "network input": "x".join(map(str, shape)),
          "U-Net params (M)": params / 1e6, "train img/s": batch / train_s,
          "sample img/s": batch / sample_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--resolution", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--preset", default="demo_base", choices=sorted(unet_lib.PRESETS))
  parser.add_argument("--f", type=int, default=4, choices=(4, 8))
  args = parser.parse_args()
  if args.resolution % (args.f * 4):
    parser.error(f"--resolution={args.resolution} must divide by {args.f * 4} (f x the "
                 "U-Net's 3 levels)")
  rows = [measure(kind, args.preset, args.resolution, args.batch, args.steps, args.repeats)
          for kind in (stage_kinds.PIXEL, autoencoder_kind(args.f, args.resolution))]
  names = list(rows[0])
  print(f"{args.resolution} px output, batch {args.batch}, DDIM {args.steps} steps + CFG, "
        f"preset {args.preset}, f={args.f} (contended CPU figures: compare within one run)")
  print(" | ".join(names))
  for row in rows:
    print(" | ".join(f"{row[n]:.2f}" if isinstance(row[n], float) else str(row[n])
                     for n in names))


if __name__ == "__main__":
  main()
