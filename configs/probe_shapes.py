r"""The shapes probe (diffusion_jax.evaluation.probe): its network width and training.

  python experiments/train_probe.py --config=configs/probe_shapes.py

trains it once and caches it in .cache/probe (experiments/evaluate.py does the same on
first use). The fields and defaults are ``probe.ProbeSettings``'s, so this file and the
evaluation's default probe cannot drift apart; with changed fields the probe is cached under
another name and used with ``evaluate.py --probe_path``. ``:smoke`` trains a tiny probe
for a few steps (tests, laptops).
"""

import dataclasses

import ml_collections

from diffusion_jax.evaluation import probe


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/probe_shapes.py takes no argument or ':smoke', got {arg!r}.")
  c = ml_collections.ConfigDict(dataclasses.asdict(probe.ProbeSettings()))
  if arg == "smoke":
    c.width, c.num_steps, c.batch_size, c.num_scenes = 8, 20, 16, 200
  return c.lock()
