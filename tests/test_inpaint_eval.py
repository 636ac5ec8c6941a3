"""The probe-scored inpainting benchmark's cases and scoring, on exact answers."""

import dataclasses

import numpy as np

from diffusion_jax.data import shapes
from diffusion_jax.editing import inpaint_eval
from diffusion_jax.evaluation import judge


def _replaced_scene(case_index, case, resolution):
  scene, _, image = shapes.make_example(0, "validation", case_index, resolution, max_objects=1)
  np.testing.assert_array_equal(image, case.image)
  color, shape = case.target
  obj = dataclasses.replace(scene.objects[0], color=color, shape=shape,
                            rgb=shapes.COLORS[color])
  return dataclasses.replace(scene, objects=(obj,))


class _TruthProbe:
  def __init__(self, detections):
    self.detections = detections

  def read(self, images):
    assert len(images) == len(self.detections)
    return self.detections


def test_cases_mask_the_object_and_ask_for_another_one():
  cases = inpaint_eval.make_cases(24, 32, seed=0)
  assert len(cases) == 24
  assert [c.prompt for c in cases] == [c.prompt for c in inpaint_eval.make_cases(24, 32)]
  for c in cases:
    assert c.target[0] != c.original[0] and c.target[1] != c.original[1]
    assert c.target not in shapes.HELD_OUT_PAIRS
    assert c.generate.shape == (32, 32) and 0 < c.generate.mean() < 1
    assert c.prompt == f"a {c.target[0]} {c.target[1]}"


def test_an_exact_replacement_scores_one_and_the_unchanged_input_zero():
  res = 32
  cases = inpaint_eval.make_cases(12, res, seed=0)
  # make_cases takes single-object validation scenes in order (max_objects=1 makes them all).
  exact, exact_reads = [], []
  for i, case in enumerate(cases):
    scene = _replaced_scene(i, case, res)
    exact.append(shapes.render(scene, res))
    exact_reads.append(judge.detections_of_scene(scene))
  summary = inpaint_eval.score(cases, np.stack(exact), _TruthProbe(exact_reads))
  assert summary["both"]["correct"] == 12 and summary["colour_placed"]["correct"] == 12
  # The new object stays inside the mask: the kept pixels are the input's.
  assert summary["known_error"] < 1e-3
  originals = [judge.detections_of_scene(
      shapes.make_example(0, "validation", i, res, max_objects=1)[0]) for i in range(12)]
  unchanged = inpaint_eval.score(cases, np.stack([c.image for c in cases]),
                                 _TruthProbe(originals))
  assert unchanged["replaced"]["correct"] == 0 and unchanged["removed"]["correct"] == 0
  assert unchanged["known_error"] == 0.0
  # The right object outside the mask does not count as replaced.
  def outside(box):
    return (box[2] + 1.0) / 2 if box[2] < 0.95 else box[0] / 2

  moved = [[dataclasses.replace(d[0], x=outside(c.box))]
           for d, c in zip(exact_reads, cases, strict=True)]
  far = inpaint_eval.score(cases, np.stack(exact), _TruthProbe(moved))
  assert far["replaced"]["correct"] == 0 and far["removed"]["correct"] == 12
  assert far["colour_placed"]["correct"] == 0
  table = inpaint_eval.markdown({"exact": summary, "unchanged": unchanged})
  assert "| exact | 1.000" in table and "| unchanged | 0.000" in table
