"""unCLIP's CLIP-side pieces (Ramesh et al. 2022, "Hierarchical Text-Conditional Image
Generation with CLIP Latents"): what the diffusion prior is conditioned on, the frozen
image-embedding encoder the decoder is conditioned with, and sampling the prior.

* ``text_conditioning(clip, params, tokens, mask, length)``: the prior's condition, as
  DALL-E 2 sec. 2.1 feeds its transformer: the CLIP text tower's per-token states (the
  final LayerNorm's output, [B, L, D_text], cut to the prior's ``length``), their mask and
  the unit-norm CLIP text embedding [B, E].
* ``ImageEmbedder``: a jitted frozen CLIP image tower, ``images [B, H, W, C] in [-1, 1] ->
  unit-norm embeddings [B, E]``, the space the prior samples in (``prior.to_embedding``).
  It is the ``encoder`` of ``conditioning.ImageEmbedding``: the decoder trains on the
  embeddings of its training images and samples from the prior's (or, for variations,
  from an input image's).
* ``PriorSampler``: the prior's x0-prediction model, classifier-free guided, sampled by any
  of the project's samplers on vectors [B, E] in the prior's space, then renormalised.

Everything takes params as arguments (never baked into the compiled programs), and a
batch is sampled as one compiled program per batch size.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import grids, guidance, samplers, schedules
from diffusion_jax.models import bert
from diffusion_jax.models import clip as clip_lib
from diffusion_jax.models import prior as prior_lib


def clip_directory(path) -> pathlib.Path:
  """The CLIPModel directory of ``path``: an experiments/train_clip.py workdir's ``clip/``,
  or ``path`` itself (a Hugging Face CLIPModel directory)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; give a CLIP directory (a train_clip "
                            "workdir, or a Hugging Face CLIPModel directory).")
  return path / "clip" if (path / "clip" / "config.json").is_file() else path


def load_clip(path) -> tuple[clip_lib.CLIP, str]:
  """(CLIP, the directory it was loaded from) of ``clip_directory(path)``; ValueError /
  FileNotFoundError with one line for anything else (another model type, missing files)."""
  directory = clip_directory(path)
  return clip_lib.load(directory), str(directory.resolve())


def _is_text_final_norm(module: nn.Module, method: str) -> bool:
  # encode_text runs only the text tower, whose last LayerNorm is "final_norm".
  return method == "__call__" and isinstance(module, bert.LayerNorm) and \
      module.name == "final_norm"


def text_conditioning(clip: clip_lib.CLIP, params: Any, tokens: jnp.ndarray,
                      mask: jnp.ndarray, length: int) -> dict:
  """The prior's condition of tokenised captions (tokens / mask [B, L_clip]; pure):
  {"text_tokens": [B, length, D_text] the text tower's final states, "text_mask":
  [B, length], "text_emb": [B, E] unit-norm}. The tower is causal, so cutting its states
  at ``length`` equals encoding the cut tokens (the pooled embedding uses all of them)."""
  emb, state = clip.module.apply({"params": params}, tokens, mask,
                                 method=clip_lib.CLIPModel.encode_text,
                                 capture_intermediates=_is_text_final_norm)
  states = state["intermediates"]["text_model"]["final_norm"]["__call__"][0]
  mask = jnp.asarray(mask, bool)
  return {"text_tokens": states[:, :length] * mask[:, :length, None],
          "text_mask": mask[:, :length], "text_emb": clip_lib.normalize(emb)}


_TEXT_FNS: dict = {}


def encode_captions(clip: clip_lib.CLIP, captions, length: int, params: Any = None,
                    batch_size: int = 256) -> dict:
  """``text_conditioning`` of a list of captions, in batches, as numpy arrays."""
  params = clip.params if params is None else params
  key = (clip.module, length)
  if key not in _TEXT_FNS:
    _TEXT_FNS[key] = jax.jit(lambda p, t, m: text_conditioning(clip, p, t, m, length))
  tokens, mask = clip.tokenize(list(captions))
  parts = [jax.device_get(_TEXT_FNS[key](params, tokens[i:i + batch_size],
                                         mask[i:i + batch_size]))
           for i in range(0, len(tokens), batch_size)]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def caption_length(clip: clip_lib.CLIP, captions) -> int:
  """The most tokens any of ``captions`` takes (start and end tokens included)."""
  _, mask = clip.tokenize(list(captions))
  return int(mask.sum(axis=1).max())


class ImageEmbedder:
  """A frozen CLIP image tower as ``encoder(images [B, H, W, C] in [-1, 1]) -> [B, E]``
  unit-norm (float32), jitted once per input sharding; the output keeps the batch axis's
  sharding, so it can join a sharded train batch. ``dim`` is E."""

  def __init__(self, clip: clip_lib.CLIP, directory: str | None = None):
    self.clip, self.directory = clip, directory
    self.dim = clip.config.projection_dim
    self._fns: dict = {}

  def _fn(self, sharding):
    if sharding not in self._fns:
      out = None
      if isinstance(sharding, jax.sharding.NamedSharding):
        batch_axis = sharding.spec[0] if len(sharding.spec) else None
        out = jax.sharding.NamedSharding(sharding.mesh,
                                        jax.sharding.PartitionSpec(batch_axis, None))
      self._fns[sharding] = jax.jit(self.clip.image_embeddings, out_shardings=out)
    return self._fns[sharding]

  def __call__(self, images) -> jnp.ndarray:
    images = jnp.asarray(images, jnp.float32) if not isinstance(images, jax.Array) else images
    return self._fn(getattr(images, "sharding", None))(self.clip.params, images)

  def to_json(self) -> dict:
    return {"clip": self.directory, "dim": self.dim}


# --- The prior, sampled ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PriorSpec:
  """What a trained prior is: its network, the caption length it was trained on and
  the schedule its noise levels came from (name and keyword arguments)."""

  config: prior_lib.PriorConfig
  text_length: int
  schedule: str = "cosine"
  schedule_kwargs: tuple[tuple[str, Any], ...] = ()

  def noise_schedule(self):
    return schedules.get(self.schedule, **dict(self.schedule_kwargs))

  def to_json(self) -> dict:
    return {"config": dataclasses.asdict(self.config), "text_length": self.text_length,
            "schedule": self.schedule, "schedule_kwargs": [list(kv) for kv in
                                                           self.schedule_kwargs]}

  @classmethod
  def from_json(cls, d: dict) -> PriorSpec:
    return cls(prior_lib.PriorConfig(**d["config"]), int(d["text_length"]), d["schedule"],
               tuple((k, v) for k, v in d.get("schedule_kwargs", ())))


def sample_prior(prior: prior_lib.DiffusionPrior, params: Any, cond: dict, null: dict,
                 keys: jax.Array, grid, *, guidance_scale: float = 1.0,
                 sampler: str = "ddim") -> jnp.ndarray:
  """Unit-norm image embeddings [B, E] for the condition ``cond`` (leaves [B, ...];
  ``null`` the dropped caption, ``prior.null_condition``), one key per row (jit-able).

  The model predicts x0 in the prior's space (sqrt(E) x unit vectors); DALL-E 2 guides the
  prior classifier-free (a weight 1 runs the conditional model alone)."""
  cond_model_fn = prior_lib.model_fn(prior, params)
  if guidance_scale == 1.0:
    def model_fn(z_t, logsnr):
      return cond_model_fn(z_t, logsnr, cond)
  else:
    model_fn = guidance.classifier_free(cond_model_fn, cond, null, guidance_scale)
  z_T = samplers.initial_noise(keys, (cond["text_emb"].shape[0], prior.config.embed_dim))
  z = samplers.sample(sampler, model_fn, z_T, grid, keys, parameterization="x0")
  return prior_lib.to_embedding(z)


class PriorSampler:
  """A trained prior with its CLIP: ``__call__(prompts, key, first_index)`` -> unit-norm
  image embeddings [B, E]; row b draws its noise from image_keys(key)[first_index + b].

  ``num_candidates`` > 1: DALL-E 2's sampling trick (sec. 2.1): draw that many embeddings
  per caption (candidate c from fold_in(row key, c)) and keep the one of highest dot
  product with the caption's CLIP text embedding."""

  def __init__(self, spec: PriorSpec, params: Any, clip: clip_lib.CLIP, *,
               num_steps: int = 25, guidance_scale: float = 3.0, sampler: str = "ddim",
               num_candidates: int = 1):
    if clip.config.projection_dim != spec.config.embed_dim:
      raise ValueError(f"the prior samples {spec.config.embed_dim}-d embeddings, but the "
                       f"CLIP's projection is {clip.config.projection_dim}-d: pass the CLIP "
                       "the prior was trained with.")
    if num_candidates < 1:
      raise ValueError(f"num_candidates must be >= 1, got {num_candidates}.")
    samplers.get(sampler)
    self.spec, self.params, self.clip = spec, params, clip
    self.prior = prior_lib.DiffusionPrior(spec.config)
    self.null = prior_lib.null_condition(spec.config, spec.text_length)
    grid = grids.uniform_time(spec.noise_schedule(), num_steps)
    self.settings = {"num_steps": num_steps, "guidance_scale": guidance_scale,
                     "sampler": sampler, "num_candidates": num_candidates}

    def run(params, cond, null, keys):
      if num_candidates == 1:
        return sample_prior(self.prior, params, cond, null, keys, grid,
                            guidance_scale=guidance_scale, sampler=sampler)
      b = keys.shape[0]
      cand_keys = jax.vmap(lambda c: jax.vmap(lambda k: jax.random.fold_in(k, c))(keys))(
          jnp.arange(num_candidates)).reshape(num_candidates * b)
      tiled = jax.tree.map(lambda x: jnp.concatenate([x] * num_candidates), cond)
      emb = sample_prior(self.prior, params, tiled, null, cand_keys, grid,
                         guidance_scale=guidance_scale, sampler=sampler)
      emb = emb.reshape(num_candidates, b, -1)
      best = jnp.argmax(jnp.einsum("cbe,be->cb", emb, cond["text_emb"]), axis=0)
      return jnp.take_along_axis(emb, best[None, :, None], axis=0)[0]

    self._run = jax.jit(run)

  def condition(self, prompts) -> dict:
    return encode_captions(self.clip, prompts, self.spec.text_length)

  def __call__(self, prompts, key: jax.Array, first_index: int = 0) -> jnp.ndarray:
    cond = self.condition(prompts)
    keys = samplers.image_keys(key, len(prompts), first_index)
    return self._run(self.params, cond, self.null, keys)


# --- The decoder: a cascade whose base stage takes the image embedding ------------------


def decode(cascade, image_embed: jnp.ndarray, prompts, key: jax.Array, *,
           first_index: int = 0, progress=None) -> list[np.ndarray]:
  """Images of every stage of ``cascade`` ([B, H_k, W_k, C] in [-1, 1], decoder first) for
  unit-norm image embeddings [B, E] and captions ``prompts`` ("" for none: variations).

  The decoder's classifier-free guidance drops the embedding with the caption (its null
  half gets zeros, the embedding's training null), as DALL-E 2 guides its decoder; the
  super-resolution stages after it see the caption and the previous stage's images."""
  image_embed = jnp.asarray(image_embed, jnp.float32)
  if image_embed.ndim != 2 or image_embed.shape[0] != len(prompts):
    raise ValueError(f"decode needs embeddings [{len(prompts)}, E] for {len(prompts)} "
                     f"prompts, got {tuple(image_embed.shape)}.")
  return cascade.sample(list(prompts), key, first_index=first_index, progress=progress,
                        extra_cond={"image_embed": image_embed},
                        null_extra={"image_embed": jnp.zeros(image_embed.shape[1:])})
