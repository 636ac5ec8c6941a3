"""Training the KL autoencoder of latent diffusion (Rombach et al. 2022, section 3).

Loss per image: ``l1_weight * mean|x - x'| + l2_weight * mean (x - x')^2 +
kl_weight * KL(q(z|x) || N(0, I)) / (H * W * C)``, x' decoded from a posterior sample.
Dividing the summed KL by the number of pixel values keeps LDM's ratio (it sums both the
reconstruction and the KL and weights the KL 1e-6) while the reconstruction terms stay
per-pixel means. No perceptual (LPIPS) or adversarial term: neither has a pretrained
network or a CPU budget here (see the README's latent-diffusion section).

After training, the latent scale factor is computed from data: ``1 / std`` of the
posterior means over ``scale_batches`` training batches, so scaled latents have unit
variance (LDM appendix G; SD's 0.18215 came about the same way). It is written into the
exported diffusers config.json (``scaling_factor``) next to the weights, and, with the
reconstruction PSNR of the same batches, into ``autoencoder.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from diffusion_jax import sharding
from diffusion_jax.models import autoencoder as ae
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import state as state_lib

EXPORT_DIR = "autoencoder"       # the diffusers directory a latent stage loads
SUMMARY_NAME = "autoencoder.json"


@dataclasses.dataclass(frozen=True)
class LossSettings:
  l1_weight: float = 1.0
  l2_weight: float = 0.0
  kl_weight: float = 1e-6

  def __post_init__(self):
    for name in ("l1_weight", "l2_weight", "kl_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
    if self.l1_weight == self.l2_weight == 0:
      raise ValueError("l1_weight and l2_weight are both 0: nothing would be reconstructed.")


@dataclasses.dataclass(frozen=True)
class AutoencoderLoop:
  num_steps: int
  batch_size: int
  resolution: int
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 2
  scale_batches: int = 4
  mesh_axes: tuple[tuple[str, int], ...] = (("data", -1), ("model", 1))
  rules: sharding.LogicalRules = sharding.FSDP_RULES

  def __post_init__(self):
    for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "scale_batches"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


def psnr(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2): [B]."""
  mse = jnp.mean(jnp.square(x - y).reshape(x.shape[0], -1), axis=-1)
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def loss_fn(params, model: ae.AutoencoderKL, images: jnp.ndarray, key: jax.Array,
            settings: LossSettings):
  """(mean loss, metrics) for images [B, H, W, C] in [-1, 1]."""
  recon, mean, logvar = model.apply({"params": params}, images, key)
  diff = (recon - images).reshape(images.shape[0], -1)
  l1, l2 = jnp.abs(diff).mean(-1), jnp.square(diff).mean(-1)
  kl = ae.kl_divergence(mean, logvar) / diff.shape[-1]
  per_example = settings.l1_weight * l1 + settings.l2_weight * l2 + settings.kl_weight * kl
  metrics = {"loss": per_example.mean(), "l1": l1.mean(), "l2": l2.mean(), "kl": kl.mean(),
             "psnr": psnr(jnp.clip(recon, -1, 1), images).mean()}
  return per_example.mean(), metrics


def train_step(state: state_lib.TrainState, images: jnp.ndarray, *, model: ae.AutoencoderKL,
               tx: optax.GradientTransformation, settings: LossSettings,
               ema_decay: float = 0.999):
  """One AdamW step on a batch [B, H, W, C] (pure; jit with donate_argnums=0). A step with
  a non-finite loss or gradient changes only the step counter and the non-finite counters."""
  key = jax.random.fold_in(state.key, state.step)
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, model, images, key, settings)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = state_lib.ema_decay_at(state.step, ema_decay, True)
  ema = state_lib.ema_update(state.ema_params, params, decay)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      ema_params=keep(ema, state.ema_params), opt_state=keep(opt_state, state.opt_state),
      nonfinite_in_a_row=in_a_row,
      nonfinite_total=(state.nonfinite_total + (~finite)).astype(jnp.int32),
      nonfinite_longest=jnp.maximum(state.nonfinite_longest, in_a_row))
  return new_state, dict(metrics, grad_norm=grad_norm)


def latent_statistics(encode: Callable[[jnp.ndarray], jnp.ndarray],
                      batches: Iterator[jnp.ndarray], num_batches: int,
                      reconstruct: Callable[[jnp.ndarray], jnp.ndarray] | None = None) -> dict:
  """{"scale_factor": 1 / std of the unscaled latents, "latent_mean", "latent_std",
  ["psnr"]} over ``num_batches`` batches of images [B, H, W, C] (running sums in float64)."""
  count = total = total_sq = 0.0
  psnrs = []
  for _ in range(num_batches):
    images = next(batches)
    z = np.asarray(jax.device_get(encode(images)), np.float64)
    count, total, total_sq = count + z.size, total + z.sum(), total_sq + np.square(z).sum()
    if reconstruct is not None:
      recon = jnp.clip(reconstruct(images), -1, 1)
      psnrs.append(np.asarray(jax.device_get(psnr(recon, images))))
  mean = total / count
  std = math.sqrt(max(total_sq / count - mean ** 2, 1e-24))
  out = {"scale_factor": 1.0 / std, "latent_mean": mean, "latent_std": std}
  if psnrs:
    out["psnr"] = float(np.concatenate(psnrs).mean())
  return out


def train(workdir: str | epath.PathLike, *, config: ae.AutoencoderConfig, loop: AutoencoderLoop,
          loss: LossSettings, optimizer: state_lib.OptimizerSettings,
          data_factory: Callable[[], Iterator[dict]], config_json: dict | None = None,
          log: Callable[[str], None] = print) -> dict:
  """Trains an autoencoder in ``workdir`` (resuming from its checkpoints), then computes
  the latent scale factor and reconstruction PSNR and exports ``workdir/autoencoder/`` in
  diffusers' layout (the directory a latent stage's ``config.autoencoder.directory`` names).
  Returns the summary written to ``workdir/autoencoder.json``."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config_json is not None and jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
  if loop.resolution % config.downsample_factor:
    raise ValueError(f"resolution {loop.resolution} must divide by the autoencoder's "
                     f"downsampling factor {config.downsample_factor}.")
  mesh = sharding.make_mesh(dict(loop.mesh_axes))
  model, tx = ae.AutoencoderKL(config), state_lib.make_optimizer(optimizer)
  example = ae.example_input(config, loop.resolution)

  def init_state(key):
    return state_lib.create_train_state(model.init(key, example)["params"], tx, key)

  abstract = jax.eval_shape(init_state, jax.random.key(0))
  shardings = sharding.shardings_from_abstract(abstract, mesh, loop.rules)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=loop.keep_checkpoints)
  data = data_factory()
  if checkpointer.latest_step() is not None:
    target = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings)
    state, saved_data = checkpointer.restore(target)
    own, _ = ckpt_lib.data_state_of_process(saved_data, jax.process_index(),
                                            jax.process_count())
    if own is not None:
      data.set_state(own)
    log(f"Resumed from {checkpointer.directory} at step {int(state.step)}.")
  else:
    state, _ = sharding.init_sharded(init_state, mesh, loop.rules, jax.random.key(loop.seed))
  log(f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M autoencoder "
      f"parameters, f={config.downsample_factor}, {config.latent_channels} latent channels.")
  image_sharding = sharding.batch_sharding(mesh, loop.rules, 4)
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, settings=loss),
                    in_shardings=(shardings, image_sharding), out_shardings=(shardings, None),
                    donate_argnums=0)

  def images_of(batch):
    return sharding.host_local_to_global(np.asarray(batch["image"], np.float32), mesh,
                                         loop.rules)

  step, last = int(state.step), {}
  with sharding.sharding_context(mesh, loop.rules):
    start = time.time()
    try:
      while step < loop.num_steps:
        state, metrics = step_fn(state, images_of(next(data)))
        step += 1
        if step % loop.log_every == 0 or step == loop.num_steps:
          last = {k: float(v) for k, v in jax.device_get(metrics).items()}
          log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items()))
              + f" ({step * loop.batch_size / max(time.time() - start, 1e-9):.1f} img/s)")
        if step % loop.checkpoint_every == 0 or step == loop.num_steps:
          checkpointer.save(step, state, data.get_state(), config_json)
      params = state.params
      encode = jax.jit(lambda x: model.apply({"params": params}, x, method="encode")[0])
      reconstruct = jax.jit(lambda x: model.apply({"params": params}, x)[0])
      stats = latent_statistics(encode, map(images_of, data), loop.scale_batches, reconstruct)
    finally:
      checkpointer.wait()
      checkpointer.close()
  scaled = dataclasses.replace(config, scaling_factor=stats["scale_factor"])
  summary = dict(stats, step=step, train_metrics=last, downsample_factor=config.downsample_factor,
                 latent_channels=config.latent_channels)
  if jax.process_index() == 0:
    export = ae.save_diffusers(str(workdir / EXPORT_DIR), scaled, state.params, loop.resolution)
    summary["export"] = str(export)
    (workdir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
  log(f"Latent scale factor {stats['scale_factor']:.4g} (latent std {stats['latent_std']:.4g}),"
      f" reconstruction PSNR {stats.get('psnr', float('nan')):.2f} dB; exported to "
      f"{workdir / EXPORT_DIR}.")
  return summary
