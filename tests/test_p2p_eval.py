"""edit.py p2p-eval's cases and scoring, on given readings."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))

import p2p_eval  # noqa: E402

from diffusion_jax.data import shapes  # noqa: E402
from diffusion_jax.evaluation.judge import Detection  # noqa: E402


def test_cases_swap_the_colour_of_a_seen_pair():
  triples = p2p_eval.cases(30, seed=1)
  assert triples == p2p_eval.cases(30, seed=1) and len(triples) == 30
  for a, b, shape in triples:
    assert a != b and a in shapes.COLORS and b in shapes.COLORS and shape in shapes.SHAPES
    assert (a, shape) not in shapes.HELD_OUT_PAIRS and (b, shape) not in shapes.HELD_OUT_PAIRS


def test_score_counts_colour_changed_and_layout_kept():
  triples = [("red", "blue", "circle")] * 4
  source = [[Detection("red", "circle", 0.3, 0.3, 0.1)]] * 4
  edited = [[Detection("blue", "circle", 0.32, 0.3, 0.1)],   # right
            [Detection("blue", "square", 0.3, 0.3, 0.1)],    # shape changed
            [Detection("blue", "circle", 0.6, 0.3, 0.1)],    # moved
            []]                                              # nothing read
  s = p2p_eval.score(triples, source, edited)
  assert [s[k]["correct"] for k in ("colour", "shape_kept", "position_kept", "all")] == [
      3, 2, 2, 1]
  # The most confident object is the one compared.
  two = [[Detection("red", "star", 0.3, 0.3, 0.1, score=0.2),
          Detection("blue", "circle", 0.3, 0.3, 0.1, score=0.9)]]
  assert p2p_eval.score(triples[:1], source[:1], two)["all"]["correct"] == 1
  assert "| a | 1.000 [" in p2p_eval.markdown({"a": p2p_eval.score(triples[:1], source[:1],
                                                                    edited[:1])})
