"""Probe-scored edits (evaluation/edit_score.py): exact pairs score 1, the identity edit
scores "edit made" 0 and "unchanged" 1; wrong edits are caught; the real probe agrees."""

import dataclasses

import numpy as np
import pytest

from diffusion_jax.editing import edit_pairs
from diffusion_jax.evaluation import edit_score, judge
from diffusion_jax.evaluation import probe as probe_lib

PAIRS = [edit_pairs.held_out_pair(0, i, 32) for i in range(120)]


def _truth(scene):
  return judge.detections_of_scene(scene)


def test_exact_pairs_score_one_and_the_identity_edit_zero():
  after = edit_score.summarise([edit_score.score_edit(p, _truth(p.after)) for p in PAIRS])
  same = edit_score.summarise([edit_score.score_edit(p, _truth(p.before)) for p in PAIRS])
  assert set(after) == {*edit_pairs.EDITS, "all"} and after["all"]["both"]["n"] == 120
  for edit in edit_pairs.EDITS:
    assert after[edit]["edit_made"]["accuracy"] == after[edit]["unchanged"]["accuracy"] == 1.0
    assert same[edit]["edit_made"]["accuracy"] == 0.0
    assert same[edit]["unchanged"]["accuracy"] == 1.0
  # Wilson intervals from shapes_eval.cell: exact bounds at 0 and n successes.
  assert after["all"]["both"]["ci95"][1] == 1.0 and same["all"]["both"]["ci95"][0] == 0.0
  assert 0.9 < after["all"]["both"]["ci95"][0] < 1.0


def _pair(edit, two_objects=True):
  return next(p for p in PAIRS if p.edit == edit and (len(p.before.objects) == 2) == two_objects)


def test_wrong_edits_are_caught():
  # Recolour: the other object recoloured instead, the named one kept.
  pair = _pair("recolor")
  other = 1 - pair.index
  wrong = list(_truth(pair.before))
  wrong[other] = dataclasses.replace(wrong[other], color=pair.after.objects[pair.index].color)
  got = edit_score.score_edit(pair, wrong)
  assert not got["unchanged"]
  if pair.before.objects[other].shape != pair.after.objects[pair.index].shape:
    assert not got["edit_made"]
  # Move: the object moved the wrong way (mirrored shift), or the other object moved too.
  pair = _pair("move")
  source, target = pair.before.objects[pair.index], pair.after.objects[pair.index]
  backwards = list(_truth(pair.before))
  backwards[pair.index] = dataclasses.replace(backwards[pair.index],
                                              x=source.x - (target.x - source.x))
  assert not edit_score.score_edit(pair, backwards)["edit_made"]
  both_moved = list(_truth(pair.after))
  k = 1 - pair.index
  both_moved[k] = dataclasses.replace(both_moved[k], x=both_moved[k].x + 0.15)
  got = edit_score.score_edit(pair, both_moved)
  assert got["edit_made"] and not got["unchanged"] and not got["both"]
  # Add: the new object plus a spurious extra one; or the new shape in the wrong colour.
  pair = _pair("add")
  extra = judge.Detection("black", "circle", 0.5, 0.5, 0.1)
  got = edit_score.score_edit(pair, _truth(pair.after) + [extra])
  assert got["edit_made"] and not got["unchanged"]
  new = pair.after.objects[pair.index]
  recoloured = [dataclasses.replace(d, color="red" if new.color != "red" else "blue")
                if i == pair.index else d for i, d in enumerate(_truth(pair.after))]
  assert not edit_score.score_edit(pair, recoloured)["edit_made"]
  # A kept object that moves more than the tolerance counts as changed.
  drifted = [dataclasses.replace(d, y=d.y + 2 * edit_score.POSITION_TOLERANCE)
             if i != pair.index else d for i, d in enumerate(_truth(pair.after))]
  assert not edit_score.score_edit(pair, drifted)["unchanged"]


def test_deleting_the_named_object_is_no_edit():
  pair = _pair("recolor")
  got = edit_score.score_edit(pair, [d for i, d in enumerate(_truth(pair.after))
                                     if i != pair.index])
  assert not got["edit_made"] and got["unchanged"]


def test_markdown_table_has_a_row_per_label_and_edit():
  summary = edit_score.summarise([edit_score.score_edit(p, _truth(p.after)) for p in PAIRS])
  table = edit_score.markdown({"exact": summary, "again": summary})
  rows = [line for line in table.splitlines() if line.startswith("| exact") or
          line.startswith("| again")]
  assert len(rows) == 8 and "| exact | all | 120 | 1.00 [0.97, 1.00]" in table


@pytest.mark.slow
def test_the_real_probe_scores_exact_pairs_and_the_identity_edit():
  probe = probe_lib.load_or_train(log=print)
  rows = edit_score.reference_rows(PAIRS, probe)
  print(edit_score.markdown(rows))
  exact, same = rows["exact edit"]["all"], rows["input returned"]["all"]
  assert exact["edit_made"]["accuracy"] >= 0.95 and exact["unchanged"]["accuracy"] >= 0.95
  assert same["edit_made"]["accuracy"] <= 0.05 and same["unchanged"]["accuracy"] >= 0.95
  assert np.isclose(exact["both"]["n"], len(PAIRS))
