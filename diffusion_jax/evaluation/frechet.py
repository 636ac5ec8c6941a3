"""Frechet distance between Gaussians fitted to features (FID, Heusel et al. 2017).

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

``tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the
symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (similar to S1 S2, so the same eigenvalues), in
float64 with eigen-decompositions only: no complex square roots to discard, no scipy.

A feature extractor is any function images [B, H, W, 3] -> features [B, D]. The default in
this project is the shapes probe's penultimate layer ("FD-probe",
``diffusion_jax.evaluation.probe.Probe.features``), computed on generated images and on real
validation images at the same resolution. ``FeatureStats`` accumulates mean and covariance
over batches (Chan et al.'s pairwise update, stable for large means).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^(1/2)) for symmetric PSD [D, D] matrices."""
  root1 = _sqrt_psd(np.asarray(sigma1, np.float64))
  inner = root1 @ np.asarray(sigma2, np.float64) @ root1
  values = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma
  [D, D]. Non-negative up to rounding (clipped at 0)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
                     f"{sigma2.shape}; need mu [D] and sigma [D, D] for the same D.")
  diff = mu1 - mu2
  distance = (diff @ diff + np.trace(sigma1) + np.trace(sigma2)
              - 2.0 * trace_sqrt_product(sigma1, sigma2))
  return max(float(distance), 0.0)


class FeatureStats:
  """Streaming mean and covariance of features: ``update(features [N, D])`` any number of
  times, then ``mean`` [D], ``cov`` [D, D] (unbiased, N - 1) and ``count``."""

  def __init__(self, dim: int | None = None):
    self.count = 0
    self._mean = None if dim is None else np.zeros(dim)
    self._m2 = None if dim is None else np.zeros((dim, dim))

  def update(self, features) -> FeatureStats:
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be [N, D], got shape {x.shape}.")
    if self._mean is None:
      self._mean, self._m2 = np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
    if x.shape[1] != self._mean.shape[0]:
      raise ValueError(f"features have dimension {x.shape[1]}, the statistics "
                       f"{self._mean.shape[0]}.")
    n = len(x)
    if n == 0:
      return self
    batch_mean = x.mean(0)
    centred = x - batch_mean
    delta = batch_mean - self._mean
    total = self.count + n
    self._m2 += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
    self._mean = self._mean + delta * (n / total)
    self.count = total
    return self

  @property
  def mean(self) -> np.ndarray:
    if not self.count:
      raise ValueError("FeatureStats has no features yet; call update() first.")
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.count}.")
    return self._m2 / (self.count - 1)

  def frechet_distance(self, other: FeatureStats) -> float:
    return frechet_distance(self.mean, self.cov, other.mean, other.cov)


def stats_of(extractor: Callable[[np.ndarray], np.ndarray], image_batches: Iterable) -> \
    FeatureStats:
  """FeatureStats of ``extractor`` over an iterable of image batches [B, H, W, 3]."""
  stats = FeatureStats()
  for batch in image_batches:
    stats.update(extractor(batch))
  return stats
