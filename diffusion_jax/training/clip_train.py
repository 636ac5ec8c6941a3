"""Contrastive training of a small CLIP on the shapes dataset (Radford et al. 2021), plain or
noise-aware (GLIDE, Nichol et al. 2022, sec. 3.3).

Loss: the symmetric InfoNCE of CLIP. For a batch of B (image, caption) pairs with unit-norm
embeddings I, T [B, E] and logits = exp(s) I T^T (s the learnable log inverse temperature,
``logit_scale``, capped at log 100 as in CLIP), the loss is the mean of the cross-entropies
of each image against all captions (rows) and each caption against all images (columns),
the matching pair being the target.

Noise-aware: each training image is replaced by x_t = alpha x0 + sigma eps at a log-SNR
drawn from the diffusion schedule at t ~ U[0, 1] (the noise levels a sampler visits), and
the image tower is given that log-SNR, so its embedding of x_t can guide sampling.

Data: examples of the built-in shapes dataset (``shapes.make_example`` with the dataset's
seed and split, i.e. the same images a prepared ``shapes/<R>px_<N>_max1`` holds), rendered
once into memory: a CLIP this small trains in minutes on CPU, and the dataset is its
1-object configuration so every caption names one colour x shape pair.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.data import shapes
from diffusion_jax.diffusion import schedules
from diffusion_jax.models import clip as clip_lib

MAX_LOGIT_SCALE = math.log(100.0)


def contrastive_loss(image_emb: jnp.ndarray, text_emb: jnp.ndarray,
                     logit_scale: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """CLIP's symmetric InfoNCE of unit-norm embeddings [B, E] x [B, E] and log scale [].

  Returns (loss [], logits [B, B]) with logits[i, j] = exp(s) <image_i, text_j>.
  """
  scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
  logits = scale * image_emb @ text_emb.T
  labels = jnp.arange(logits.shape[0])
  per_image = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  per_text = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (per_image.mean() + per_text.mean()), logits


@dataclasses.dataclass(frozen=True)
class ClipTrainSettings:
  """What ``train`` needs; experiments/train_clip.py fills it from configs/clip_shapes.py."""
  resolution: int = 32
  num_train: int = 10_000
  batch_size: int = 64
  num_steps: int = 1400
  time_budget_s: float | None = None
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  weight_decay: float = 0.1
  seed: int = 0
  data_seed: int = 0
  noise_aware: bool = False
  schedule: str = "shifted_cosine"       # the diffusion schedule whose noise levels to see
  schedule_kwargs: tuple = (("resolution", 32), ("base_resolution", 32))
  log_every: int = 100

  def __post_init__(self):
    for name in ("num_train", "batch_size", "num_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.batch_size > self.num_train:
      raise ValueError(f"batch_size {self.batch_size} exceeds num_train {self.num_train}.")
    if self.schedule not in schedules.NAMES:
      raise ValueError(f"Unknown schedule {self.schedule!r}; choose one of "
                       f"{', '.join(schedules.NAMES)}.")


def render_split(split: str, num: int, resolution: int, seed: int = 0,
                 start: int = 0) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
  """Examples [start, start + num) of a 1-object shapes split: (images float32 [N, R, R, 3]
  in [-1, 1], captions, (colour, shape) of each image)."""
  images, captions, pairs = [], [], []
  for index in range(start, start + num):
    scene, caption, image = shapes.make_example(seed, split, index, resolution, max_objects=1)
    images.append(image)
    captions.append(caption)
    pairs.append((scene.objects[0].color, scene.objects[0].shape))
  return np.stack(images).astype(np.float32) / 127.5 - 1.0, captions, pairs


def caption_vocabulary(num: int = 2000) -> list[str]:
  """Captions of the full shapes grammar (every kind of scene), for the tokenizer."""
  return [shapes.make_example(0, "train", i, 8)[1] for i in range(num)]


def small_config(vocab_size: int, resolution: int = 32, noise_aware: bool = False,
                 width: int = 64, layers: int = 3, max_length: int = 16,
                 patch_size: int = 8) -> clip_lib.CLIPConfig:
  """A CLIP that trains on the shapes in minutes on CPU (~0.3 M parameters)."""
  text = clip_lib.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=vocab_size, max_position_embeddings=max_length,
                                 eos_token_id=1, hidden_act="gelu")
  vision = clip_lib.CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width,
                                     num_hidden_layers=layers, num_attention_heads=4,
                                     image_size=resolution, patch_size=patch_size,
                                     hidden_act="gelu",
                                     noise_aware=noise_aware, noise_features=32)
  return clip_lib.CLIPConfig(text, vision, projection_dim=width)


def init_clip(config: clip_lib.CLIPConfig, tokenizer: Any, seed: int = 0) -> clip_lib.CLIP:
  """A randomly initialised CLIP taking images in [-1, 1] as they are (mean = std = 0.5)."""
  module = clip_lib.CLIPModel(config)
  size = config.vision.image_size
  params = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)),
                                jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool),
                                jnp.zeros((1,)))["params"]
  import flax.linen as nn
  return clip_lib.CLIP(module, nn.unbox(params), tokenizer, (0.5,) * 3, (0.5,) * 3)


def make_optimizer(settings: ClipTrainSettings) -> optax.GradientTransformation:
  lr = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, settings.warmup_steps,
                                          max(settings.num_steps, settings.warmup_steps + 1))
  # No weight decay on norms, biases, embeddings' scale or the temperature.
  decay_mask = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, x: x.ndim >= 2, p)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(lr, weight_decay=settings.weight_decay, mask=decay_mask))


def make_train_step(clip: clip_lib.CLIP, tx: optax.GradientTransformation,
                    settings: ClipTrainSettings):
  """(params, opt_state, images [B, R, R, 3], tokens, mask [B, L], key) ->
  (params, opt_state, loss, logit_scale), jitted with the state donated."""
  schedule = schedules.get(settings.schedule, **dict(settings.schedule_kwargs))

  def loss_fn(params, images, tokens, mask, key):
    logsnr = None
    if settings.noise_aware:
      t_key, eps_key = jax.random.split(key)
      logsnr = schedule.logsnr(jax.random.uniform(t_key, images.shape[:1]))
      images = schedules.q_sample(images, jax.random.normal(eps_key, images.shape), logsnr)
    image_emb = clip.image_embeddings(params, images, logsnr)
    text_emb = clip.text_embeddings(params, tokens, mask)
    loss, _ = contrastive_loss(image_emb, text_emb, params["logit_scale"])
    return loss

  def step(params, opt_state, images, tokens, mask, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, tokens, mask, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, params["logit_scale"]

  return jax.jit(step, donate_argnums=(0, 1))


def train(settings: ClipTrainSettings, log=print) -> tuple[clip_lib.CLIP, dict]:
  """Trains a small CLIP on the 1-object shapes train split; returns (CLIP, summary)."""
  tokenizer = clip_lib.train_tokenizer(caption_vocabulary())
  clip = init_clip(small_config(len(tokenizer), settings.resolution, settings.noise_aware),
                   tokenizer, settings.seed)
  start = time.monotonic()
  images, captions, _ = render_split("train", settings.num_train, settings.resolution,
                                     settings.data_seed)
  tokens, mask = clip.tokenize(captions)
  log(f"rendered {settings.num_train} train examples in {time.monotonic() - start:.0f} s")
  tx = make_optimizer(settings)
  params, opt_state = clip.params, tx.init(clip.params)
  step_fn = make_train_step(clip, tx, settings)
  rng = np.random.default_rng(settings.seed)
  key = jax.random.key(settings.seed)
  start, losses, step = time.monotonic(), [], 0
  order = rng.permutation(settings.num_train)
  cursor = 0
  for step in range(1, settings.num_steps + 1):
    if cursor + settings.batch_size > len(order):  # a new epoch: a new permutation
      order, cursor = rng.permutation(settings.num_train), 0
    idx = np.sort(order[cursor:cursor + settings.batch_size])
    cursor += settings.batch_size
    params, opt_state, loss, scale = step_fn(params, opt_state, images[idx], tokens[idx],
                                             mask[idx], jax.random.fold_in(key, step))
    if step % settings.log_every == 0 or step == settings.num_steps:
      losses.append(float(loss))
      log(f"step {step}: loss {float(loss):.4f}, temperature 1/{math.exp(float(scale)):.1f}, "
          f"{time.monotonic() - start:.0f} s")
    if settings.time_budget_s is not None and time.monotonic() - start > settings.time_budget_s:
      log(f"time budget of {settings.time_budget_s:g} s reached at step {step}")
      break
  summary = {"steps": step, "final_loss": float(loss), "seconds": time.monotonic() - start,
             "logit_scale": float(scale)}
  return dataclasses.replace(clip, params=params), summary


def shapes_zero_shot(clip: clip_lib.CLIP, num: int, resolution: int = 32,
                     params: Any = None) -> dict:
  """Zero-shot accuracy of choosing the right one of the 48 "a <colour> <shape>" captions,
  on ``num`` real 1-object images of the validation split (no held-out pair) and of
  test_compositional (every image a held-out pair), with colour and shape accuracy."""
  from diffusion_jax.evaluation import clip_score
  candidates = [f"a {c} {s}" for c in shapes.COLORS for s in shapes.SHAPES]
  result = {"num_candidates": len(candidates)}
  for split, name in (("validation", "validation"), ("test_compositional", "held_out")):
    images, _, pairs = render_split(split, num, resolution)
    predicted = [candidates[i].split()[1:] for i in
                 clip_score.zero_shot_predictions(clip, images, candidates, params)]
    result[name] = {
        "accuracy": float(np.mean([tuple(p) == t for p, t in zip(predicted, pairs,
                                                                 strict=True)])),
        "colour": float(np.mean([p[0] == t[0] for p, t in zip(predicted, pairs, strict=True)])),
        "shape": float(np.mean([p[1] == t[1] for p, t in zip(predicted, pairs, strict=True)])),
        "images": num}
  return result
