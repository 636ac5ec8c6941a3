"""SDXL's multi-aspect training (Podell et al. 2023, section 2.3) on the shapes dataset:
every batch is drawn at one *aspect bucket* (height, width), the buckets about one pixel
count, and the network is told the bucket (``conditioning.TargetSize``).

    pipeline = BucketedShapesPipeline("shapes/32px_20k", data_dir=d, global_batch_size=32,
                                      buckets=((32, 32), (24, 40), (40, 24)), seed=0)
    batch = next(pipeline)  # {"image": [B, h, w, 3] at this batch's bucket,
                            #  "target_size": [B, 2] = (h, w), "caption": [B] str, ...}

Design. The TFDS builder stores square images, and each example's scene (``attributes``).
A bucket re-lays the stored scene out in its own frame (``shapes.relayout``: the same
objects, colours, sizes and caption, new positions that keep the caption true) and renders
it at the bucket's size; the square bucket renders the stored scene as it is, i.e. the
stored image. So one prepared dataset serves every bucket list (a bucketed builder config
would store each scene once per bucket, or tie each scene to one aspect ratio, and need
re-preparing whenever the list changes); the same examples, shuffling, epochs, per-process
shards and captions (the text cache) as ``InputPipeline``. Rendering costs more than
decoding the PNG would, but stays far ahead of the train step (README "Measured").

Which bucket: batch n (counted from the start of the stream, so a restored state continues
the sequence) is bucket ``bucket_index(seed, n, probabilities)``, an independent draw with
the given shares from the key (seed, n) alone: deterministic, resumable, and the same on
every process (a global batch has one shape). Multi-host: process p of m reads examples
p, p + m, ... and yields global_batch_size // m of them per batch, as ``InputPipeline``.
"""

from __future__ import annotations

import grain
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import pipeline as pipeline_lib
from diffusion_jax.data import shapes

# The bucket draws' own stream: keys (seed, _BUCKET_STREAM, batch) meet no other draw.
_BUCKET_STREAM = 0x6275636B
CROPS = ("center", "random_rescale")
# How far a bucket's pixel count may stray from the square bucket's (SDXL's buckets stay
# within a few percent of 1024^2; coarse divisors at small sizes need more room).
PIXEL_TOLERANCE = 0.25


def check_buckets(buckets, resolution: int, divisor: int = 1) -> tuple[tuple[int, int], ...]:
  """``buckets`` as a tuple of (height, width) int pairs, or ValueError with one line:
  each side must divide by ``divisor``, the square bucket (resolution, resolution) must be
  among them (sampling's default) and every bucket's pixel count within
  ``PIXEL_TOLERANCE`` of its."""
  checked = []
  for bucket in buckets:
    try:
      height, width = bucket
      pair = (int(height), int(width))
      if pair != (height, width) or min(pair) < 1:
        raise ValueError
    except (TypeError, ValueError):
      raise ValueError(f"aspect bucket {bucket!r} is not a (height, width) pair of positive "
                       "integers.") from None
    if pair in checked:
      raise ValueError(f"aspect bucket {pair} is listed twice.")
    for side in pair:
      if side % divisor:
        raise ValueError(f"aspect bucket {pair}: {side} does not divide by {divisor}; use "
                         f"sides that are multiples of {divisor}.")
    share = pair[0] * pair[1] / resolution ** 2
    if abs(share - 1.0) > PIXEL_TOLERANCE:
      raise ValueError(f"aspect bucket {pair} has {pair[0] * pair[1]} pixels, {share:.0%} of "
                       f"the square bucket's {resolution}x{resolution}; buckets keep about one "
                       f"pixel count (within {PIXEL_TOLERANCE:.0%}).")
    checked.append(pair)
  if (resolution, resolution) not in checked:
    raise ValueError(f"the aspect buckets {checked} lack the square bucket ({resolution}, "
                     f"{resolution}): the size the others match and sampling's default.")
  return tuple(checked)


def bucket_probabilities(weights, count: int) -> np.ndarray:
  """Shares [count] of the buckets: equal for no ``weights``, else proportional to them
  (ValueError with one line unless one non-negative weight per bucket, sum > 0)."""
  if weights is None or len(weights) == 0:
    return np.full(count, 1.0 / count)
  p = np.asarray(weights, np.float64)
  if p.shape != (count,) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"bucket weights {list(weights)} must be {count} non-negative numbers "
                     "(one per bucket) with a positive sum.")
  return p / p.sum()


def bucket_index(seed: int, batch: int, probabilities: np.ndarray) -> int:
  """The bucket of batch ``batch`` (0-based) of the stream seeded ``seed``: a draw with
  ``probabilities`` from the key (seed, batch) alone."""
  rng = np.random.default_rng([seed, _BUCKET_STREAM, batch])
  return int(rng.choice(len(probabilities), p=probabilities))


def _to_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class BucketedShapesPipeline(pipeline_lib.ResumableBatches):
  """Batches of a prepared shapes split, each rendered at one aspect bucket; an iterator
  with get_state / set_state (``InputPipeline``'s protocol).

  Yields dicts of numpy arrays (B = global_batch_size // process_count, (h, w) the
  batch's bucket, ``bucket_of(n)`` for batch n):
    "image":       float32 [B, h, w, 3] in [-1, 1]
    "target_size": float32 [B, 2] = (h, w): SDXL's target-size conditioning
    "micro_cond":  float32 [B, 4] with crop="random_rescale": the scene rendered with its
                   shorter side at min(h, w) * U[1, max_rescale], then a random (h, w) crop:
                   (height, width) rendered and the crop's (top, left), in pixels
    "caption":     object [B] of str (the stored caption: relayout keeps it true)
    "attributes":  object [B] of JSON str, the scene as rendered (positions in its
                   frame, ``Scene.extent``), "num_objects" int32 [B], "kind" int64 [B]
  """

  def __init__(self, dataset: str | tfds.core.DatasetBuilder, *, data_dir: str | None = None,
               split: str = "train", buckets, weights=None, global_batch_size: int,
               seed: int = 0, crop: str = "center", max_rescale: float = 1.5,
               shuffle: bool = True, num_epochs: int | None = None,
               process_index: int | None = None, process_count: int | None = None,
               num_threads: int = 4, prefetch_buffer_size: int = 64):
    process_index, process_count = pipeline_lib.process_share(
        global_batch_size, process_index, process_count)
    if crop not in CROPS:
      raise ValueError(f"aspect buckets take crop {' or '.join(CROPS)}, got {crop!r}.")
    if not max_rescale >= 1.0:
      raise ValueError(f"max_rescale must be >= 1, got {max_rescale}.")
    self.buckets = tuple((int(h), int(w)) for h, w in buckets)
    if not self.buckets:
      raise ValueError("no aspect buckets given.")
    self._p = bucket_probabilities(weights, len(self.buckets))
    source, features, self.name = pipeline_lib.open_tfds_source(
        dataset, data_dir, split, decoders={"image": tfds.decode.SkipDecoding()})
    missing = {"attributes", "caption"} - set(features.keys())
    if missing:
      raise ValueError(f"{self.name!r} has no {sorted(missing)} feature: aspect buckets "
                       "re-render the shapes dataset's scenes (shapes/<R>px_<N>).")
    if len(source) == 0:
      raise ValueError(f"Split {split!r} of {self.name!r} is empty.")
    self._seed, self._crop, self._max_rescale = seed, crop, max_rescale
    self.batch_size = global_batch_size // process_count
    self.num_examples = len(range(process_index, len(source), process_count))
    self._element_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    self._fingerprint = {
        "dataset": self.name, "split": split, "seed": seed, "shuffle": shuffle,
        "global_batch_size": global_batch_size, "process_index": process_index,
        "process_count": process_count, "num_epochs": num_epochs, "crop": crop,
        "buckets": [list(b) for b in self.buckets], "bucket_shares": self._p.tolist()}
    if crop == "random_rescale":
      self._fingerprint["max_rescale"] = max_rescale

    data = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
      data = data.shuffle(seed=seed)
    if num_epochs != 1:
      data = data.repeat(num_epochs)
    # The index is the element's position in this process's stream: it names its batch
    # (so its bucket) and seeds its layout and crop, whichever thread renders it.
    data = data.map_with_index(self._render)
    data = data.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    self._iterator = iter(data.batch(self.batch_size, drop_remainder=True,
                                     batch_fn=pipeline_lib.stack))

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  def bucket_of(self, batch: int) -> tuple[int, int]:
    """(height, width) of batch ``batch`` (0-based, from the start of the stream)."""
    return self.buckets[bucket_index(self._seed, batch, self._p)]

  def _render(self, position: int, example: dict) -> dict:
    height, width = self.bucket_of(position // self.batch_size)
    rng = np.random.default_rng([self._element_seed, position])
    scene = shapes.Scene.from_json(_to_str(example["attributes"]))
    extent = shapes.bucket_extent(height, width)
    if height != width:
      scene = shapes.relayout(scene, extent, rng)
    out = {}
    if self._crop == "random_rescale":
      short = int(round(min(height, width) * rng.uniform(1.0, self._max_rescale)))
      size = (int(round(extent[1] * short)), int(round(extent[0] * short)))
      image = shapes.render(scene, size)
      top = int(rng.integers(size[0] - height + 1))
      left = int(rng.integers(size[1] - width + 1))
      image = image[top:top + height, left:left + width]
      out["micro_cond"] = np.asarray([*size, top, left], np.float32)
    else:
      image = shapes.render(scene, (height, width))
    out.update(image=pipeline_lib.to_unit_range(image),
               target_size=np.asarray([height, width], np.float32),
               caption=_to_str(example["caption"]), attributes=scene.to_json(),
               num_objects=np.asarray(example["num_objects"], np.int32),
               kind=np.asarray(example["kind"], np.int64))
    return out
