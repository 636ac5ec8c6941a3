"""The classifier judge of the labelled real-data sets: accuracy by prompt, learning a task it
must learn, its on-disk cache, and its accuracy on real Fashion-MNIST where installed."""

import os

import numpy as np
import pytest
from test_real_data import write_sources

from diffusion_jax.data import labelled_sources as sources
from diffusion_jax.data import real_tfds
from diffusion_jax.evaluation import labelled


def test_accuracy_by_prompt():
  captions = ("a cat", "a dog", "a fox")
  prompts = ["a cat", "a cat", "a dog", "a fox", "a cat", "a dog"]
  predicted = [0, 2, 1, 1, 0, 1]
  assert labelled.accuracy_by_prompt(predicted, prompts, captions) == \
      {"a cat": 2 / 3, "a dog": 1.0, "a fox": 0.0}
  with pytest.raises(ValueError, match=r"\['a cow'\] are not class captions"):
    labelled.accuracy_by_prompt([0], ["a cow"], captions)
  with pytest.raises(ValueError, match="2 predictions for 1 prompts"):
    labelled.accuracy_by_prompt([0, 1], ["a cat"], captions)


def test_to_grey_accepts_uint8_and_unit_range_images():
  uint8 = np.full((2, 4, 4, 3), 255, np.uint8)
  uint8[1] = 0
  grey = labelled.to_grey(uint8)
  assert grey.shape == (2, 4, 4, 1) and grey.dtype == np.float32
  np.testing.assert_array_equal(grey[0], 1.0)
  np.testing.assert_array_equal(grey[1], -1.0)
  rgb = np.stack([np.full((4, 4), v) for v in (-1.0, 0.0, 0.5)], -1)[None]
  np.testing.assert_allclose(labelled.to_grey(rgb), -0.5 / 3)
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    labelled.to_grey(np.zeros((4, 4)))


def _quadrants(n, seed):
  """Class k = a bright 10x10 square in quadrant k of a noisy dark 32x32 image."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  images = rng.normal(-0.8, 0.1, (n, 32, 32, 3)).astype(np.float32)
  for i, k in enumerate(labels):
    top, left = 16 * (k // 2) + 3, 16 * (k % 2) + 3
    images[i, top:top + 10, left:left + 10] = 0.9
  return images, labels


def test_the_judge_learns_a_separable_task_and_exposes_features():
  images, labels = _quadrants(512, 0)
  params = labelled.train_classifier(images, labels, 4,
                                     labelled.ClassifierSettings(steps=60, batch_size=32))
  judge = labelled.LabelledJudge(params, ("top left", "top right", "bottom left",
                                          "bottom right"), batch_size=100)
  test, truth = _quadrants(256, 1)
  predicted = judge.predict(test)
  assert (predicted == truth).mean() > 0.95
  features = judge.features(test)
  assert features.shape == (256, labelled.FEATURE_DIM) and np.isfinite(features).all()
  prompts = [judge.captions[k] for k in truth]
  scores = labelled.accuracy_by_prompt(predicted, prompts, judge.captions)
  assert set(scores) == set(judge.captions) and min(scores.values()) > 0.9


def test_load_or_train_caches_outside_the_data(tmp_path):
  data_dir, cache = str(tmp_path / "data"), str(tmp_path / "judges")
  real_tfds.prepare("mnist5k/32px", data_dir, write_sources(tmp_path / "src"))
  settings = labelled.ClassifierSettings(steps=3, batch_size=8)
  lines = []
  first = labelled.load_or_train("mnist5k/32px", data_dir, cache, settings, log=lines.append)
  assert lines and len(os.listdir(cache)) == 1
  lines.clear()
  again = labelled.load_or_train("mnist5k/32px", data_dir, cache, settings, log=lines.append)
  assert not lines  # read from the cache, not trained again
  images, _, captions = labelled.read_split("mnist5k/32px", data_dir, "test")
  assert captions == sources.MNIST_CAPTIONS
  np.testing.assert_array_equal(first.logits(images), again.logits(images))
  with pytest.raises(ValueError, match="not a labelled real-data set"):
    labelled.read_split("noto_emoji/32px", data_dir, "test")
  with pytest.raises(FileNotFoundError, match="fashion_mnist_offline/32px is not prepared"):
    labelled.read_split("fashion_mnist_offline/32px", data_dir, "test")


@pytest.mark.slow  # trains on the real 60k images
@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR),
                    reason="needs dataset-fashion-mnist (apt-get install, or make data-real)")
def test_the_judge_recognises_real_fashion_mnist():
  train = sources.read_fashion_mnist(None, "train")
  test_images, test_labels = sources.read_fashion_mnist(None, "test")
  pad = lambda x: sources.pad_to(x, 32)[..., None]  # noqa: E731
  params = labelled.train_classifier(pad(train[0]), train[1], 10,
                                     labelled.ClassifierSettings(steps=SLOW_TEST_STEPS))
  judge = labelled.LabelledJudge(params, sources.FASHION_MNIST_CAPTIONS)
  accuracy = (judge.predict(pad(test_images[:2000])) == test_labels[:2000]).mean()
  assert accuracy > FASHION_MNIST_BAR, accuracy


# 400 steps reached 0.857 on these 2,000 test images (0.845 on all 10,000; seed 0, measured
# on a shared CPU); the full 1,500-step judge is better still (README "Real data").
SLOW_TEST_STEPS = 400
FASHION_MNIST_BAR = 0.80
