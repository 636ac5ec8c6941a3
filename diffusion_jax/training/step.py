"""The pure train step: state, batch -> state, metrics.

One step: draw the noise level (``diffusion.noise_levels``: t ~ U[0, 1] of the schedule,
or EDM's log-normal), noise, condition dropout (and, for super-resolution stages, the
low-res augmentation level) from ``fold_in(state.rng, state.step)``; q_sample; run the
U-Net (inside EDM's preconditioning wrapper if one is set); take the weighted loss of the
diffusion core; average gradients over micro-batches; apply the optimizer and the EMA. A
step whose loss or gradient norm is NaN/Inf changes nothing but the step counter and the
non-finite counters (the host loop aborts after too many in a row).

Batch (global arrays, leading axis the batch B):
  image [B, H, W, C] float in [-1, 1]; text_mask [B, L] bool;
  text_emb [B, L, D] (a frozen encoder's output, computed on the host), or, when the text
  encoder trains with the U-Net, text_tokens [B, L] int32 (it runs inside the loss);
  lowres [B, h, w, C] for super-resolution stages; and the arrays of the stage's other
  conditions (``diffusion_jax.conditioning``: e.g. input_image [B, H, W, C]).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffusion_jax import conditioning
from diffusion_jax.diffusion import losses, noise_levels, preconditioning, schedules
from diffusion_jax.training.state import TrainState, ema_decay_at, ema_update


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionSettings:
  """What the network learns and how its loss is weighted.

  ``lowres_schedule`` (super-resolution stages only) gives Imagen's noise-conditioning
  augmentation: the low-res input is noised to logsnr = lowres_schedule.logsnr(t_aug),
  t_aug ~ U[0, lowres_aug_max_t] per example, and the network is told that level.

  ``noise_sampler``: the training noise-level distribution (``diffusion.noise_levels``);
  None draws t ~ U[0, 1] of ``schedule``. ``preconditioning``: None, or an
  ``EDMPreconditioning`` whose wrapper turns the U-Net into an x0 model (Karras et al.
  2022); with ``weighting="edm"`` and the log-normal sampler that is the paper's training.

  ``conditions``: the stage's conditions besides text and low-res image
  (``diffusion_jax.conditioning``), each dropped with its own probability.
  """

  schedule: Any = dataclasses.field(default_factory=schedules.ShiftedCosineSchedule)
  parameterization: str = "v"
  weighting: str = "uniform"
  min_snr_gamma: float = 5.0
  sigma_data: float = 0.5
  cond_drop_prob: float = 0.1
  lowres_schedule: Any = None
  lowres_aug_max_t: float = 1.0
  num_loss_buckets: int = 4
  noise_sampler: Any = None
  preconditioning: Any = None
  conditions: tuple = ()

  def __post_init__(self):
    if not 0.0 <= self.cond_drop_prob <= 1.0:
      raise ValueError(f"cond_drop_prob must lie in [0, 1], got {self.cond_drop_prob}.")
    if not 0.0 <= self.lowres_aug_max_t <= 1.0:
      raise ValueError(f"lowres_aug_max_t must lie in [0, 1], got {self.lowres_aug_max_t}.")
    losses.loss_weight(jnp.zeros(1), self.parameterization, self.weighting,
                       min_snr_gamma=self.min_snr_gamma, sigma_data=self.sigma_data)
    preconditioning.check_parameterization(self.preconditioning, self.parameterization)

  @property
  def noise_level_sampler(self):
    return self.noise_sampler or noise_levels.UniformTime(self.schedule)


@dataclasses.dataclass(frozen=True, eq=False)
class StepSettings:
  diffusion: DiffusionSettings
  ema_decay: float = 0.9999
  ema_warmup: bool = True
  grad_accum_steps: int = 1

  def __post_init__(self):
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}.")
    if self.grad_accum_steps < 1:
      raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}.")


def _loss_fn(params, model: nn.Module, batch, null_cond, key, settings: DiffusionSettings,
             text_apply=None):
  """(mean loss, metrics). ``params``: the U-Net's, or {"unet", "text"} with ``text_apply``
  (params, tokens [B, L], mask [B, L]) -> embeddings [B, L, D] for a trainable encoder."""
  x0 = batch["image"].astype(jnp.float32)
  b = x0.shape[0]
  k_t, k_eps, k_drop, k_aug, k_aug_noise, k_dropout = jax.random.split(key, 6)
  logsnr, t = settings.noise_level_sampler.sample(k_t, b)
  eps = jax.random.normal(k_eps, x0.shape)
  x_t = schedules.q_sample(x0, eps, logsnr)
  if text_apply is None:
    cond = {"text_emb": batch["text_emb"], "text_mask": batch["text_mask"]}
    cond, _ = losses.drop_condition(k_drop, cond, null_cond, settings.cond_drop_prob)
  else:
    # Dropped rows get the empty prompt's tokens, encoded by the current encoder, as the
    # null condition sampling will use.
    tokens = {"text_tokens": batch["text_tokens"], "text_mask": batch["text_mask"]}
    tokens, _ = losses.drop_condition(k_drop, tokens, null_cond, settings.cond_drop_prob)
    cond = {"text_emb": text_apply(params["text"], tokens["text_tokens"],
                                   tokens["text_mask"]),
            "text_mask": tokens["text_mask"]}
    params = params["unet"]
  extra = {}
  if settings.lowres_schedule is not None:
    lowres = batch["lowres"].astype(jnp.float32)
    t_aug = jax.random.uniform(k_aug, (b,)) * settings.lowres_aug_max_t
    lowres_logsnr = settings.lowres_schedule.logsnr(t_aug)
    noise = jax.random.normal(k_aug_noise, lowres.shape)
    extra = {"lowres": schedules.q_sample(lowres, noise, lowres_logsnr),
             "lowres_logsnr": lowres_logsnr}
  if settings.conditions:
    # fold_in rather than a seventh split: stages without conditions keep their streams.
    extra.update(conditioning.train_inputs(settings.conditions, jax.random.fold_in(key, 7),
                                           batch))

  def network(x, logsnr):
    return model.apply({"params": params}, x, logsnr, cond["text_emb"], cond["text_mask"],
                       train=True, rngs={"dropout": k_dropout}, **extra)

  if settings.preconditioning is not None:
    network = settings.preconditioning.wrap(network)
  prediction = network(x_t, logsnr)
  per_example, metrics = losses.diffusion_loss(
      prediction, x0, eps, logsnr, settings.parameterization, settings.weighting,
      min_snr_gamma=settings.min_snr_gamma, sigma_data=settings.sigma_data)
  # Loss per t-bucket (of the noise level's quantile u, t for a schedule), as sums and
  # counts so the host can average over many steps.
  buckets = jnp.clip((t * settings.num_loss_buckets).astype(jnp.int32), 0,
                     settings.num_loss_buckets - 1)
  one_hot = jax.nn.one_hot(buckets, settings.num_loss_buckets)
  metrics["bucket_loss_sum"] = one_hot.T @ per_example
  metrics["bucket_count"] = one_hot.sum(0)
  return jnp.mean(per_example), metrics


def _split_micro(batch, num_micro: int, index: int):
  def take(x):
    size = x.shape[0] // num_micro
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=0)
  return jax.tree.map(take, batch)


def train_step(state: TrainState, batch: dict, null_cond: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, settings: StepSettings,
               learning_rate_fn=None, text_apply=None) -> tuple[TrainState, dict]:
  """One optimizer step (pure; jit it with shardings and ``donate_argnums=0``).

  Args:
    state: the TrainState.
    batch: see the module docstring; the batch must divide by grad_accum_steps.
    null_cond: the empty prompt that replaces dropped conditions: {"text_emb": [L, D],
      "text_mask": [L]} encoded, or {"text_tokens": [L], "text_mask": [L]} with
      ``text_apply``.
    learning_rate_fn: the optimizer's schedule, only to report the rate applied.
    text_apply: (text_params, tokens [B, L], mask [B, L]) -> embeddings [B, L, D], when
      ``state.text_params`` trains with the U-Net (e.g. ``TextEncoder.apply``).
  Returns:
    (new state, metrics of scalars and [num_loss_buckets] sums/counts).
  """
  if (text_apply is None) != (state.text_params is None):
    raise ValueError("Pass text_apply exactly when the state holds text_params (a text "
                     "encoder that trains with the U-Net).")
  key = jax.random.fold_in(state.key, state.step)
  grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
  num_micro = settings.grad_accum_steps
  grads, metrics = None, None
  # Micro-batches are unrolled rather than scanned: XLA:CPU runs convolution backward
  # passes inside a while loop many times slower (shared/PERF-NOTES.md).
  for i in range(num_micro):
    micro = batch if num_micro == 1 else _split_micro(batch, num_micro, i)
    (_, m), g = grad_fn(state.trainable_params, model, micro, null_cond,
                        jax.random.fold_in(key, i), settings.diffusion, text_apply)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    metrics = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
  if num_micro > 1:
    grads = jax.tree.map(lambda g: g / num_micro, grads)
    metrics = {k: (v if k.startswith("bucket") else v / num_micro)
               for k, v in metrics.items()}

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  trainable = state.trainable_params
  updates, new_opt_state = tx.update(grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  decay = ema_decay_at(state.step, settings.ema_decay, settings.ema_warmup)
  if state.text_params is None:
    new_params, new_text = new_trainable, None
    new_ema, new_text_ema = ema_update(state.ema_params, new_params, decay), None
  else:
    new_params, new_text = new_trainable["unet"], new_trainable["text"]
    new_ema = ema_update(state.ema_params, new_params, decay)
    new_text_ema = ema_update(state.text_ema_params, new_text, decay)

  def keep_if_finite(new, old):
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

  in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(new_params, state.params),
      ema_params=keep_if_finite(new_ema, state.ema_params),
      opt_state=keep_if_finite(new_opt_state, state.opt_state),
      text_params=keep_if_finite(new_text, state.text_params),
      text_ema_params=keep_if_finite(new_text_ema, state.text_ema_params),
      nonfinite_in_a_row=in_a_row,
      nonfinite_total=(state.nonfinite_total + (~finite)).astype(jnp.int32),
      nonfinite_longest=jnp.maximum(state.nonfinite_longest, in_a_row))
  metrics = dict(metrics, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32),
                 ema_decay=decay)
  if learning_rate_fn is not None:
    # optax's schedule counts applied updates only (a skipped step keeps the old optimizer
    # state), so this is the rate this step used.
    metrics["learning_rate"] = learning_rate_fn(state.step - state.nonfinite_total)
  return new_state, metrics
