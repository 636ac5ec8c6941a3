"""Frechet distance against closed forms and scipy's matrix square root; streaming feature
statistics against numpy's mean and covariance over all features at once."""

import numpy as np
import pytest
import scipy.linalg

from diffusion_jax.evaluation import frechet


def _random_cov(rng, dim, rank=None):
  a = rng.normal(size=(dim, rank or dim))
  return a @ a.T / dim + (0.0 if rank else 0.1 * np.eye(dim))


def test_identical_statistics_give_zero():
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=12), _random_cov(rng, 12)
  assert frechet.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_closed_form_for_diagonal_covariances():
  # Commuting covariances: tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
  # d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 0.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-10)


def test_closed_form_for_scaled_covariance():
  # S2 = c^2 S1: tr((S1 S2)^1/2) = c tr(S1), so d^2 = (1 - c)^2 tr(S1).
  rng = np.random.default_rng(1)
  sigma = _random_cov(rng, 10)
  got = frechet.frechet_distance(np.zeros(10), sigma, np.zeros(10), 9.0 * sigma)
  assert got == pytest.approx(4.0 * np.trace(sigma), rel=1e-9)


@pytest.mark.parametrize("rank", [None, 3])
def test_matches_scipy_sqrtm_and_is_symmetric(rank):
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  s1, s2 = _random_cov(rng, 16, rank), _random_cov(rng, 16)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  d12 = frechet.frechet_distance(mu1, s1, mu2, s2)
  assert d12 == pytest.approx(reference, rel=1e-6)
  assert frechet.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(d12, rel=1e-7)


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="shape mismatch"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_stats_match_numpy_over_uneven_batches():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1000, 7)) * 3 + 1e6  # a large mean: the naive sum of squares fails
  stats = frechet.FeatureStats()
  for start, stop in ((0, 1), (1, 300), (300, 300), (300, 999), (999, 1000)):
    stats.update(x[start:stop])
  assert stats.count == 1000
  np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-8)
  with pytest.raises(ValueError, match="at least 2"):
    _ = frechet.FeatureStats(7).update(x[:1]).cov
  with pytest.raises(ValueError, match="dimension 6"):
    stats.update(x[:5, :6])


def test_distance_of_sampled_gaussians_approaches_the_true_one():
  rng = np.random.default_rng(4)
  shift = np.array([1.0, -2.0, 0.5])
  a = frechet.FeatureStats().update(rng.normal(size=(20000, 3)))
  b = frechet.FeatureStats().update(rng.normal(size=(20000, 3)) * 2 + shift)
  # True value: |shift|^2 + 3 * (1 - 2)^2.
  assert a.frechet_distance(b) == pytest.approx(np.sum(shift ** 2) + 3.0, rel=0.03)
