"""Shared test set-up: a persistent JAX compilation cache so re-runs skip XLA compiles."""

import os
import pathlib

import jax

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"

jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                              str(_CACHE)))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
