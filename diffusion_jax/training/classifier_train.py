"""Training the noise-aware attribute classifier (``models.attribute_classifier``) on shapes
renders, for classifier guidance (Dhariwal & Nichol 2021: a classifier trained on noised
images x_t at the diffusion's noise levels).

Data: scenes of one colour x shape pair (the shapes grammar's "single" scenes, and "count"
scenes of two or three such objects, at ``count_fraction``) from ``shapes.make_example``,
rendered once into memory. Labels per image: colour and shape of its objects, and the
position its caption states (single scenes only; ``UNSTATED`` otherwise, left out of the
loss): an object placed anywhere has no position label.

Loss: the mean over attributes of the cross-entropy of x_t = alpha x0 + sigma eps at a
log-SNR drawn from the diffusion schedule at t ~ U[0, 1] (the noise-aware recipe of the
CLIP in ``clip_train``), over the examples where the attribute is stated.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.data import shapes
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.classifier_guidance import UNSTATED
from diffusion_jax.models import attribute_classifier as ac_lib

# The vocabulary of the shapes world, in the order the classifier's heads use.
SHAPES_ATTRIBUTES = (("colour", tuple(shapes.COLORS)), ("shape", tuple(shapes.SHAPES)),
                     ("position", tuple(shapes.POSITIONS)))


@dataclasses.dataclass(frozen=True)
class ClassifierTrainSettings:
  """What ``train`` needs; configs/attribute_classifier_shapes.py is built from these
  fields and experiments/train_classifier.py turns it back into them."""
  resolution: int = 32
  width: int = 32
  levels: int = 3
  num_train: int = 6000          # rendered into memory
  num_eval: int = 480            # validation / held-out-pair images per noise level
  count_fraction: float = 0.3    # "two red circles" scenes among the single-pair ones
  batch_size: int = 64
  num_steps: int = 1500
  time_budget_s: float | None = None
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  weight_decay: float = 1e-4
  seed: int = 0
  data_seed: int = 0
  # The diffusion schedule whose noise levels the classifier sees (the guided stage's).
  schedule: str = "shifted_cosine"
  schedule_kwargs: tuple = (("base_resolution", 32), ("resolution", 32))
  eval_times: tuple = (0.0, 0.25, 0.5, 0.75, 0.9)   # t = 0: the clean image itself
  log_every: int = 100

  def __post_init__(self):
    for name in ("num_train", "num_eval", "batch_size", "num_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.batch_size > self.num_train:
      raise ValueError(f"batch_size {self.batch_size} exceeds num_train {self.num_train}.")
    if not 0.0 <= self.count_fraction < 1.0:
      raise ValueError(f"count_fraction must lie in [0, 1), got {self.count_fraction}.")
    if self.schedule not in schedules.NAMES:
      raise ValueError(f"Unknown schedule {self.schedule!r}; choose one of "
                       f"{', '.join(schedules.NAMES)}.")
    if any(not 0.0 <= t < 1.0 for t in self.eval_times):
      raise ValueError(f"eval_times must lie in [0, 1), got {self.eval_times}.")

  def classifier_config(self) -> ac_lib.ClassifierConfig:
    return ac_lib.ClassifierConfig(SHAPES_ATTRIBUTES, resolution=self.resolution,
                                   width=self.width, levels=self.levels)

  def make_schedule(self):
    return schedules.get(self.schedule, **dict(self.schedule_kwargs))


def render_examples(split: str, num: int, resolution: int, seed: int = 0,
                    count_fraction: float = 0.3, attributes=SHAPES_ATTRIBUTES
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, R, R, 3] in [-1, 1], labels int32 [N, A]) of examples [0, num) of
  ``split``'s single-pair scenes; label ``UNSTATED`` where the caption states nothing."""
  weights = {"single": 1.0 - count_fraction, "count": count_fraction}
  images = np.empty((num, resolution, resolution, 3), np.uint8)
  labels = np.full((num, len(attributes)), UNSTATED, np.int32)
  for i in range(num):
    scene, _, images[i] = shapes.make_example(seed, split, i, resolution,
                                              max_objects=3 if count_fraction else 1,
                                              scene_weights=weights)
    group = scene.spec["groups"][0]
    values = {"colour": group["color"], "shape": group["shape"],
              "position": scene.spec["position"]}
    for a, (name, vocabulary) in enumerate(attributes):
      if values.get(name) is not None:
        labels[i, a] = vocabulary.index(values[name])
  return images.astype(np.float32) / 127.5 - 1.0, labels


def classification_loss(logits: dict, labels: jnp.ndarray, names) -> jnp.ndarray:
  """Mean over attributes of the cross-entropy over the rows where it is stated
  (labels int [B, A], column a for ``names[a]``)."""
  losses = []
  for a, name in enumerate(names):
    label = labels[:, a]
    stated = label != UNSTATED
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[name], jnp.maximum(label, 0))
    losses.append(jnp.sum(jnp.where(stated, ce, 0.0)) / jnp.maximum(jnp.sum(stated), 1))
  return jnp.mean(jnp.stack(losses))


def make_optimizer(settings: ClassifierTrainSettings) -> optax.GradientTransformation:
  lr = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, settings.warmup_steps,
                                          max(settings.num_steps, settings.warmup_steps + 1))
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(lr, weight_decay=settings.weight_decay))


def make_train_step(classifier: ac_lib.AttributeClassifier, tx, schedule):
  """(params, opt_state, x0 [B, R, R, 3], labels [B, A], key) -> (params, opt_state, loss):
  one step on x_t at t ~ U[0, 1] of ``schedule``, jitted with the state donated."""
  names = classifier.config.names

  def loss_fn(params, x0, labels, key):
    t_key, eps_key = jax.random.split(key)
    logsnr = schedule.logsnr(jax.random.uniform(t_key, x0.shape[:1]))
    x_t = schedules.q_sample(x0, jax.random.normal(eps_key, x0.shape), logsnr)
    return classification_loss(classifier.logits(x_t, logsnr, params), labels, names)

  def step(params, opt_state, x0, labels, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x0, labels, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def train(settings: ClassifierTrainSettings, log=print
          ) -> tuple[ac_lib.AttributeClassifier, dict]:
  """Trains on the train split's single-pair scenes; returns (classifier, summary)."""
  classifier = ac_lib.init(settings.classifier_config(), settings.seed)
  start = time.monotonic()
  images, labels = render_examples("train", settings.num_train, settings.resolution,
                                   settings.data_seed, settings.count_fraction)
  log(f"rendered {settings.num_train} train examples in {time.monotonic() - start:.0f} s")
  tx = make_optimizer(settings)
  params, opt_state = classifier.params, tx.init(classifier.params)
  step_fn = make_train_step(classifier, tx, settings.make_schedule())
  # (XLA's bit generator: compiles much faster on CPU than threefry; see ac_lib.init)
  rng, key = np.random.default_rng(settings.seed), jax.random.key(settings.seed, impl="rbg")
  start, losses, order, cursor, step = time.monotonic(), [], None, len(images), 0
  for step in range(1, settings.num_steps + 1):
    if cursor + settings.batch_size > len(images):  # a new epoch: a new permutation
      order, cursor = rng.permutation(len(images)), 0
    idx = np.sort(order[cursor:cursor + settings.batch_size])
    cursor += settings.batch_size
    params, opt_state, loss = step_fn(params, opt_state, images[idx], labels[idx],
                                      jax.random.fold_in(key, step))
    if step % settings.log_every == 0 or step == settings.num_steps:
      losses.append([step, float(loss)])
      log(f"step {step}: loss {float(loss):.4f}, {time.monotonic() - start:.0f} s")
    if settings.time_budget_s is not None and time.monotonic() - start > settings.time_budget_s:
      log(f"time budget of {settings.time_budget_s:g} s reached at step {step}")
      break
  summary = {"steps": step, "final_loss": float(loss), "losses": losses,
             "seconds": round(time.monotonic() - start, 1)}
  return dataclasses.replace(classifier, params=params), summary


def accuracy_by_noise_level(classifier: ac_lib.AttributeClassifier,
                            settings: ClassifierTrainSettings, seed: int = 0) -> dict:
  """Held-out accuracy per attribute at each of ``settings.eval_times`` (t = 0: the clean
  render at the schedule's largest log-SNR), on validation scenes (no held-out pair) and on
  test_compositional ones (every image a held-out colour x shape pair). Position accuracy
  is over the images whose caption states one."""
  schedule = settings.make_schedule()
  names = classifier.config.names
  logits_fn = jax.jit(classifier.logits)
  result = {"num_images": settings.num_eval}
  for split, shown in (("validation", "validation"), ("test_compositional", "held_out")):
    x0, labels = render_examples(split, settings.num_eval, settings.resolution,
                                 settings.data_seed, settings.count_fraction)
    levels = []
    for t in settings.eval_times:
      logsnr = jnp.full((len(x0),), schedule.logsnr(float(t)), jnp.float32)
      eps = np.random.default_rng([seed, int(t * 1000)]).standard_normal(x0.shape)
      x_t = x0 if t == 0 else schedules.q_sample(jnp.asarray(x0), eps.astype(np.float32),
                                                 logsnr)
      logits = logits_fn(x_t, logsnr)
      level = {"t": float(t), "logsnr": float(logsnr[0]), "clean": t == 0}
      for a, name in enumerate(names):
        stated = labels[:, a] != UNSTATED
        right = np.asarray(jnp.argmax(logits[name], -1)) == labels[:, a]
        level[name] = float(right[stated].mean()) if stated.any() else None
        level[f"{name}_images"] = int(stated.sum())
      levels.append(level)
    result[shown] = levels
  return result
