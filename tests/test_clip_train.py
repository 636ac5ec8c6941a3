"""CLIP contrastive training: the loss against a closed form computed in numpy, one train
step on tiny data, the zero-shot and CLIP-score evaluators, and (slow) the trained shapes
CLIP's zero-shot accuracy above a measured bar."""

import numpy as np
import pytest

from diffusion_jax.training import clip_train


def _numpy_infonce(image, text, log_scale):
  """Symmetric InfoNCE written out with float64 log-sum-exp, row by row."""
  scale = min(np.exp(log_scale), 100.0)
  logits = scale * image.astype(np.float64) @ text.T.astype(np.float64)
  total = 0.0
  for i in range(len(logits)):
    row, col = logits[i], logits[:, i]
    total += (np.log(np.exp(row - row.max()).sum()) + row.max() - row[i]) / 2
    total += (np.log(np.exp(col - col.max()).sum()) + col.max() - col[i]) / 2
  return total / len(logits), logits


@pytest.mark.parametrize("log_scale", [0.0, np.log(1 / 0.07), 6.0])  # 6 > log 100: capped
def test_contrastive_loss_matches_closed_form(log_scale):
  rng = np.random.default_rng(0)
  image, text = rng.standard_normal((2, 5, 3)).astype(np.float32)
  image /= np.linalg.norm(image, axis=1, keepdims=True)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  loss, logits = clip_train.contrastive_loss(image, text, np.float32(log_scale))
  expected, expected_logits = _numpy_infonce(image, text, log_scale)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_contrastive_loss_limits():
  # Perfectly aligned orthonormal pairs: the loss -> 0 as the temperature -> 0, and is
  # log B at temperature infinity (all logits equal).
  eye = np.eye(4, dtype=np.float32)
  assert float(clip_train.contrastive_loss(eye, eye, np.float32(np.log(100.0)))[0]) < 1e-6
  np.testing.assert_allclose(float(clip_train.contrastive_loss(eye, eye, np.float32(-50))[0]),
                             np.log(4), rtol=1e-5)
