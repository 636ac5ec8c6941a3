"""The shapes_edits TFDS set (data/edit_pairs_tfds.py) through the input pipeline: image is
the edited scene, input_image the original (cropped identically), caption the instruction;
the validation split is the held-out stream."""

import numpy as np
import pytest

from diffusion_jax.data import edit_pairs_tfds, pipeline
from diffusion_jax.editing import edit_pairs

RES, NUM = 16, 48


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("edits")
  assert edit_pairs_tfds.prepare(str(d), RES, NUM) == f"shapes_edits/{RES}px_{NUM}"
  return str(d)


def _pipeline(data_dir, **kwargs):
  args = dict(data_dir=data_dir, caption_key="caption", resolution=RES, global_batch_size=8,
              paired_image_keys=["input_image"], process_index=0, process_count=1,
              shuffle=False, num_epochs=1)
  return pipeline.InputPipeline(f"shapes_edits/{RES}px_{NUM}", **{**args, **kwargs})


def test_examples_are_the_pairs_and_differ_as_the_instruction_says(data_dir):
  batches = list(_pipeline(data_dir))
  assert sum(len(b["caption"]) for b in batches) == NUM
  # Every train pair is the generator's pair of an index in [0, NUM), each once (TFDS
  # stores them in its own order).
  stream = {edit_pairs.pair_to_json(edit_pairs.make_edit_pair(0, k, RES)) for k in range(NUM)}
  assert {a for b in batches for a in b["attributes"]} == stream
  seen = set()
  for batch in batches:
    for i, caption in enumerate(batch["caption"]):
      pair = edit_pairs.pair_from_json(batch["attributes"][i], RES)
      assert caption == pair.instruction and edit_pairs.EDITS[batch["edit"][i]] == pair.edit
      np.testing.assert_array_equal(batch["image"][i], pipeline.to_unit_range(pair.after_image))
      np.testing.assert_array_equal(batch["input_image"][i],
                                    pipeline.to_unit_range(pair.before_image))
      differs = np.any(batch["image"][i] != batch["input_image"][i], -1)
      region = edit_pairs.changed_region(pair, RES)
      assert differs.any() and not (differs & ~region).any(), caption
      seen.add(pair.edit)
  assert seen == set(edit_pairs.EDITS)


def test_validation_is_the_held_out_stream(data_dir):
  batches = list(_pipeline(data_dir, split="validation", drop_remainder=False))
  stored = [a for b in batches for a in b["attributes"]]
  num_eval = edit_pairs_tfds.config_from_name(f"{RES}px_{NUM}").num_eval
  held_out = [edit_pairs.held_out_pair(0, i, RES) for i in range(num_eval)]
  assert sorted(stored) == sorted(edit_pairs.pair_to_json(p) for p in held_out)
  train = {edit_pairs.pair_to_json(edit_pairs.make_edit_pair(0, k, RES)) for k in range(NUM)}
  assert not train & set(stored)


def test_random_crops_cut_both_images_at_one_window(data_dir):
  size = 12
  batch = next(iter(_pipeline(data_dir, resolution=size, crop="random", seed=3)))
  windows = set()
  for i in range(len(batch["caption"])):
    pair = edit_pairs.pair_from_json(batch["attributes"][i], RES)
    after, before = (pipeline.to_unit_range(x) for x in (pair.after_image, pair.before_image))
    found = [(t, left) for t in range(RES - size + 1) for left in range(RES - size + 1)
             if np.array_equal(after[t:t + size, left:left + size], batch["image"][i])
             and np.array_equal(before[t:t + size, left:left + size], batch["input_image"][i])]
    assert found, pair.instruction
    windows.add(found[0])
  assert len(windows) > 1  # the window is random, and shared by the two images


def test_bad_names_and_mismatched_keys_say_what_to_fix(data_dir):
  with pytest.raises(ValueError, match="does not match"):
    edit_pairs_tfds.config_from_name("32px")
  with pytest.raises(ValueError, match="paired_image_keys='mask' is not a feature"):
    _pipeline(data_dir, paired_image_keys=["mask"])


def test_random_rescale_resizes_and_crops_both_images_alike(data_dir):
  size = 12
  batch = next(iter(_pipeline(data_dir, resolution=size, crop="random_rescale",
                              max_rescale=2.0, seed=1)))
  for i in range(len(batch["caption"])):
    pair = edit_pairs.pair_from_json(batch["attributes"][i], RES)
    side, _, top, left = (int(v) for v in batch["micro_cond"][i])
    for key, image in (("image", pair.after_image), ("input_image", pair.before_image)):
      want = pipeline.resize_shorter_side(image, side)[top:top + size, left:left + size]
      np.testing.assert_array_equal(batch[key][i], pipeline.to_unit_range(want), key)
