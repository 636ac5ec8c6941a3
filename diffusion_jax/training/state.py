"""Train state (a pytree), optimizer and EMA.

The state holds everything a run needs to continue bit for bit: parameters, their EMA,
the optimizer state, the step, the run's PRNG key (raw uint32 key data, which orbax can
save) and the non-finite-step counters. Randomness of step n is derived from
``fold_in(rng, n)``, so nothing random is carried from step to step.

A text encoder trained jointly with the U-Net (GLIDE-style, ``config.text.trainable``)
keeps its parameters and their EMA in ``text_params`` / ``text_ema_params``; the optimizer
then updates ``{"unet": params, "text": text_params}`` as one tree (one learning rate, one
gradient clip). With a frozen encoder (the default) both are None and the optimizer sees
the U-Net parameters alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray                 # int32 []
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray                  # uint32 key data of the run's base key
  nonfinite_in_a_row: jnp.ndarray   # int32 []: consecutive skipped steps
  nonfinite_total: jnp.ndarray      # int32 []: all skipped steps
  # The longest run of consecutive skipped steps so far. Sticky, so the host loop, which
  # only looks every few steps, cannot miss a run that ended between two looks.
  nonfinite_longest: jnp.ndarray    # int32 []
  text_params: Any = None           # a jointly trained text encoder's params, or None
  text_ema_params: Any = None

  @property
  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)

  @property
  def trainable_params(self) -> Any:
    """What the optimizer updates: the U-Net params, or {"unet", "text"} when the text
    encoder trains too."""
    return trainable_tree(self.params, self.text_params)


def trainable_tree(params: Any, text_params: Any) -> Any:
  return params if text_params is None else {"unet": params, "text": text_params}


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """AdamW with linear warmup + cosine decay and global-norm clipping (Loshchilov & Hutter
  2019; Imagen trains with Adam, 1e-4, 10k warmup steps)."""

  learning_rate: float = 1e-4
  warmup_steps: int = 1000
  decay_steps: int | None = None   # cosine decay over this many steps; None: constant
  final_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_grad_norm: float | None = 1.0

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
    if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
      raise ValueError(f"decay_steps ({self.decay_steps}) must exceed warmup_steps "
                       f"({self.warmup_steps}), or be None for a constant rate.")
    if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
      raise ValueError(f"clip_grad_norm must be positive or None, got "
                       f"{self.clip_grad_norm}.")


def learning_rate_schedule(settings: OptimizerSettings) -> optax.Schedule:
  peak = settings.learning_rate
  if settings.decay_steps is None:
    warmup = max(settings.warmup_steps, 1)
    return lambda step: peak * jnp.minimum(1.0, (step + 1) / warmup)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=settings.warmup_steps,
      decay_steps=settings.decay_steps, end_value=peak * settings.final_lr_fraction)


def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW; no weight decay on biases and norm scales."""
  def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)

  adamw = optax.adamw(learning_rate_schedule(settings), b1=settings.b1, b2=settings.b2,
                      eps=settings.eps, weight_decay=settings.weight_decay, mask=decay_mask)
  if settings.clip_grad_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(settings.clip_grad_norm), adamw)


def create_train_state(params: Any, tx: optax.GradientTransformation, key: jax.Array,
                       text_params: Any = None) -> TrainState:
  """A fresh state; ``params`` already initialised (possibly sharded). Jit-able.

  ``text_params``: the initial params of a text encoder that trains with the U-Net, or
  None for a frozen one.
  """
  zero = jnp.zeros((), jnp.int32)
  copy = lambda tree: None if tree is None else jax.tree.map(jnp.copy, tree)
  return TrainState(
      step=zero, params=params, ema_params=copy(params),
      opt_state=tx.init(trainable_tree(params, text_params)), rng=jax.random.key_data(key),
      nonfinite_in_a_row=zero, nonfinite_total=zero, nonfinite_longest=zero,
      text_params=text_params, text_ema_params=copy(text_params))


def ema_decay_at(step: jnp.ndarray, decay: float, warmup: bool) -> jnp.ndarray:
  """EMA decay, warmed up as min(decay, (1 + step) / (10 + step)) so early averages
  are not dominated by the random initialisation."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params: Any, params: Any, decay: jnp.ndarray) -> Any:
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)
