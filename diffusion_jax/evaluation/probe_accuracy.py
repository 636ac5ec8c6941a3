"""The probe's own accuracy on real images: the dataset's ``validation`` and
``test_compositional`` scenes (seed 0, as ``shapes_tfds`` renders them), at 32 and 64 px.

Per attribute of ``judge.ATTRIBUTES``: the fraction of scenes (asserting that attribute)
whose caption spec the probe's reading satisfies. Every evaluation reports these numbers
beside its scores, so a score is only trusted as far as its judge is.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.data import shapes
from diffusion_jax.evaluation import judge

SPLITS = ("validation", "test_compositional")
# (resolution, scenes per split): 1000 scenes put a 98% accuracy's 95% interval within ~1%.
DEFAULT_PLAN = ((32, 1000), (64, 300))


def real_examples(split: str, num: int, resolution: int, max_objects: int = 3, seed: int = 0):
  """(uint8 images [N, R, R, 3], specs) of the dataset's first ``num`` examples of ``split``."""
  images, specs = [], []
  for i in range(num):
    scene, _, image = shapes.make_example(seed, split, i, resolution, max_objects=max_objects)
    images.append(image)
    specs.append(scene.spec)
  return np.stack(images), specs


def attribute_accuracy(readings, specs) -> dict[str, float]:
  """Fraction of specs satisfied, per attribute (over the specs that assert it)."""
  hits: dict[str, list[bool]] = {}
  for detections, spec in zip(readings, specs, strict=True):
    for name, ok in judge.verify(spec, detections).items():
      hits.setdefault(name, []).append(ok)
  return {name: float(np.mean(hits[name])) for name in judge.ATTRIBUTES if name in hits}


def measure(probe, plan=DEFAULT_PLAN, transform=None) -> dict:
  """{"<split>@<R>px": {attribute: accuracy, "num_images": N}} for every split and plan
  entry. ``transform``: uint8 images [N, R, R, 3] -> uint8 images of that shape, applied
  before the probe reads them (e.g. an autoencoder's reconstructions: what a latent
  stage can at best give the probe)."""
  out = {}
  for resolution, num in plan:
    for split in SPLITS:
      images, specs = real_examples(split, num, resolution)
      if transform is not None:
        images = transform(images)
      acc = attribute_accuracy(probe.read(images), specs)
      out[f"{split}@{resolution}px"] = {**acc, "num_images": num}
  return out


def minimum(accuracy: dict) -> float:
  """The lowest accuracy of any attribute in any entry."""
  return min(v for entry in accuracy.values() for k, v in entry.items() if k != "num_images")


def summary(accuracy: dict) -> str:
  """One line: the lowest attribute accuracy of each entry."""
  parts = []
  for name, entry in accuracy.items():
    worst = min((v, k) for k, v in entry.items() if k != "num_images")
    parts.append(f"{name} min {worst[0]:.3f} ({worst[1]})")
  return "; ".join(parts)


def markdown(accuracy: dict) -> str:
  """A table: one row per split@resolution, one column per attribute."""
  names = [a for a in judge.ATTRIBUTES if any(a in e for e in accuracy.values())]
  lines = ["| real images | n | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  for entry_name, entry in accuracy.items():
    cells = [f"{entry[a]:.3f}" if a in entry else "" for a in names]
    lines.append(f"| {entry_name} | {entry['num_images']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
