"""Measurements the benchmark scripts share: median timings, the machine's matmul peak and
model FLOPs."""

from __future__ import annotations

import contextlib
import time

# (in the library: the ablation harness's equal-compute budgets count FLOPs too)
from diffusion_jax.training.flops import dense_attention, model_gflop  # noqa: F401


def matmul_peak_gflops(size: int = 2048, reps: int = 10) -> float:
  """Best-of-``reps`` GFLOP/s of a float32 [size, size] matmul under jit."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


def median_seconds(fn, calls: int) -> float:
  """Median wall seconds of ``fn()`` (its outputs waited for) over ``calls`` calls, after
  one warm-up call."""
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def override_fields(config, overrides: str):
  """``config`` (a frozen dataclass, e.g. a UNetConfig) with ``overrides`` applied.

  ``overrides``: comma-separated ``field=value`` (a leading ``model.`` is dropped, so the
  training config's names work: ``model.conv_impl=matmul,model.remat=true``). A value
  takes the type of the field's current value (bool: true/false; a None field: int,
  float or a string), or ``none`` where the field is optional. A field that does not
  exist raises ``cli.UserError``.
  """
  import dataclasses

  import cli
  fields = {f.name: f for f in dataclasses.fields(config)}
  names = set(fields)
  changes = {}
  for item in filter(None, (part.strip() for part in overrides.split(","))):
    name, sep, text = item.partition("=")
    name = name.strip().removeprefix("model.")
    if not sep or name not in names:
      raise cli.UserError(f"override {item!r}: use field=value with a field of "
                          f"{type(config).__name__} ({', '.join(sorted(names))})")
    current, text = getattr(config, name), text.strip()
    try:
      optional = "None" in str(fields[name].type)
      changes[name] = None if optional and text.lower() == "none" else _parse_value(text,
                                                                                    current)
    except ValueError:
      raise cli.UserError(f"override {item!r}: {text!r} is not a "
                          f"{type(current).__name__}") from None
  return dataclasses.replace(config, **changes)


def _parse_value(text: str, current):
  if isinstance(current, bool):
    if text.lower() not in ("true", "false"):
      raise ValueError(text)
    return text.lower() == "true"
  if isinstance(current, (int, float, str)):
    return type(current)(text)
  if current is None:
    if text.lower() == "none":
      return None
    for kind in (int, float):
      with contextlib.suppress(ValueError):
        return kind(text)
    return text
  raise ValueError(text)  # tuples (levels) are not overridable from the command line
