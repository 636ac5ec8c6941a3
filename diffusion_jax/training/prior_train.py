"""Training DALL-E 2's diffusion prior on the shapes (Ramesh et al. 2022, sec. 2.1): caption ->
CLIP image embedding, against a frozen CLIP.

Data: examples of the 1-object shapes splits (``clip_train.render_split``, the world the
shapes CLIP was trained on), rendered once; the frozen CLIP turns every caption into the
prior's condition (``unclip.text_conditioning``) and every image into its unit-norm
embedding, all computed once into memory (the CLIP never runs inside the train step).

Step: ``prior.loss`` (x0-prediction MSE at t ~ U[0, 1] of the configured schedule, the
caption dropped with ``cond_drop_prob`` for classifier-free guidance), AdamW
(``state.make_optimizer``), an EMA of the params. Batch ``s`` is drawn from
``fold_in(key, s)``, so a run resumed from a checkpoint (orbax, ``checkpoint.Checkpointer``)
continues with exactly the batches it would have seen.

Validation (``evaluate``): embeddings sampled from the EMA prior (DDIM, classifier-free
guidance) for validation captions, against the true embeddings of those images: the mean
cosine, beside two references computed on the same images (the caption's CLIP text
embedding used as the image embedding, as DALL-E 2's "no prior" ablation; and unrelated
pairs), and the fraction whose nearest training image has the caption's colour and shape.
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import unclip
from diffusion_jax.evaluation import clip_score
from diffusion_jax.models import clip as clip_lib
from diffusion_jax.models import prior as prior_lib
from diffusion_jax.training import clip_train
from diffusion_jax.training import state as state_lib


@dataclasses.dataclass(frozen=True)
class PriorTrainSettings:
  """What ``train`` needs; experiments/train_prior.py fills it from configs/prior_shapes.py."""
  resolution: int = 32
  num_train: int = 10_000
  num_eval: int = 256
  batch_size: int = 128
  num_steps: int = 3000
  time_budget_s: float | None = None
  cond_drop_prob: float = 0.1
  ema_decay: float = 0.999
  seed: int = 0
  data_seed: int = 0
  log_every: int = 100
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  eval_steps: int = 25
  eval_guidance_scale: float = 3.0

  def __post_init__(self):
    for name in ("resolution", "num_train", "num_eval", "batch_size", "num_steps",
                 "log_every", "checkpoint_every", "keep_checkpoints", "eval_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.batch_size > self.num_train:
      raise ValueError(f"batch_size {self.batch_size} exceeds num_train {self.num_train}.")
    if not 0.0 <= self.cond_drop_prob < 1.0:
      raise ValueError(f"cond_drop_prob must lie in [0, 1), got {self.cond_drop_prob}.")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}.")


def embed_split(clip: clip_lib.CLIP, split: str, num: int, resolution: int, length: int | None,
                seed: int = 0) -> dict:
  """Examples of a 1-object shapes split through the frozen CLIP: {"image_emb" [N, E],
  "text_tokens" [N, L, D], "text_mask" [N, L], "text_emb" [N, E], "pairs"}; ``length`` None:
  the longest caption's token count."""
  images, captions, pairs = clip_train.render_split(split, num, resolution, seed)
  length = length or unclip.caption_length(clip, captions)
  data = unclip.encode_captions(clip, captions, length)
  data["image_emb"] = clip_score.image_embeddings(clip, images)
  data["pairs"], data["captions"] = pairs, captions
  return data


def init_state(prior: prior_lib.DiffusionPrior, tx, key: jax.Array, length: int) -> dict:
  """{"step", "params", "ema_params", "opt_state"} of a fresh prior (jit-able)."""
  cfg = prior.config
  params = nn.unbox(prior.init(key, jnp.zeros((1, cfg.embed_dim)), jnp.zeros((1,)),
                               jnp.zeros((1, length, cfg.text_width)),
                               jnp.ones((1, length), bool),
                               jnp.zeros((1, cfg.embed_dim)))["params"])
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "ema_params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params)}


def make_train_step(prior: prior_lib.DiffusionPrior, tx, schedule, settings: PriorTrainSettings,
                    data: dict):
  """(state, key) -> (state, loss): one step on batch ``fold_in(key, step)`` of ``data``
  (device arrays), jitted with the state donated."""
  arrays = {k: jnp.asarray(data[k]) for k in ("image_emb", "text_tokens", "text_mask",
                                               "text_emb")}
  num = arrays["image_emb"].shape[0]

  def step(state, key):
    step_key = jax.random.fold_in(key, state["step"])
    index_key, loss_key = jax.random.split(step_key)
    idx = jax.random.choice(index_key, num, (settings.batch_size,), replace=False)
    cond = {k: arrays[k][idx] for k in ("text_tokens", "text_mask", "text_emb")}
    loss, grads = jax.value_and_grad(
        lambda p: prior_lib.loss(prior, p, loss_key, arrays["image_emb"][idx], cond, schedule,
                                 settings.cond_drop_prob))(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    decay = state_lib.ema_decay_at(state["step"], settings.ema_decay, True)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
            "ema_params": state_lib.ema_update(state["ema_params"], params, decay)}, loss

  return jax.jit(step, donate_argnums=0)


def nearest_pairs(sampled: np.ndarray, reference: np.ndarray, pairs: list) -> list:
  """The (colour, shape) of each sampled embedding's nearest reference embedding."""
  nearest = np.argmax(np.asarray(sampled) @ np.asarray(reference).T, axis=1)
  return [tuple(pairs[i]) for i in nearest]


def evaluate(sampler: unclip.PriorSampler, val: dict, train: dict, key: jax.Array,
             batch_size: int = 128) -> dict:
  """The validation report (module docstring) of ``sampler`` on ``val`` (``embed_split``)."""
  captions, true = val["captions"], np.asarray(val["image_emb"])
  sampled = []
  for s in range(0, len(captions), batch_size):
    chunk = captions[s:s + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch size
    sampled.append(np.asarray(sampler(padded, key, first_index=s))[:len(chunk)])
  sampled = np.concatenate(sampled)
  cosine = np.sum(sampled * true, axis=1)
  text_cosine = np.sum(np.asarray(val["text_emb"]) * true, axis=1)
  unrelated = np.sum(np.roll(true, 1, axis=0) * true, axis=1)
  found = nearest_pairs(sampled, train["image_emb"], train["pairs"])
  right = [f == tuple(p) for f, p in zip(found, val["pairs"], strict=True)]
  true_found = nearest_pairs(true, train["image_emb"], train["pairs"])
  true_right = [f == tuple(p) for f, p in zip(true_found, val["pairs"], strict=True)]
  norms = np.linalg.norm(sampled, axis=1)

  def mean_ci(x):
    half = 1.959964 * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return {"mean": float(x.mean()), "ci95": [float(x.mean() - half), float(x.mean() + half)]}

  return {"num_images": len(captions), "sampler": sampler.settings,
          "cosine_sampled_vs_true": mean_ci(cosine),
          "cosine_text_embedding_vs_true": mean_ci(text_cosine),
          "cosine_unrelated_images": mean_ci(unrelated),
          "nearest_train_image_pair_right": float(np.mean(right)),
          "nearest_train_image_pair_right_for_true_embedding": float(np.mean(true_right)),
          "sample_norm": [float(norms.min()), float(norms.max())]}


def train(clip: clip_lib.CLIP, prior_config: prior_lib.PriorConfig,
          optimizer: state_lib.OptimizerSettings, settings: PriorTrainSettings, *,
          schedule_name: str = "cosine", schedule_kwargs: tuple = (), checkpointer=None,
          config_json: dict | None = None, log=print):
  """Trains (or resumes, from ``checkpointer``'s latest step) the prior; returns
  (PriorSpec, EMA params, summary, train data, validation data)."""
  start = time.monotonic()
  train_data = embed_split(clip, "train", settings.num_train, settings.resolution, None,
                           settings.data_seed)
  length = train_data["text_tokens"].shape[1]
  val = embed_split(clip, "validation", settings.num_eval, settings.resolution, length,
                    settings.data_seed)
  log(f"embedded {settings.num_train} train and {settings.num_eval} validation examples "
      f"with the CLIP in {time.monotonic() - start:.0f} s (captions <= {length} tokens)")
  prior_config = dataclasses.replace(prior_config, embed_dim=clip.config.projection_dim,
                                     text_width=clip.config.text.hidden_size)
  spec = unclip.PriorSpec(prior_config, length, schedule_name, tuple(schedule_kwargs))
  prior = prior_lib.DiffusionPrior(prior_config)
  tx = state_lib.make_optimizer(optimizer)
  key = jax.random.key(settings.seed)
  init = jax.jit(lambda k: init_state(prior, tx, k, length))
  state = None
  if checkpointer is not None and checkpointer.latest_step() is not None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(init, key))
    state, _ = checkpointer.restore(abstract)
    log(f"resumed from {checkpointer.directory} at step {int(state['step'])}")
  if state is None:
    state = init(jax.random.fold_in(key, 1))
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  log(f"{num_params / 1e6:.2f}M prior parameters, E={prior_config.embed_dim}, "
      f"text {length} x {prior_config.text_width}")
  step_fn = make_train_step(prior, tx, spec.noise_schedule(), settings, train_data)
  step, losses, loss, begun = int(state["step"]), [], float("nan"), time.monotonic()
  while step < settings.num_steps:
    state, loss = step_fn(state, key)
    step += 1
    out_of_time = (settings.time_budget_s is not None and
                   time.monotonic() - begun > settings.time_budget_s)
    last = step >= settings.num_steps or out_of_time
    if step % settings.log_every == 0 or last:
      losses.append(float(loss))
      log(f"step {step}: loss {float(loss):.4f}, {time.monotonic() - begun:.0f} s")
    if checkpointer is not None and (step % settings.checkpoint_every == 0 or last):
      checkpointer.save(step, state, None, config_json)
    if out_of_time:
      log(f"time budget of {settings.time_budget_s:g} s reached at step {step}")
      break
  summary = {"steps": step, "final_loss": float(loss),
             "seconds": time.monotonic() - begun, "num_params": int(num_params)}
  return spec, state["ema_params"], summary, train_data, val


def restore_ema_params(checkpointer, spec: unclip.PriorSpec, step: int | None = None):
  """(EMA params of a prior run's checkpoint ``step`` (None: latest), the step), read
  alone (a partial restore: the optimizer state stays on disk)."""
  prior = prior_lib.DiffusionPrior(spec.config)
  cfg = spec.config
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  boxed = jax.eval_shape(lambda k: nn.unbox(prior.init(
      k, jnp.zeros((1, cfg.embed_dim)), jnp.zeros((1,)),
      jnp.zeros((1, spec.text_length, cfg.text_width)), jnp.ones((1, spec.text_length), bool),
      jnp.zeros((1, cfg.embed_dim)))["params"]), jax.random.key(0))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        boxed)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: train the prior "
                            "first (experiments/train_prior.py --workdir=...).")
  return checkpointer.restore_fields({"ema_params": target}, step)["ema_params"], step



PRIOR_JSON = "prior.json"  # what experiments/train_prior.py writes beside its checkpoints


def load_sampler(workdir, clip: clip_lib.CLIP | None = None, step: int | None = None,
                 **sampler_settings) -> unclip.PriorSampler:
  """The ``PriorSampler`` of a train_prior workdir (its prior.json and the EMA params of
  checkpoint ``step``, None: the latest) with ``clip`` (default: the CLIP directory it was
  trained with). FileNotFoundError / ValueError with one line on bad input."""
  import json
  import pathlib

  from diffusion_jax.training import checkpoint

  path = pathlib.Path(workdir) / PRIOR_JSON
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {workdir} is not a prior workdir (train one "
                            "with experiments/train_prior.py --workdir=...).")
  meta = json.loads(path.read_text())
  spec = unclip.PriorSpec.from_json(meta)
  if clip is None:
    clip, _ = unclip.load_clip(meta["clip_dir"])
  checkpointer = checkpoint.Checkpointer(workdir, create=False)
  try:
    params, _ = restore_ema_params(checkpointer, spec, step)
  finally:
    checkpointer.close()
  return unclip.PriorSampler(spec, params, clip, **sampler_settings)
