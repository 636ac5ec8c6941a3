"""TFDS builder for the procedural shapes dataset (array_record, no TensorFlow needed).

Config names encode everything that changes the data: ``{resolution}px_{num_train}`` with
optional ``_max{1|2|3}`` (objects per scene, default 3) and ``_seed{n}`` (default 0), e.g.
``shapes/32px_20k``, ``shapes/32px_20k_max1``, ``shapes/64px_500_seed3``. Any such name is
accepted, not only the predefined ones, so tests and scripts can build tiny variants.

Prepare from the command line:

  python -m diffusion_jax.data.shapes_tfds --data_dir=/tmp/tfds --config=32px_20k

Each example: ``image`` uint8 [R, R, 3] (PNG), ``caption`` str, ``attributes`` JSON str (the
scene: background, objects with colour / shape / position / radius, the caption's spec and
whether it holds a held-out pair), ``num_objects`` int32 and ``kind`` (index into
``shapes.KINDS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import parallel, shapes

_NAME_RE = re.compile(r"^(?P<res>\d+)px_(?P<num>\d+)(?P<k>k?)(?:_max(?P<max>[123]))?"
                      r"(?:_(?P<size>small|large))?(?:_seed(?P<seed>\d+))?$")


@dataclasses.dataclass(eq=False, kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
  """resolution: image side in px; num_train: train examples; max_objects: 1..3 per scene;
  single_size: every single-object scene "small" or "large" (None: either)."""
  resolution: int = 32
  num_train: int = 20_000
  max_objects: int = 3
  single_size: str | None = None
  seed: int = 0

  @property
  def num_eval(self) -> int:
    """Size of `validation` and of `test_compositional`."""
    return int(np.clip(self.num_train // 10, 16, 2000))


def config_name(resolution: int, num_train: int, max_objects: int = 3, seed: int = 0,
                single_size: str | None = None) -> str:
  """The canonical config name, e.g. config_name(32, 20000) == '32px_20k'."""
  if single_size is not None and single_size not in shapes.SIZES:
    raise ValueError(f"single_size must be one of {shapes.SIZES} or None, got {single_size!r}")
  size = f"{num_train // 1000}k" if num_train % 1000 == 0 else str(num_train)
  name = f"{resolution}px_{size}"
  if max_objects != 3:
    name += f"_max{max_objects}"
  if single_size is not None:
    name += f"_{single_size}"
  if seed != 0:
    name += f"_seed{seed}"
  return name


def config_from_name(name: str) -> ShapesConfig:
  """Parses a config name (see module docstring); ValueError if it does not match."""
  match = _NAME_RE.match(name)
  if match is None:
    raise ValueError(f"Shapes config {name!r} does not match "
                     "'<resolution>px_<num_train>[k][_max<1-3>][_small|_large][_seed<n>]', "
                     "e.g. '32px_20k'.")
  resolution = int(match["res"])
  num_train = int(match["num"]) * (1000 if match["k"] else 1)
  max_objects = int(match["max"] or 3)
  seed = int(match["seed"] or 0)
  single_size = match["size"]
  if not 8 <= resolution <= 2048 or num_train < 1:
    raise ValueError(f"Shapes config {name!r}: need 8 <= resolution <= 2048 and num_train >= 1.")
  return ShapesConfig(
      name=config_name(resolution, num_train, max_objects, seed, single_size),
      description=f"{resolution} px, {num_train} train examples, up to {max_objects} objects, "
                  f"single objects {single_size or 'small or large'}, seed {seed}",
      resolution=resolution, num_train=num_train, max_objects=max_objects,
      single_size=single_size, seed=seed)


_PREDEFINED = ("16px_20k", "32px_20k", "32px_20k_max1", "32px_100k", "64px_20k", "64px_100k",
               "256px_20k")


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Compositional shapes with captions; see `diffusion_jax.data.shapes`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [config_from_name(name) for name in _PREDEFINED]
  DEFAULT_CONFIG_NAME = "32px_20k"

  @classmethod
  def get_builder_config(cls, name, version=None):
    # Accept any well-formed config name, not only the predefined ones.
    config = super().get_builder_config(name, version)
    if config is None and _NAME_RE.match(name):
      config = config_from_name(name)
    return config

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not dataset_info_from_configs) because that reads metadata files
    # that live next to TFDS's own dataset packages.
    size = self.builder_config.resolution
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "attributes": tfds.features.Text(),
            "num_objects": tfds.features.Scalar(np.int32),
            "kind": tfds.features.ClassLabel(names=shapes.KINDS),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    return {
        "train": self._generate_examples("train", config.num_train),
        "validation": self._generate_examples("validation", config.num_eval),
        "test_compositional": self._generate_examples("test_compositional", config.num_eval),
    }

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config
    chunks = [(config.seed, split, start, min(start + _CHUNK, num_examples), config.resolution,
               config.max_objects, config.single_size)
              for start in range(0, num_examples, _CHUNK)]
    # Examples are independent (one RNG stream each), so rendering them in worker processes
    # gives the same bytes as rendering serially.
    workers = min(os.cpu_count() or 1, _MAX_WORKERS)
    if num_examples < _MIN_EXAMPLES_FOR_WORKERS:
      workers = 1
    for encoded in parallel.map_in_order(shapes.encode_examples, chunks, workers):
      yield from encoded


_CHUNK = 250
_MAX_WORKERS = 4
_MIN_EXAMPLES_FOR_WORKERS = 2000  # below this, starting workers costs more than it saves


def shapes_builder(data_dir: str, resolution: int, num_train: int, seed: int = 0,
                   max_objects: int = 3, single_size: str | None = None) -> Shapes:
  """The (possibly not yet prepared) builder for these settings."""
  name = config_name(resolution, num_train, max_objects, seed, single_size)
  return Shapes(config=name, data_dir=str(data_dir),
                file_format="array_record")


def prepare_shapes(data_dir: str, resolution: int = 32, num_train: int = 20_000, seed: int = 0,
                   max_objects: int = 3, log: Callable[[str], None] | None = None,
                   single_size: str | None = None) -> str:
  """Writes the dataset into `data_dir` unless already there; returns its name 'shapes/<config>'.

  Idempotent: a prepared config is left untouched. `log` (e.g. print), if given, gets one line
  before preparing, which then replaces TFDS's progress bars.
  """
  return prepare_builder(
      shapes_builder(data_dir, resolution, num_train, seed, max_objects, single_size),
      "shapes", data_dir, log)


def prepare_builder(builder, dataset: str, data_dir: str,
                    log: Callable[[str], None] | None = None) -> str:
  """Prepares a TFDS ``builder`` of ``dataset`` into ``data_dir`` unless it already is
  there; returns '<dataset>/<config>'. ``log`` gets one line first (no progress bars)."""
  name = f"{dataset}/{builder.builder_config.name}"
  if not builder.is_prepared():
    if log is not None:
      log(f"Preparing {name} in {data_dir} (once) ...")
      tfds.disable_progress_bar()
    os.makedirs(data_dir, exist_ok=True)
    builder.download_and_prepare()
  return name


def prepare_command(data_dir: str, config: str) -> str:
  """The shell command that prepares `config` into `data_dir` (used in error messages)."""
  return f"python -m diffusion_jax.data.shapes_tfds --data_dir={data_dir} --config={config}"


def main(argv=None):
  parser = argparse.ArgumentParser(description="Prepare the procedural shapes TFDS dataset.")
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--config", default="32px_20k",
                      help="<resolution>px_<num_train>[k][_max<1-3>][_small|_large][_seed<n>], "
                      "e.g. 32px_20k")
  args = parser.parse_args(argv)
  config = config_from_name(args.config)
  name = prepare_shapes(args.data_dir, config.resolution, config.num_train, config.seed,
                        config.max_objects, single_size=config.single_size)
  print(f"prepared {name} in {args.data_dir}")


if __name__ == "__main__":
  main()
