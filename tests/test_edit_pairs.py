"""The shapes world's edit pairs differ exactly as their instructions say."""

import dataclasses

import numpy as np

from diffusion_jax.data import shapes
from diffusion_jax.editing import edit_pairs


def test_pairs_differ_exactly_as_the_instruction_says():
  seen = set()
  for index in range(60):
    pair = edit_pairs.make_edit_pair(0, index, 32)
    seen.add(pair.edit)
    words = pair.instruction.split()
    before, after = pair.before.objects, pair.after.objects
    target = after[pair.index]
    if pair.edit == "add":
      assert words[:1] == ["add"] and len(after) == len(before) + 1
      assert (target.color, target.shape) == (words[2], words[3])
      assert target.shape not in {o.shape for o in before}
      assert after[:-1] == before
    else:
      assert len(after) == len(before)
      source = before[pair.index]
      assert source.shape == target.shape == words[2]  # "make/move the <shape> ..."
      assert [o for i, o in enumerate(after) if i != pair.index] == [
          o for i, o in enumerate(before) if i != pair.index]
      if pair.edit == "recolor":
        assert words[0] == "make" and target.color == words[3] != source.color
        assert target.rgb == shapes.COLORS[words[3]]
        assert dataclasses.replace(target, color=source.color, rgb=source.rgb) == source
      else:
        direction = words[-1]
        assert words[0] == "move" and direction in ("left", "right")
        shift = target.x - source.x
        assert (shift <= -edit_pairs.MIN_SHIFT if direction == "left"
                else shift >= edit_pairs.MIN_SHIFT)
        assert dataclasses.replace(target, x=source.x) == source
    # Pixels: only the edited object's before / after windows change, and they do change.
    diff = np.any(pair.before_image != pair.after_image, axis=-1)
    region = edit_pairs.changed_region(pair, 32)
    assert diff.any() and not (diff & ~region).any(), pair.instruction
    np.testing.assert_array_equal(pair.after_image, shapes.render(pair.after, 32))
  assert seen == set(edit_pairs.EDITS)


def test_pairs_are_deterministic():
  a, b = edit_pairs.make_edit_pair(3, 7, 16), edit_pairs.make_edit_pair(3, 7, 16)
  assert a.instruction == b.instruction and a.after == b.after
  np.testing.assert_array_equal(a.after_image, b.after_image)
  assert edit_pairs.make_edit_pair(3, 8, 16).before != a.before
