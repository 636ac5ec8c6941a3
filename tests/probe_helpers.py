"""A tiny shapes probe for tests: trained for a few steps once, then loaded from the probe
cache (.cache/probe, like the compilation cache), so test files share it."""

import functools

from diffusion_jax.evaluation import probe as probe_lib

TINY = probe_lib.ProbeSettings(width=8, num_steps=150, batch_size=32, num_scenes=600,
                               learning_rate=5e-3, decay_steps=150, clip_grad_norm=1.0)


@functools.cache
def tiny_probe():
  """(Probe, the file it is saved in)."""
  probe = probe_lib.load_or_train(TINY, log=None, measure=False)
  return probe, probe_lib.cache_path(TINY)
