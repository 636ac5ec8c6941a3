"""Input pipeline: any TFDS dataset prepared as array_record, read with tfds.data_source + grain.

    pipeline = InputPipeline("shapes/32px_20k", data_dir=d, split="train", caption_key="caption",
                             resolution=32, global_batch_size=32, seed=0)
    batch = next(pipeline)   # {"image": [B, 32, 32, 3] float32 in [-1, 1], "caption": [B] str,
                             #  "attributes": [B] JSON str, "num_objects": [B] int32,
                             #  "kind": [B] int64}
    state = pipeline.get_state()   # JSON-serialisable; pipeline.set_state(state) resumes exactly

Per example: the image is resized (antialiased) so its shorter side is `resolution` and
centre-cropped (``crop="center"``), or, with ``crop="random"``, a `resolution` window is cut at
the image's own scale (upscaled only if smaller), as Imagen's super-resolution stages train on
crops; the optional low-resolution conditioning image is an antialiased downsample of that crop.

Passthrough by default: numeric scalar features (e.g. "label"); for the shapes dataset also
"attributes", the scene as the JSON string it is stored as (``json.loads`` it, or
``shapes.Scene.from_json``), so generated images can be scored against their prompts. It stays
a string because the train step ignores it (parsing every scene would cost the pipeline for
nothing) and a string batches and serialises like the caption does.

Determinism: the order is a seeded shuffle (a new permutation per epoch), random crops draw from
an RNG seeded by (seed, process, element index), so the batches depend only on the arguments
and the iterator state, not on threads or timing. Multi-host: process p of n reads examples
p, p + n, ... (disjoint shards) and yields global_batch_size // n of them per batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# imported to register their builders
from diffusion_jax.data import edit_pairs_tfds, real_tfds, shapes_tfds

# random_rescale: SDXL's training crops (Podell et al. 2023, section 2.2): the shorter side
# rescaled to resolution * U[1, max_rescale], then a random crop; the batch gets
# "micro_cond" = (height, width, top, left) of that crop in pixels.
CROPS = ("center", "random", "random_rescale")
# PIL's bicubic resize widens its kernel when downsampling, so it is antialiased.
_RESAMPLE = Image.Resampling.BICUBIC


def _prepare_hint(name: str, data_dir: str) -> str:
  if name.startswith("shapes/"):
    return "prepare it with: " + shapes_tfds.prepare_command(data_dir, name.split("/", 1)[1])
  if name.startswith(edit_pairs_tfds.NAME + "/"):
    return "prepare it with: " + edit_pairs_tfds.prepare_command(data_dir, name.split("/")[1])
  if real_tfds.is_real_dataset(name):
    return "prepare it with: " + real_tfds.prepare_command(data_dir, name)
  return (f"prepare it with: tfds build {name} --data_dir={data_dir} --file_format=array_record "
          "(on a machine that can download its source files)")


def open_tfds_source(dataset: str | tfds.core.DatasetBuilder, data_dir: str | None, split: str,
                     decoders: dict | None = None):
  """The random-access source of a prepared split, and the dataset's features.
  ``decoders``: tfds decoders per feature (e.g. ``tfds.decode.SkipDecoding()`` for images
  that are not needed).

  Returns (source: Sequence of example dicts, features: tfds FeaturesDict, name: str).
  Raises ValueError / FileNotFoundError with one message saying what is wrong and how to fix it.
  """
  if isinstance(dataset, tfds.core.DatasetBuilder):
    builder = dataset
    data_dir = str(builder.data_dir_root)
  else:
    if data_dir is None:
      raise ValueError(f"data_dir is required to read {dataset!r}: pass the directory the "
                       "dataset was prepared in (e.g. ~/tensorflow_datasets).")
    data_dir = os.path.expanduser(str(data_dir))
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(f"data_dir {data_dir!r} does not exist; {dataset!r} cannot have "
                              f"been prepared there. {_prepare_hint(dataset, data_dir)}")
    try:
      builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(f"Unknown dataset {dataset!r}: not a registered TFDS dataset. Use "
                       "'shapes/<resolution>px_<num_train>' (e.g. 'shapes/32px_20k') for the "
                       "built-in dataset, or a TFDS name such as 'cifar10'.") from None
    except ValueError as error:  # e.g. an unknown config of a known dataset
      raise ValueError(f"Cannot use dataset {dataset!r}: {str(error).splitlines()[0]}") from None
  name = f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name
  try:
    source = builder.as_data_source(split=split, decoders=decoders)
  except Exception as error:
    if not builder.is_prepared():
      raise FileNotFoundError(f"Dataset {name!r} is not prepared in data_dir {data_dir!r} "
                              f"(looked in {builder.data_path}); "
                              f"{_prepare_hint(name, data_dir)}") from None
    if isinstance(error, NotImplementedError):  # prepared, but not as array_record
      raise ValueError(f"Dataset {name!r} in {builder.data_path} is not in array_record format, "
                       f"which random access needs; re-{_prepare_hint(name, data_dir)}") from None
    if isinstance(error, ValueError) and "split" in str(error).lower():
      raise ValueError(f"Dataset {name!r}: {str(error).splitlines()[0]}") from None
    raise
  return source, builder.info.features, name


def _is_numeric_scalar(feature) -> bool:
  return tuple(feature.shape) == () and np.dtype(feature.np_dtype).kind in "biuf"


# Text features passed through by default, per dataset: small structured metadata that
# evaluation needs. Generic text features are not, as they can be large (URLs, alt-texts).
_DEFAULT_TEXT_PASSTHROUGH = {"shapes": ("attributes",), edit_pairs_tfds.NAME: ("attributes",)}


def default_passthrough_keys(name: str, features, image_key: str,
                             caption_key: str | None) -> list[str]:
  """Every numeric scalar feature, plus the dataset's structured attributes if it has any."""
  keys = [k for k in features.keys() if k not in (image_key, caption_key)
          and _is_numeric_scalar(features[k])]
  extra = _DEFAULT_TEXT_PASSTHROUGH.get(name.split("/", 1)[0], ())
  return keys + [k for k in extra if k in features and k not in (image_key, caption_key)]


def _as_rgb(image: np.ndarray, name: str) -> np.ndarray:
  """uint8 [H, W] / [H, W, 1|3|4] -> [H, W, 3]."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    image = image[..., :3]
  if image.dtype != np.uint8:
    raise ValueError(f"{name}: expected uint8 images, got {image.dtype}.")
  return image


def _to_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Antialiased resize of uint8 [H, W, 3] so that min(H, W) == size."""
  height, width = image.shape[:2]
  if min(height, width) == size:
    return image
  scale = size / min(height, width)
  new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
  return np.asarray(Image.fromarray(image).resize(new_size, _RESAMPLE))


def downsample(image: np.ndarray, size: int) -> np.ndarray:
  """Antialiased resize of uint8 [H, W, 3] to [size, size, 3]."""
  return np.asarray(Image.fromarray(image).resize((size, size), _RESAMPLE))


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def stack(examples: Sequence[dict]) -> dict:
  """Examples (dicts of arrays and str) -> a batch: arrays stacked, strings an object array."""
  batch = {}
  for key, value in examples[0].items():
    values = [example[key] for example in examples]
    if isinstance(value, str):
      batch[key] = np.array(values, dtype=object)
    else:
      batch[key] = np.stack(values)
  return batch


def process_share(global_batch_size: int, process_index: int | None,
                  process_count: int | None) -> tuple[int, int]:
  """(process_index, process_count), JAX's when not given, checked: each process reads an
  equal share of the global batch."""
  if process_index is None or process_count is None:
    import jax  # only when needed: the data code itself does not use JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"process_count {process_count} (each process reads an equal share).")
  return process_index, process_count


class ResumableBatches:
  """A stream of batches from a grain iterator (``self._iterator``) whose position can be
  saved and restored; ``self._fingerprint`` names what a saved state must match."""

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> dict:
    """JSON-serialisable position in the stream of batches."""
    return {"grain": self._iterator.get_state(), "pipeline": dict(self._fingerprint)}

  def set_state(self, state: dict) -> None:
    """Resumes at `state` (from get_state of a pipeline built with the same arguments):
    the same batches follow."""
    saved = state.get("pipeline", {})
    mismatched = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
    if mismatched:
      details = ", ".join(f"{k}: saved {s!r} vs now {n!r}" for k, (s, n) in mismatched.items())
      raise ValueError(f"Cannot restore the input pipeline: the saved state belongs to a "
                       f"different stream of batches ({details}).")
    self._iterator.set_state(state["grain"])


class InputPipeline(ResumableBatches):
  """Batches of a TFDS split for one process; an iterator with get_state / set_state.

  Yields dicts of numpy arrays (B = global_batch_size // process_count):
    "image":   float32 [B, resolution, resolution, 3] in [-1, 1]
    "lowres":  float32 [B, lowres_resolution, lowres_resolution, 3] in [-1, 1], if requested
    "caption": object [B] of python str (the caption feature, or caption_template with {label})
    <key>:     float32 [B, resolution, resolution, 3] in [-1, 1] for each of
               ``paired_image_keys``: other image features of the example, resized and
               cropped exactly as "image" (e.g. InstructPix2Pix's "input_image")
    "micro_cond": float32 [B, 4] with crop="random_rescale" (see CROPS)
    plus the passthrough features (default: every numeric scalar feature, e.g. "label", and
    for the shapes dataset "attributes": [B] of JSON str, see the module docstring).
  """

  def __init__(self, dataset: str | tfds.core.DatasetBuilder, *, data_dir: str | None = None,
               split: str = "train", image_key: str = "image", caption_key: str | None = None,
               label_key: str | None = None, caption_template: str = "a photo of a {label}",
               resolution: int, lowres_resolution: int | None = None, crop: str = "center",
               max_rescale: float = 1.5,
               global_batch_size: int, seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None, drop_remainder: bool = True,
               process_index: int | None = None, process_count: int | None = None,
               passthrough_keys: Sequence[str] | None = None,
               paired_image_keys: Sequence[str] = (), num_threads: int = 4,
               prefetch_buffer_size: int = 256):
    process_index, process_count = process_share(global_batch_size, process_index,
                                                 process_count)
    if crop not in CROPS:
      raise ValueError(f"crop must be one of {CROPS}, got {crop!r}.")
    if not max_rescale >= 1.0:
      raise ValueError(f"max_rescale must be >= 1, got {max_rescale}.")
    if resolution <= 0 or (lowres_resolution is not None
                           and not 0 < lowres_resolution <= resolution):
      raise ValueError(f"need resolution > 0 and 0 < lowres_resolution <= resolution, got "
                       f"{resolution} and {lowres_resolution}.")
    if (caption_key is None) == (label_key is None):
      raise ValueError("Pass exactly one of caption_key (a text feature) or label_key (a class "
                       "label, captioned with caption_template).")

    source, features, self.name = open_tfds_source(dataset, data_dir, split)
    available = ", ".join(sorted(features.keys()))
    for role, key in (("image_key", image_key), ("caption_key", caption_key),
                      ("label_key", label_key),
                      *(("paired_image_keys", k) for k in paired_image_keys)):
      if key is not None and key not in features:
        raise ValueError(f"{role}={key!r} is not a feature of {self.name!r}; its features are: "
                         f"{available}.")
    if label_key is not None:
      names = getattr(features[label_key], "names", None)
      self._label_names = list(names) if names else None
      if "{label}" not in caption_template:
        raise ValueError(f"caption_template {caption_template!r} must contain '{{label}}'.")
    if passthrough_keys is None:
      passthrough_keys = default_passthrough_keys(self.name, features, image_key, caption_key)
    for key in passthrough_keys:
      if key not in features:
        raise ValueError(f"passthrough key {key!r} is not a feature of {self.name!r}; its "
                         f"features are: {available}.")
    if len(source) == 0:
      raise ValueError(f"Split {split!r} of {self.name!r} is empty.")

    self._image_key, self._caption_key, self._label_key = image_key, caption_key, label_key
    self._paired_image_keys = tuple(paired_image_keys)
    self._caption_template = caption_template
    self._resolution, self._lowres_resolution, self._crop = resolution, lowres_resolution, crop
    self._max_rescale = max_rescale
    self._passthrough_dtypes = {k: np.dtype(features[k].np_dtype) for k in passthrough_keys}
    self.batch_size = global_batch_size // process_count
    self.num_examples = len(range(process_index, len(source), process_count))
    # Identifies the stream of batches, so a state is never restored into a different one.
    self._fingerprint = {
        "dataset": self.name, "split": split, "seed": seed, "shuffle": shuffle,
        "global_batch_size": global_batch_size, "process_index": process_index,
        "process_count": process_count, "num_epochs": num_epochs, "resolution": resolution,
        "lowres_resolution": lowres_resolution, "crop": crop,
        **({"paired_image_keys": list(paired_image_keys)} if paired_image_keys else {})}
    if crop == "random_rescale":
      self._fingerprint["max_rescale"] = max_rescale

    dataset = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
      dataset = dataset.shuffle(seed=seed)
    if num_epochs != 1:
      dataset = dataset.repeat(num_epochs)  # a shuffled dataset reshuffles every epoch
    crop_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    dataset = dataset.random_map(self._preprocess, seed=crop_seed)
    dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    dataset = dataset.batch(self.batch_size, drop_remainder=drop_remainder,
                            batch_fn=stack)
    self._iterator = iter(dataset)

  @property
  def steps_per_epoch(self) -> int:
    """Full batches per epoch for this process."""
    return self.num_examples // self.batch_size

  def _preprocess(self, example: dict, rng: np.random.Generator) -> dict:
    image = _as_rgb(example[self._image_key], self.name)
    paired = {k: _as_rgb(example[k], self.name) for k in self._paired_image_keys}
    for key, other in paired.items():
      if other.shape != image.shape:
        raise ValueError(f"{self.name}: {key} is {other.shape} but {self._image_key} is "
                         f"{image.shape}; paired images must have one size to share a crop.")
    size = self._resolution
    if self._crop == "center":
      image = resize_shorter_side(image, size)
      paired = {k: resize_shorter_side(v, size) for k, v in paired.items()}
      top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    else:
      if self._crop == "random_rescale":
        rescaled = int(round(size * rng.uniform(1.0, self._max_rescale)))
        image = resize_shorter_side(image, rescaled)
        paired = {k: resize_shorter_side(v, rescaled) for k, v in paired.items()}
      elif min(image.shape[:2]) < size:
        image = resize_shorter_side(image, size)
        paired = {k: resize_shorter_side(v, size) for k, v in paired.items()}
      top = int(rng.integers(image.shape[0] - size + 1))
      left = int(rng.integers(image.shape[1] - size + 1))
    micro = np.asarray([image.shape[0], image.shape[1], top, left], np.float32)
    image = image[top:top + size, left:left + size]
    out = {"image": to_unit_range(image)}
    for key, other in paired.items():
      out[key] = to_unit_range(other[top:top + size, left:left + size])
    if self._crop == "random_rescale":
      out["micro_cond"] = micro
    if self._lowres_resolution is not None:
      out["lowres"] = to_unit_range(downsample(image, self._lowres_resolution))
    if self._caption_key is not None:
      out["caption"] = _to_str(example[self._caption_key])
    else:
      label = int(example[self._label_key])
      label_name = self._label_names[label] if self._label_names else str(label)
      out["caption"] = self._caption_template.format(label=label_name.replace("_", " "))
    for key, dtype in self._passthrough_dtypes.items():
      value = example[key]
      out[key] = _to_str(value) if dtype.kind in "OSU" else np.asarray(value, dtype)
    return out

