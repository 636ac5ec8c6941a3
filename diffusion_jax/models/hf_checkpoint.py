"""Reading Hugging Face model directories into Flax parameter trees, shard by shard.

Shared by every pretrained text encoder family (T5 now, BERT later): a family says how to
build its Flax module from ``config.json`` and where each of its parameters comes from in
the PyTorch state dict (``EncoderFamily``); this module finds the files, reads the
safetensors lazily through the ``safetensors`` package (``safe_open`` / ``get_slice``),
checks every shape and places each tensor straight onto its target ``NamedSharding``,
reading from disk only the bytes of each device's shard.

A usable checkpoint directory holds::

  config.json                           architecture ("model_type" picks the family)
  model.safetensors                     or: model.safetensors.index.json + its shards
  tokenizer.json (+ tokenizer_config.json, special_tokens_map.json), or spiece.model

Pickled PyTorch weights (``pytorch_model.bin``) are refused: unpickling runs arbitrary code
and would make torch a runtime dependency.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model", "vocab.txt")
# Hub ids are "name" or "org/name"; anything else is taken to be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one Flax parameter comes from: the first present of ``names``, then ``transform``.

  ``transform`` maps the PyTorch layout to ours (e.g. a Linear weight [out, in] to a
  kernel [in, out]); it must only transpose / reshape (numpy views, no arithmetic): the
  reader applies it to index arrays to find which elements of the file a shard needs.
  """
  names: tuple[str, ...]
  transform: Transform = lambda x: x


@dataclasses.dataclass(frozen=True)
class EncoderFamily:
  """One architecture family of pretrained text encoders, keyed by config.json's model_type.

  config_from_hf: config.json dict -> the family's frozen config dataclass.
  make_module:    (config, compute dtype) -> a Flax module with
                  ``__call__(tokens [B, L] int32, mask [B, L] bool) -> [B, L, D]``.
  param_sources:  config -> {flattened param path: Source}, covering every parameter.
  width:          config -> D, the width of the token embeddings.
  """
  name: str
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  make_module: Callable[[Any, Any], nn.Module]
  param_sources: Callable[[Any], Mapping[tuple[str, ...], Source]]
  width: Callable[[Any], int]


# Seconds to wait for a TCP connection to the hub before calling the machine offline: a
# firewall that drops packets would otherwise stall snapshot_download for minutes.
HUB_PROBE_TIMEOUT_S = 3.0
_MISSING_FILES = (f"{CONFIG_NAME}, {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME} and its shards) and "
                  "the tokenizer files (tokenizer.json or spiece.model)")


def _error_text(error: BaseException) -> str:
  """``Type: first line of the message``, for one-line reports of a caught exception."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _hub_unreachable_reason(endpoint: str, timeout: float) -> str | None:
  """None if a TCP connection to ``endpoint`` (or its proxy) opens within ``timeout`` s,
  else why not (the connection error, or that nothing answered in time).

  Name resolution has no timeout of its own, so the attempt runs in a daemon thread that is
  abandoned after ``timeout``.
  """
  url = urllib.parse.urlsplit(endpoint)
  host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
  proxy = urllib.request.getproxies().get(url.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = proxy_url.hostname, proxy_url.port or 80
  outcome = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      outcome.append(None)
    except OSError as e:  # refused, unresolvable, timed out: the reason is reported
      outcome.append(f"connecting to {host}:{port} failed ({_error_text(e)})")

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  if not outcome:
    return f"the hub ({endpoint}) did not answer within {timeout:g} s (offline?)"
  return None if outcome[0] is None else f"the hub ({endpoint}) is unreachable: {outcome[0]}"


def _local_path_reason(text: str) -> str | None:
  """Why ``text`` (which names no existing path) must be a local path, or None if it could
  be a hub id ("name" or "org/name")."""
  if not _HUB_ID.match(text) or text.startswith((".", "~")):
    return "it is a path, not a Hugging Face hub id ('name' or 'org/name')"
  parent = text.split("/", 1)[0]
  if "/" in text and pathlib.Path(parent).is_dir():
    return f"{parent}/ is a local directory, so it is read as a path"
  return None


def resolve_directory(path_or_id: str | os.PathLike) -> pathlib.Path:
  """A local directory for ``path_or_id``: a path, or a hub id looked up in the HF cache.

  Hub ids resolve with ``huggingface_hub.snapshot_download``, from the local cache first and
  from the hub unless ``HF_HUB_OFFLINE=1`` or the hub does not answer within
  ``HUB_PROBE_TIMEOUT_S``. Something that can only be a path (absolute, ``./``, ``~``, more
  than one ``/``, or ``org/name`` where ``org/`` is a local directory) never reaches the hub.
  Raises FileNotFoundError naming what is missing and where it was looked for, quickly.
  """
  text = os.fspath(path_or_id)
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise NotADirectoryError(f"{text} is a file; expected a Hugging Face model directory "
                             f"(with {CONFIG_NAME} and {WEIGHTS_NAME}).")
  import huggingface_hub  # Deferred: only hub ids need it.
  from huggingface_hub import constants, errors
  patterns = ["*.json", "*.safetensors", "spiece.model", "vocab.txt"]
  invalid_id = None
  if _HUB_ID.match(text):
    try:  # A cached hub id wins even if it also looks like a path.
      return pathlib.Path(huggingface_hub.snapshot_download(
          text, allow_patterns=patterns, local_files_only=True))
    except errors.LocalEntryNotFoundError:
      pass  # not cached: look for a local path, then the hub
    except errors.HFValidationError as e:  # e.g. "a..b": not a hub id
      invalid_id = _error_text(e)
    except Exception as e:  # an unreadable or corrupt cache entry, say
      raise ValueError(f"Looking up text encoder {text!r} in the Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}) failed: {_error_text(e)}. Fix or delete "
                       "that cache entry, or pass a local model directory.") from e
  local_reason = _local_path_reason(text)
  if local_reason is not None:
    raise FileNotFoundError(
        f"Text encoder directory {path.resolve()} does not exist ({text!r}: {local_reason}). "
        f"Missing there: {_MISSING_FILES}. Pass an existing Hugging Face model directory "
        f"(relative paths start from {pathlib.Path.cwd()}).")
  if invalid_id is not None:
    reason = f"it is not a valid hub id ({invalid_id})"
  elif constants.HF_HUB_OFFLINE:
    reason = "HF_HUB_OFFLINE is set"
  elif (unreachable := _hub_unreachable_reason(constants.ENDPOINT,
                                               HUB_PROBE_TIMEOUT_S)) is not None:
    reason = unreachable
  else:
    try:
      return pathlib.Path(huggingface_hub.snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # Unknown or gated repo, network failure...: all reported
      reason = f"downloading it from {constants.ENDPOINT} failed ({_error_text(e)})"
  raise FileNotFoundError(
      f"Text encoder {text!r} is neither a local directory ({path.resolve()}) nor in the "
      f"Hugging Face cache ({constants.HF_HUB_CACHE}), and {reason}. Missing: "
      f"{_MISSING_FILES}. Download it on a machine with network access (e.g. "
      f"`hf download {text}`) and pass the directory, or copy the cache.")


def read_config(directory: pathlib.Path) -> dict[str, Any]:
  """config.json of a model directory as a dict."""
  path = directory / CONFIG_NAME
  if not path.is_file():
    raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a Hugging Face model "
                            "directory (saved with save_pretrained)?")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a directory (one file, or the shards of an index)."""
  single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
  if single.is_file():
    return [single]
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
      raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}.")
    return [directory / s for s in shards]
  pickles = [n for n in PICKLE_NAMES if (directory / n).is_file()]
  if pickles:
    raise ValueError(
        f"{directory} has only PyTorch pickle weights ({pickles[0]}); they are not loaded "
        "because unpickling can run arbitrary code. Convert them once to safetensors, e.g. "
        "`transformers.T5EncoderModel.from_pretrained(d).save_pretrained(d)` (which writes "
        f"{WEIGHTS_NAME}), or download the repo's safetensors files.")
  raise FileNotFoundError(f"{directory} has no weights: expected {WEIGHTS_NAME} or "
                          f"{WEIGHTS_INDEX_NAME} (with its shards).")


def _axis_coordinates(shape: tuple[int, ...], axis: int) -> np.ndarray:
  """[*shape] array whose entries are their own index along ``axis``: a zero-stride view
  of an arange, so it costs no memory until indexed."""
  ramp = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(len(shape))])
  return np.broadcast_to(ramp, shape)


class LazyTensor:
  """One tensor of a safetensors file, read on demand through ``safetensors.safe_open``.

  ``read(transform, index)`` returns ``transform(tensor)[index]`` reading only the bytes
  it needs: the transform (a transpose / reshape from ``Source``) is applied to per-axis
  coordinate views of the file's tensor, whose entries at ``index`` say which elements of
  the file that shard holds; their bounding box is read with ``get_slice`` and the shard
  gathered from it.
  """

  def __init__(self, handle, name: str, path: pathlib.Path):
    self._handle, self.name, self.path = handle, name, path
    self._slice = handle.get_slice(name)
    self.shape = tuple(self._slice.get_shape())

  def transformed_shape(self, transform: Transform) -> tuple[int, ...]:
    return transform(np.broadcast_to(np.zeros((), np.int8), self.shape)).shape

  def read(self, transform: Transform, index: tuple[slice, ...] | None = None) -> np.ndarray:
    try:
      coords = None
      if index is not None and self.shape:
        coords = [transform(_axis_coordinates(self.shape, a))[index]
                  for a in range(len(self.shape))]
      if coords is None or not coords[0].size:  # whole tensor (or scalar, or empty shard)
        out = transform(self._handle.get_tensor(self.name))
        return np.asarray(out if index is None else out[index])
      lows = [int(c.min()) for c in coords]
      box = self._slice[tuple(slice(lo, int(c.max()) + 1)
                              for lo, c in zip(lows, coords, strict=True))]
      return np.asarray(box[tuple(c - lo for c, lo in zip(coords, lows, strict=True))])
    except Exception as e:  # a truncated or corrupt file, an unsupported dtype...
      raise ValueError(f"Reading {self.name} from {self.path} failed: {_error_text(e)}.") \
          from e


class SafetensorsReader(Mapping[str, LazyTensor]):
  """Lazy read-only view of the tensors in one or more safetensors files (the shards of an
  index), each a ``LazyTensor``.

  The format is parsed by the pinned ``safetensors`` package (``safe_open``, numpy
  framework), which reads BF16 as ``ml_dtypes.bfloat16`` (safetensors 0.8.0, tested in
  test_t5.py) and slices without reading whole tensors; nothing here parses the header.
  """

  def __init__(self, files: Sequence[pathlib.Path]):
    from safetensors import safe_open

    self._tensors: dict[str, LazyTensor] = {}
    for path in files:
      try:
        handle = safe_open(str(path), framework="numpy")
        self._tensors.update({name: LazyTensor(handle, name, path) for name in handle.keys()})
      except Exception as e:  # safetensors' own error for a corrupt header, say
        raise ValueError(f"{path} is not a readable safetensors file: {_error_text(e)}.") \
            from e

  def __getitem__(self, name: str) -> LazyTensor:
    return self._tensors[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._tensors[name].shape

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)


def fingerprint(directory: pathlib.Path) -> str:
  """A short hash identifying a checkpoint's config, tokenizer and weights, for cache keys.

  Hashes config.json and tokenizer files whole, and of each weight file its size, header
  (names, shapes, dtypes) and three 64 KiB samples of the data: multi-GB files are not read
  in full, yet a retrained checkpoint saved to the same path gets a new id.
  """
  h = hashlib.sha256()
  for name in (CONFIG_NAME,) + TOKENIZER_NAMES:
    if (directory / name).is_file():
      h.update(name.encode() + b"\0" + (directory / name).read_bytes())
  for path in weight_files(directory):
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
      for offset in (0, size // 2, max(size - 65536, 0)):
        f.seek(offset)
        h.update(f.read(65536))
  return h.hexdigest()[:16]


def load_params(sources: Mapping[tuple[str, ...], Source], abstract_params: Any,
                reader: Mapping[str, np.ndarray], shardings: Any = None,
                where: str = "checkpoint") -> Any:
  """Builds the parameter tree ``abstract_params`` describes from checkpoint tensors.

  Args:
    sources: flattened param path -> Source (from the family's ``param_sources``).
    abstract_params: unboxed tree of ShapeDtypeStructs (``jax.eval_shape`` of init).
    reader: tensor name -> array, or -> LazyTensor (a SafetensorsReader), which reads
      only each shard's bytes.
    shardings: None (default device) or a tree of NamedShardings like abstract_params;
      each leaf is then assembled shard by shard with ``jax.make_array_from_callback``,
      so no device (and, multi-host, no process) holds more than its slice.
    where: the checkpoint's location, for error messages.
  Returns the tree of jax Arrays (dtype of the abstract leaves, float32 for our models).
  Raises ValueError listing missing tensors or every tensor whose shape does not match.
  """
  flat_abstract = traverse_util.flatten_dict(abstract_params)
  flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  problems, arrays = [], {}
  for path, leaf in flat_abstract.items():
    source = sources[path]  # A KeyError here is a bug in the family's param_sources.
    name = next((n for n in source.names if n in reader), None)
    if name is None:
      problems.append(f"missing tensor {' or '.join(source.names)}")
      continue
    tensor = reader[name]
    lazy = isinstance(tensor, LazyTensor)
    shape = tensor.transformed_shape(source.transform) if lazy else \
        source.transform(tensor).shape
    if shape != leaf.shape:
      problems.append(f"{name} has shape {tuple(tensor.shape)} but config.json implies "
                      f"{leaf.shape} (our layout, {'/'.join(path)})")
      continue
    read = (functools.partial(tensor.read, source.transform) if lazy else
            lambda index=None, t=tensor, f=source.transform: f(t) if index is None
            else f(t)[index])
    arrays[path] = (read, shape, leaf.dtype)
  if problems:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise ValueError(f"{where} does not match its config.json: " + "; ".join(problems[:3])
                     + more + ". Is config.json from the same model as the weights?")
  placed = {}
  for path, (read, shape, dtype) in arrays.items():
    if path in flat_shardings:
      placed[path] = jax.make_array_from_callback(
          shape, flat_shardings[path],
          lambda index, r=read, d=dtype: np.asarray(r(index), dtype=d))
    else:
      placed[path] = jax.device_put(np.asarray(read(), dtype=dtype))
  return traverse_util.unflatten_dict(placed)
