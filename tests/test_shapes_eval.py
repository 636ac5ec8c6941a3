"""ShapesEval's suite (every prompt is a caption of the dataset's grammar), the judge on
controlled readings (a perfect reader of real scenes is right on every attribute;
recoloured, mirrored and swapped scenes fail exactly the attribute they break), Wilson
intervals, reproducible per-image indices and the reports. No network is trained here."""

import dataclasses
import math

import numpy as np
import pytest

from diffusion_jax.data import shapes
from diffusion_jax.evaluation import judge, probe_accuracy, shapes_eval


def test_suite_is_fixed_and_every_prompt_is_a_grammar_caption():
  prompts = shapes_eval.suite()
  assert shapes_eval.SUITE_VERSION == "shapes-eval-v1"
  counts = {c: sum(p.category == c for p in prompts) for c in shapes_eval.CATEGORIES}
  assert counts == {"colour_shape": 48, "counting": 12, "position": 10, "relation": 12,
                    "binding": 12}
  for p in prompts:
    assert shapes.parse_caption(p.text) == p.spec, p.text
  colour_shape = [p for p in prompts if p.category == "colour_shape"]
  assert len({p.text for p in colour_shape}) == 48
  held = {(p.spec["groups"][0]["color"], p.spec["groups"][0]["shape"])
          for p in colour_shape if p.held_out}
  assert held == shapes.HELD_OUT_PAIRS
  for p in prompts:
    if p.category == "binding":
      a, b = p.spec["groups"]
      assert a["color"] != b["color"] and a["shape"] != b["shape"]
    if p.category == "counting":
      assert p.spec["groups"][0]["count"] in (2, 3) and not p.held_out
  assert {p.spec["relation"] for p in prompts if p.category == "relation"} == set(
      shapes.RELATIONS)
  assert {p.spec["position"] for p in prompts if p.category == "position"} == set(
      shapes.POSITIONS)
  with pytest.raises(ValueError, match="unknown ShapesEval category 'colours'"):
    shapes_eval.suite(["colours"])


def _scenes(split, num):
  return [shapes.make_example(0, split, i, 8)[0] for i in range(num)]


@pytest.mark.parametrize("split", probe_accuracy.SPLITS)
def test_a_perfect_reader_of_real_scenes_is_right_on_every_attribute(split):
  scenes = _scenes(split, 400)
  acc = probe_accuracy.attribute_accuracy([judge.detections_of_scene(s) for s in scenes],
                                          [s.spec for s in scenes])
  assert set(acc) == set(judge.ATTRIBUTES)  # 400 scenes assert every attribute
  assert all(v == 1.0 for v in acc.values()), acc


def test_recoloured_objects_fail_colour_but_keep_shape():
  shift = {c: shapes_eval.COLORS[(i + 1) % 8] for i, c in enumerate(shapes_eval.COLORS)}
  for scene in _scenes("validation", 100):
    wrong = [dataclasses.replace(d, color=shift[d.color])
             for d in judge.detections_of_scene(scene)]
    verdict = judge.verify(scene.spec, wrong)
    assert verdict["shape"] and verdict["count"]
    assert not verdict["colour"] and not verdict["correct"]


def test_mirrored_relation_scenes_flip_the_relation_verdict():
  flipped = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
  scenes = [s for s in _scenes("validation", 400) if s.spec["relation"]]
  assert len(scenes) > 20
  for scene in scenes:
    horizontal = scene.spec["relation"] in ("left_of", "right_of")
    mirrored = [dataclasses.replace(d, x=1 - d.x) if horizontal else
                dataclasses.replace(d, y=1 - d.y) for d in judge.detections_of_scene(scene)]
    assert judge.verify(scene.spec, judge.detections_of_scene(scene))["relation"]
    assert not judge.verify(scene.spec, mirrored)["relation"]
    assert judge.verify({**scene.spec, "relation": flipped[scene.spec["relation"]]},
                        mirrored)["relation"]


def test_swapped_binding_keeps_colours_and_shapes_but_fails_objects():
  spec = shapes.parse_caption("a red circle and a blue square")
  swapped = [judge.Detection("blue", "circle", 0.3, 0.5, 0.15),
             judge.Detection("red", "square", 0.7, 0.5, 0.15)]
  verdict = judge.verify(spec, swapped)
  assert verdict["colour"] and verdict["shape"] and verdict["count"]
  assert not verdict["objects"] and not verdict["correct"]
  extra = [judge.Detection("red", "circle", 0.3, 0.5, 0.15), *swapped[:1]]
  assert not judge.verify(shapes.parse_caption("a red circle"), extra)["correct"]


def _wilson_by_bisection(k, n, z=1.959964):
  """The interval's ends as the roots of |k/n - p| = z sqrt(p (1 - p) / n), found
  numerically (not from the closed form under test)."""
  f = lambda p: (k / n - p) ** 2 - z * z * p * (1 - p) / n  # noqa: E731
  def root(lo, hi):
    for _ in range(200):
      mid = (lo + hi) / 2
      if (f(lo) > 0) == (f(mid) > 0):
        lo = mid
      else:
        hi = mid
    return (lo + hi) / 2
  p = k / n
  return (0.0 if k == 0 else root(0.0, p)), (1.0 if k == n else root(p, 1.0))


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (9, 10), (10, 10), (37, 48), (1, 6)])
def test_wilson_interval(k, n):
  low, high = shapes_eval.wilson_interval(k, n)
  ref_low, ref_high = _wilson_by_bisection(k, n)
  assert low == pytest.approx(ref_low, abs=1e-9) and high == pytest.approx(ref_high, abs=1e-9)
  assert shapes_eval.wilson_interval(0, 0) == (0.0, 1.0)
  assert shapes_eval.wilson_interval(0, 48)[0] == 0.0  # exactly, not a rounding error above
  assert shapes_eval.wilson_interval(48, 48)[1] == 1.0


def _fake_sampler(calls):
  """Image i of the run is a constant image whose value encodes i (mod 251)."""
  def sample(prompts, first_index):
    calls.append((list(prompts), first_index))
    idx = np.arange(first_index, first_index + len(prompts)) % 251
    return np.broadcast_to(idx[:, None, None, None], (len(prompts), 4, 4, 3)).astype(np.uint8)
  return sample


def test_each_image_has_a_fixed_index_whatever_is_evaluated():
  calls = []
  records, images = shapes_eval.sample_suite(_fake_sampler(calls), None, 2, batch_size=40)
  assert len(records) == 2 * shapes_eval.SUITE_SIZE
  assert len({len(p) for p, _ in calls}) == 1  # one batch size: one compiled sampler
  suite = shapes_eval.suite()
  by_key = {}
  for record, image in zip(records, images, strict=True):
    i, r = record["prompt_index"], record["replica"]
    assert record["image_index"] == r * shapes_eval.SUITE_SIZE + i
    assert image[0, 0, 0] == record["image_index"] % 251
    assert record["prompt"] == suite[i].text
    by_key[(i, r)] = image
  # The same (prompt, replica) is the same image when only some categories are evaluated.
  calls = []
  records, images = shapes_eval.sample_suite(_fake_sampler(calls), ["counting", "binding"], 3,
                                             batch_size=48)
  assert {r["category"] for r in records} == {"counting", "binding"}
  assert len(records) == 3 * 24
  assert max(len(p) for p, _ in calls) == 12  # never padded beyond the longest run
  for record, image in zip(records, images, strict=True):
    key = (record["prompt_index"], record["replica"])
    if key in by_key:
      np.testing.assert_array_equal(image, by_key[key])
    for prompts, first in calls:  # every prompt was sampled at its own index
      offset = record["image_index"] - first
      if 0 <= offset < len(prompts):
        assert prompts[offset] == record["prompt"]
  with pytest.raises(ValueError, match="images_per_prompt must be >= 1"):
    shapes_eval.sample_suite(_fake_sampler([]), None, 0)


def test_summary_markdown_and_grid():
  records, images = shapes_eval.sample_suite(_fake_sampler([]), ["colour_shape", "binding"], 1)
  suite = shapes_eval.suite()
  readings = []
  for r in records:  # a reader that gets every held-out prompt wrong, every other right
    spec = suite[r["prompt_index"]].spec
    readings.append([] if r["held_out"] else [
        judge.Detection(g["color"], g["shape"], 0.3 + 0.4 * k, 0.5, 0.15)
        for k, g in enumerate(spec["groups"])])
  shapes_eval.judge_records(records, readings)
  summary = shapes_eval.summarise(records)
  cs = summary["categories"]["colour_shape"]
  assert cs["seen"]["accuracy"] == 1.0 and cs["seen"]["n"] == 42
  assert cs["held_out"]["accuracy"] == 0.0 and cs["held_out"]["n"] == 6
  assert cs["all"]["correct"] == 42 and cs["all"]["ci95"] == list(
      shapes_eval.wilson_interval(42, 48))
  assert summary["overall"] == pytest.approx((42 / 48 + 10 / 12) / 2)
  table = shapes_eval.markdown(summary)
  assert "| colour_shape | held_out | 0 / 6 | 0.000 |" in table
  line = shapes_eval.one_line(summary)
  assert line.startswith("colour_shape: seen 1.00") and "held-out 0.00" in line
  grid = shapes_eval.example_grid(records, images, per_category=4)
  assert grid.dtype == np.uint8 and grid.ndim == 3
  assert not math.isnan(summary["all_images"]["accuracy"])
