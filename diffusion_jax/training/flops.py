"""Model FLOPs of a jitted computation, as the model defines them (for benchmarks' FLOP/s
and for the ablation harness's equal-compute budgets).

XLA's cost analysis counts the body of a loop once, whatever its trip count, so the
pairwise attention of long sequences (a loop over (image, head) pairs, see
``models.layers.attention``) would hide most of its FLOPs. ``model_gflop`` counts the
same computation with dense attention instead, from the unoptimised HLO (lowered, not
compiled), and so excludes the pairs' recomputation in the backward pass, as model-FLOP
utilisation does.

(jax is imported inside the functions: benchmark scripts import this before they set
XLA_FLAGS.)
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def dense_attention():
  """Makes every attention layer traced inside take the dense path.

  The threshold is read when a function is traced, and jit reuses the trace of a function
  it has already traced, so JAX's caches are cleared on the way in (a step compiled before
  would otherwise be counted with its pairwise loop) and on the way out (so nothing
  traced here is reused afterwards).
  """
  import jax

  from diffusion_jax.models import layers

  saved = layers.PAIRWISE_MIN_POSITIONS
  layers.PAIRWISE_MIN_POSITIONS = float("inf")
  jax.clear_caches()
  try:
    yield
  finally:
    layers.PAIRWISE_MIN_POSITIONS = saved
    jax.clear_caches()


def model_gflop(jitted, *args) -> float:
  """GFLOP of one call of ``jitted(*args)`` (arrays or jax.ShapeDtypeStruct: nothing runs)."""
  with dense_attention():
    cost = jitted.lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan"))) / 1e9
