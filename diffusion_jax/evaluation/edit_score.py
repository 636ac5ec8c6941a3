"""Probe-scored instruction edits (InstructPix2Pix on the shapes world): for an exact edit
pair (``editing.edit_pairs.EditPair``) and the image a model made from its input and
instruction, the probe's reading says

- ``edit_made``: recolor -- an object of the named shape is read in the new colour; move --
  the named object (its colour and shape) is read with its x moved the instructed way by at
  least ``MOVE_MIN``; add -- an object of the new colour and shape is read;
- ``unchanged``: every object the instruction does not name is read with its colour and
  shape within ``POSITION_TOLERANCE`` of where it was, and no more objects are read than
  the edited scene has;
- ``both``: the two together (a correct edit).

Each detection matches at most one object (the ``unchanged`` check's first). Rates carry
Wilson 95% intervals (``shapes_eval.cell``). Returning the input unchanged scores
``edit_made`` 0 for every edit and ``unchanged`` 1; the exact edited image scores 1 on
both, up to the probe's reading errors (``reference_rows`` measures both baselines beside
a model's score).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffusion_jax.editing import edit_pairs
from diffusion_jax.evaluation import judge, shapes_eval

# Image widths: a kept object's read centre may lie this far from where it was (the probe's
# centres are within ~0.03 on clean renders; a move shifts x by >= edit_pairs.MIN_SHIFT).
POSITION_TOLERANCE = 0.08
MOVE_MIN = edit_pairs.MIN_SHIFT / 2
SCORES = ("edit_made", "unchanged", "both")


def _kept_objects(pair: edit_pairs.EditPair):
  """The before scene's objects the instruction does not name."""
  objects = pair.before.objects
  return list(objects) if pair.edit == "add" else [
      o for i, o in enumerate(objects) if i != pair.index]


def _match_kept(kept, detections) -> tuple[bool, list[judge.Detection]]:
  """(every kept object read in place with its colour and shape, the detections left over);
  each detection matches at most one object, nearest first."""
  left = list(detections)
  for obj in kept:
    near = [(np.hypot(d.x - obj.x, d.y - obj.y), j) for j, d in enumerate(left)
            if (d.color, d.shape) == (obj.color, obj.shape)]
    near = [(dist, j) for dist, j in near if dist <= POSITION_TOLERANCE]
    if not near:
      return False, left
    left.pop(min(near)[1])
  return True, left


def _edit_made(pair: edit_pairs.EditPair, left: Sequence[judge.Detection]) -> bool:
  target = pair.after.objects[pair.index]
  if pair.edit in ("recolor", "add"):
    return any((d.color, d.shape) == (target.color, target.shape) for d in left)
  source = pair.before.objects[pair.index]
  sign = 1.0 if target.x > source.x else -1.0  # the instructed direction
  return any((d.color, d.shape) == (source.color, source.shape)
             and sign * (d.x - source.x) >= MOVE_MIN for d in left)


def score_edit(pair: edit_pairs.EditPair, detections: Sequence[judge.Detection]) -> dict:
  """{"edit", "instruction", "edit_made", "unchanged", "both"} of one edited image, read
  as ``detections`` (``probe.read(images)[i]``, or ``judge.detections_of_scene``)."""
  kept_ok, left = _match_kept(_kept_objects(pair), detections)
  unchanged = kept_ok and len(detections) <= len(pair.after.objects)
  made = _edit_made(pair, left)
  return {"edit": pair.edit, "instruction": pair.instruction, "edit_made": bool(made),
          "unchanged": bool(unchanged), "both": bool(made and unchanged)}


def score_images(pairs: Sequence[edit_pairs.EditPair], images, probe) -> list[dict]:
  """Records of ``score_edit`` for edited images [N, H, W, 3] (uint8 or [-1, 1]) of
  ``pairs``, read by ``probe`` (``evaluation.probe.Probe``)."""
  if len(images) != len(pairs):
    raise ValueError(f"{len(images)} images for {len(pairs)} pairs.")
  readings = probe.read(images)
  records = [score_edit(p, d) for p, d in zip(pairs, readings, strict=True)]
  for record, detections in zip(records, readings, strict=True):
    record["read"] = judge.describe(detections)
  return records


def summarise(records: Sequence[dict]) -> dict:
  """{edit kind or "all": {score: shapes_eval.cell}}, rows in ``EDITS`` order."""
  out = {}
  for edit in (*edit_pairs.EDITS, "all"):
    mine = [r for r in records if edit in ("all", r["edit"])]
    if mine:
      out[edit] = {s: shapes_eval.cell([r[s] for r in mine]) for s in SCORES}
  return out


def _fmt(c: dict) -> str:
  return f"{c['accuracy']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"


def markdown(rows: dict[str, dict], title: str = "Instruction edits scored by the probe") -> str:
  """One table: a row per (images, edit kind) with each score and its 95% Wilson interval.
  ``rows``: {label (e.g. "model s_I=1.5 s_T=7.5", "exact edit", "input returned"):
  summarise(...)}."""
  lines = [title, "", "| images | edit | n | edit made | unchanged | both |",
           "|---|---|---|---|---|---|"]
  for label, summary in rows.items():
    for edit, cells in summary.items():
      lines.append(f"| {label} | {edit} | {cells['both']['n']} | {_fmt(cells['edit_made'])} | "
                   f"{_fmt(cells['unchanged'])} | {_fmt(cells['both'])} |")
  return "\n".join(lines)


def reference_rows(pairs: Sequence[edit_pairs.EditPair], probe) -> dict[str, dict]:
  """The two baselines every model score is read against: the exact edited images (the
  probe's ceiling) and the input images returned unchanged (what doing nothing scores)."""
  after = np.stack([p.after_image for p in pairs])
  before = np.stack([p.before_image for p in pairs])
  return {"exact edit": summarise(score_images(pairs, after, probe)),
          "input returned": summarise(score_images(pairs, before, probe))}
