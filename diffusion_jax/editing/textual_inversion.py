"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): learn the input
embedding of one new token (or a few) from a handful of images of a concept, with prompts
like "a picture of <s*>", everything else frozen.

* ``add_tokens`` returns a new ``TextEncoder`` whose tokenizer knows the placeholder
  token(s) and whose embedding table has their rows (initialised from an existing word's
  embedding, or given); every other row is the original array, untouched.
* ``train_step`` optimises only those rows: the trainable variable *is* the [n, D] block
  of new vectors, scattered into the frozen table inside the loss, so no other row of the
  table (nor any encoder or U-Net parameter) can change, and no gradient for them exists.
* ``save_embedding`` / ``load_embedding`` use the file diffusers'
  ``load_textual_inversion`` reads: a safetensors file with one tensor named by the token
  string, [D] for one vector or [n, D] for n vectors (loaded as tokens ``<s*>``,
  ``<s*>_1``, ... ``<s*>_{n-1}``, diffusers' multi-vector convention; a prompt then has to
  spell out all n tokens, as diffusers' ``maybe_convert_prompt`` does).

Works with the encoders of ``text.py``: T5 (table ``shared``) and BERT / MiniLM
(``word_embeddings``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import text as text_lib
from diffusion_jax.diffusion import losses, schedules
from diffusion_jax.models import bert, t5

TABLES = {t5.T5Encoder: "shared", bert.BertEncoder: "word_embeddings"}


def table_name(encoder: text_lib.TextEncoder) -> str:
  for module_type, name in TABLES.items():
    if isinstance(encoder.module, module_type):
      return name
  raise ValueError(f"textual inversion supports T5 and BERT encoders, not "
                   f"{type(encoder.module).__name__}.")


def token_names(token: str, num_vectors: int) -> list[str]:
  """diffusers' names of a multi-vector token: token, token_1, ..., token_{n-1}."""
  return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _with_table(params, name: str, table):
  params = dict(params)
  params[name] = dict(params[name], embedding=table)
  return params


def add_tokens(encoder: text_lib.TextEncoder, token: str, vectors: np.ndarray | None = None,
               *, num_vectors: int = 1, init_word: str | None = None
               ) -> tuple[text_lib.TextEncoder, np.ndarray]:
  """(encoder with placeholder ``token``, its ids [n]).

  ``vectors`` [n, D] (or [D]) sets the new rows; otherwise each of the ``num_vectors``
  rows starts at the mean embedding of ``init_word``'s tokens (Gal et al. initialise with
  a coarse descriptor such as "shape"), or at the table's mean row.
  """
  if not token or token.strip() != token or " " in token:
    raise ValueError(f"placeholder token {token!r} must be one non-empty word without "
                     "spaces, e.g. '<s*>'.")
  name = table_name(encoder)
  table = np.asarray(encoder.params[name]["embedding"])
  if vectors is not None:
    vectors = np.asarray(vectors, np.float32).reshape(-1, table.shape[1]) if np.ndim(
        vectors) in (1, 2) and np.shape(vectors)[-1] == table.shape[1] else None
    if vectors is None:
      raise ValueError(f"embedding vectors must be [D] or [n, D] with D = "
                       f"{table.shape[1]} (the encoder's table width).")
    num_vectors = vectors.shape[0]
  names = token_names(token, num_vectors)
  tokenizer = copy.deepcopy(encoder.tokenizer)
  vocab = tokenizer.get_vocab()
  taken = [n for n in names if n in vocab]
  if taken:
    raise ValueError(f"token(s) {taken} are already in the tokenizer's vocabulary; choose "
                     "another placeholder, e.g. '<concept>'.")
  if vectors is None:
    if init_word:
      ids = encoder.tokenizer(init_word, add_special_tokens=False)["input_ids"]
      if not ids:
        raise ValueError(f"init_word {init_word!r} has no tokens.")
      start = table[ids].mean(0)
    else:
      start = table.mean(0)
    vectors = np.broadcast_to(start, (num_vectors, table.shape[1])).astype(np.float32)
  tokenizer.add_tokens(names)
  ids = np.asarray(tokenizer.convert_tokens_to_ids(names), np.int32)
  rows = max(table.shape[0], int(ids.max()) + 1)
  new_table = jnp.asarray(encoder.params[name]["embedding"])
  if rows > table.shape[0]:
    new_table = jnp.concatenate(
        [new_table, jnp.zeros((rows - table.shape[0], table.shape[1]), new_table.dtype)])
  new_table = new_table.at[ids].set(jnp.asarray(vectors, new_table.dtype))
  module = encoder.module.clone(config=dataclasses.replace(encoder.module.config,
                                                           vocab_size=rows))
  new = text_lib.TextEncoder(
      module, _with_table(encoder.params, name, new_table), tokenizer,
      encoder_id=_inverted_id(encoder.encoder_id, names, vectors), width=encoder.width,
      max_length=encoder.max_length, mesh=encoder.mesh, rules=encoder.rules)
  return new, ids


def _inverted_id(base: str, names: Sequence[str], vectors: np.ndarray) -> str:
  digest = hashlib.sha256(np.asarray(vectors, np.float32).tobytes()
                          + "|".join(names).encode()).hexdigest()[:12]
  return f"{base}+inversion:{names[0]}@{digest}"


def with_vectors(encoder: text_lib.TextEncoder, ids: np.ndarray, vectors
                 ) -> text_lib.TextEncoder:
  """The encoder with rows ``ids`` of its table set to ``vectors`` [n, D] (new id)."""
  name = table_name(encoder)
  table = jnp.asarray(encoder.params[name]["embedding"]).at[jnp.asarray(ids)].set(
      jnp.asarray(vectors))
  names = encoder.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
  return encoder.with_params(_with_table(encoder.params, name, table),
                             _inverted_id(encoder.encoder_id.split("+inversion:")[0],
                                          names, np.asarray(vectors)))


@dataclasses.dataclass(frozen=True)
class InversionSettings:
  """How the new rows are trained (the diffusion loss of the frozen U-Net)."""

  parameterization: str = "v"
  schedule: str = "cosine"
  schedule_kwargs: tuple = ()
  weighting: str = "uniform"
  learning_rate: float = 5e-3


def make_train_step(encoder: text_lib.TextEncoder, cond_model_fn, ids: np.ndarray,
                    settings: InversionSettings):
  """(step(vectors, opt_state, tokens, mask, images, key) -> (vectors, opt_state, loss),
  optimizer). ``cond_model_fn(x_t, logsnr, cond)``: the frozen network (e.g.
  ``cascade.stage_model_fn(model, params)``); images [B, H, W, C] in [-1, 1]; tokens,
  mask [B, L] from ``encoder.tokenize``."""
  name, module = table_name(encoder), encoder.module
  frozen = jax.lax.stop_gradient(encoder.params)
  schedule = schedules.get(settings.schedule, **dict(settings.schedule_kwargs))
  optimizer = optax.adam(settings.learning_rate)
  ids = jnp.asarray(ids)

  def loss_fn(vectors, tokens, mask, images, key):
    table = frozen[name]["embedding"].at[ids].set(vectors.astype(
        frozen[name]["embedding"].dtype))
    hidden = module.apply({"params": _with_table(frozen, name, table)}, tokens, mask)
    emb = hidden.astype(jnp.float32) * mask[..., None]
    k_t, k_eps = jax.random.split(key)
    logsnr = schedule.logsnr(jax.random.uniform(k_t, (images.shape[0],)))
    eps = jax.random.normal(k_eps, images.shape)
    x_t = schedules.q_sample(images, eps, logsnr)
    prediction = cond_model_fn(x_t, logsnr, {"text_emb": emb, "text_mask": mask})
    per_example, _ = losses.diffusion_loss(prediction, images, eps, logsnr,
                                           settings.parameterization, settings.weighting)
    return jnp.mean(per_example)

  @jax.jit
  def step(vectors, opt_state, tokens, mask, images, key):
    loss, grad = jax.value_and_grad(loss_fn)(vectors, tokens, mask, images, key)
    updates, opt_state = optimizer.update(grad, opt_state, vectors)
    return optax.apply_updates(vectors, updates), opt_state, loss

  return step, optimizer


def train(encoder: text_lib.TextEncoder, cond_model_fn, ids: np.ndarray,
          images: np.ndarray, prompts: Sequence[str], key: jax.Array, *, num_steps: int,
          batch_size: int = 4, settings: InversionSettings = InversionSettings(),
          log=None) -> tuple[text_lib.TextEncoder, list[float]]:
  """Trains rows ``ids`` on ``images`` [N, H, W, C] with ``prompts`` (one per image, or
  one for all) for ``num_steps``; returns (encoder with the learned rows, losses)."""
  images = np.asarray(images, np.float32)
  prompts = list(prompts) * (len(images) if len(prompts) == 1 else 1)
  if len(prompts) != len(images) or not len(images):
    raise ValueError(f"need one prompt per image (or one for all), got {len(prompts)} "
                     f"prompts for {len(images)} images.")
  tokens, mask = encoder.tokenize(prompts)
  if not np.isin(ids, tokens).any():
    raise ValueError("no training prompt contains the placeholder token: write prompts "
                     "like 'a picture of <s*>'.")
  step, optimizer = make_train_step(encoder, cond_model_fn, ids, settings)
  vectors = jnp.asarray(encoder.params[table_name(encoder)]["embedding"])[jnp.asarray(ids)]
  opt_state, history = optimizer.init(vectors), []
  for i in range(num_steps):
    k_batch, k_step = jax.random.split(jax.random.fold_in(key, i))
    pick = np.asarray(jax.random.choice(k_batch, len(images), (batch_size,)))
    vectors, opt_state, loss = step(vectors, opt_state, tokens[pick], mask[pick],
                                    images[pick], k_step)
    history.append(float(loss))
    if log:
      log(f"step {i + 1}/{num_steps}: loss {history[-1]:.4f}")
  return with_vectors(encoder, ids, vectors), history


def save_embedding(path: str | os.PathLike, token: str, vectors) -> None:
  """Writes diffusers' textual-inversion file: {token: [D] or [n, D]} as safetensors."""
  from safetensors.numpy import save_file

  vectors = np.asarray(vectors, np.float32)
  save_file({token: vectors[0] if vectors.ndim == 2 and vectors.shape[0] == 1 else vectors},
            os.fspath(path))


def read_embedding(path: str | os.PathLike) -> tuple[str, np.ndarray]:
  """(token, vectors [n, D]) of a diffusers textual-inversion safetensors file."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  if not os.path.isfile(path):
    raise FileNotFoundError(f"textual-inversion file {path} not found.")
  try:
    state = load_file(os.fspath(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable safetensors file ({e}).") from None
  if len(state) != 1:
    raise ValueError(f"{path} holds {len(state)} tensors ({', '.join(sorted(state))}); a "
                     "textual-inversion file holds exactly one, named by its token.")
  (token, vectors), = state.items()
  vectors = np.asarray(vectors, np.float32)
  return token, vectors.reshape(1, -1) if vectors.ndim == 1 else vectors


def load_embedding(encoder: text_lib.TextEncoder, path: str | os.PathLike,
                   token: str | None = None) -> tuple[text_lib.TextEncoder, list[str]]:
  """The encoder with the file's token (renamed to ``token`` if given) added; returns
  (encoder, the token names a prompt can use)."""
  loaded, vectors = read_embedding(path)
  if vectors.ndim != 2 or vectors.shape[1] != encoder.width:
    raise ValueError(f"{path}: embedding of shape {vectors.shape} does not fit this text "
                     f"encoder (width {encoder.width}); it was learned for another encoder.")
  token = token or loaded
  new, _ = add_tokens(encoder, token, vectors)
  return new, token_names(token, vectors.shape[0])
