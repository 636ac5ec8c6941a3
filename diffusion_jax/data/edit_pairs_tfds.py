"""TFDS builder of the shapes world's exact edit pairs (InstructPix2Pix training data;
``diffusion_jax.editing.edit_pairs`` makes them). array_record, no TensorFlow needed.

Config names ``{resolution}px_{num_train}`` with an optional ``_seed{n}``, e.g.
``shapes_edits/32px_20k`` or ``shapes_edits/16px_64_seed3`` (any such name is accepted).
Prepare from the command line (training configs prepare it on first use):

  python -m diffusion_jax.data.edit_pairs_tfds --data_dir=data --config=32px_20k

Each example: ``image`` uint8 [R, R, 3] (PNG): the scene *after* the edit (what the stage
learns to generate); ``input_image`` uint8 [R, R, 3]: the scene before it (the condition);
``caption``: the instruction ("make the circle red"); ``edit``: recolor / move / add
(a ClassLabel of ``edit_pairs.EDITS``); ``attributes``: the pair as JSON
(``edit_pairs.pair_to_json``).

Splits: ``train`` is pair indices [0, num_train) of the seed's stream, ``validation`` the
indices from ``edit_pairs.HELD_OUT_START`` on (every pair its own RNG stream, so the two
never share a draw): ``edit_pairs.held_out_pair(seed, i, R)`` for i < num_eval, stored (as
every split) in TFDS's own order.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import parallel, shapes_tfds
from diffusion_jax.editing import edit_pairs

NAME = "shapes_edits"
_NAME_RE = re.compile(r"^(?P<res>\d+)px_(?P<num>\d+)(?P<k>k?)(?:_seed(?P<seed>\d+))?$")


@dataclasses.dataclass(eq=False, kw_only=True)
class EditPairsConfig(tfds.core.BuilderConfig):
  """resolution: image side in px; num_train: train pairs; seed: the pair stream."""
  resolution: int = 32
  num_train: int = 20_000
  seed: int = 0

  @property
  def num_eval(self) -> int:
    return int(np.clip(self.num_train // 10, 16, 2000))


def config_name(resolution: int, num_train: int, seed: int = 0) -> str:
  """The canonical name, e.g. config_name(32, 20000) == '32px_20k'."""
  size = f"{num_train // 1000}k" if num_train % 1000 == 0 else str(num_train)
  return f"{resolution}px_{size}" + (f"_seed{seed}" if seed else "")


def config_from_name(name: str) -> EditPairsConfig:
  match = _NAME_RE.match(name)
  if match is None:
    raise ValueError(f"{NAME} config {name!r} does not match "
                     "'<resolution>px_<num_train>[k][_seed<n>]', e.g. '32px_20k'.")
  resolution = int(match["res"])
  num_train = int(match["num"]) * (1000 if match["k"] else 1)
  seed = int(match["seed"] or 0)
  if not 8 <= resolution <= 1024 or num_train < 1:
    raise ValueError(f"{NAME} config {name!r}: need 8 <= resolution <= 1024, num_train >= 1.")
  return EditPairsConfig(name=config_name(resolution, num_train, seed),
                         description=f"{resolution} px, {num_train} train pairs, seed {seed}",
                         resolution=resolution, num_train=num_train, seed=seed)


class ShapesEdits(tfds.core.GeneratorBasedBuilder):
  """Exact edit pairs of the shapes world; see ``diffusion_jax.editing.edit_pairs``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [config_from_name(n) for n in ("32px_20k", "16px_20k", "64px_20k")]
  DEFAULT_CONFIG_NAME = "32px_20k"

  @classmethod
  def get_builder_config(cls, name, version=None):
    config = super().get_builder_config(name, version)
    if config is None and _NAME_RE.match(name):
      config = config_from_name(name)
    return config

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.resolution
    image = lambda: tfds.features.Image(shape=(size, size, 3), encoding_format="png")  # noqa
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": image(), "input_image": image(), "caption": tfds.features.Text(),
            "edit": tfds.features.ClassLabel(names=edit_pairs.EDITS),
            "attributes": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    return {"train": self._generate_examples(0, config.num_train),
            "validation": self._generate_examples(edit_pairs.HELD_OUT_START, config.num_eval)}

  def _generate_examples(self, first: int, num: int):
    config = self.builder_config
    chunks = [(config.seed, first + s, first + min(s + _CHUNK, num), config.resolution)
              for s in range(0, num, _CHUNK)]
    workers = 1 if num < _MIN_FOR_WORKERS else min(os.cpu_count() or 1, _MAX_WORKERS)
    for encoded in parallel.map_in_order(edit_pairs.encode_pairs, chunks, workers):
      yield from encoded


_CHUNK = 250
_MAX_WORKERS = 4
_MIN_FOR_WORKERS = 2000  # below this, starting workers costs more than it saves


def builder(data_dir: str, resolution: int, num_train: int, seed: int = 0) -> ShapesEdits:
  """The (possibly not yet prepared) builder for these settings."""
  return ShapesEdits(config=config_name(resolution, num_train, seed), data_dir=str(data_dir),
                     file_format="array_record")


def prepare(data_dir: str, resolution: int = 32, num_train: int = 20_000, seed: int = 0,
            log: Callable[[str], None] | None = None) -> str:
  """Writes the dataset into ``data_dir`` unless already there; returns
  'shapes_edits/<config>'. ``log`` gets one line before preparing (no progress bars)."""
  return shapes_tfds.prepare_builder(builder(data_dir, resolution, num_train, seed), NAME,
                                     data_dir, log)


def prepare_command(data_dir: str, config: str) -> str:
  return f"python -m diffusion_jax.data.edit_pairs_tfds --data_dir={data_dir} --config={config}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=f"Prepare the {NAME} TFDS dataset.")
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--config", default="32px_20k",
                      help="<resolution>px_<num_train>[k][_seed<n>], e.g. 32px_20k")
  args = parser.parse_args(argv)
  config = config_from_name(args.config)
  name = prepare(args.data_dir, config.resolution, config.num_train, config.seed)
  print(f"prepared {name} in {args.data_dir}")


if __name__ == "__main__":
  main()
