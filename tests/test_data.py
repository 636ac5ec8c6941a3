"""Shapes dataset (renderer, grammar, TFDS builder) and the TFDS + grain input pipeline."""

import collections
import functools
import itertools
import json
import sys
import textwrap

import local_cluster
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax.data import multihost, parallel, shapes, shapes_tfds
from diffusion_jax.data.pipeline import InputPipeline

NUM_TRAIN = 64  # + 16 validation + 16 test_compositional


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  name = shapes_tfds.prepare_shapes(str(data_dir), resolution=32, num_train=NUM_TRAIN, seed=0)
  assert name == "shapes/32px_64"
  return str(data_dir)


def _pipeline(data_dir, **kwargs):
  args = dict(data_dir=data_dir, split="train", caption_key="caption", resolution=32,
              global_batch_size=8, seed=0, process_index=0, process_count=1, num_threads=2)
  args.update(kwargs)
  return InputPipeline("shapes/32px_64", **args)


def _scenes(split, count, seed=0):
  return [shapes.sample_scene(shapes.example_rng(seed, split, i),
                              held_out=split == "test_compositional") for i in range(count)]


# ----------------------------------------------------------------------------------------------
# Renderer and grammar


def test_same_seed_same_examples():
  for index in range(20):
    scene_a, caption_a, image_a = shapes.make_example(3, "train", index, 32)
    scene_b, caption_b, image_b = shapes.make_example(3, "train", index, 32)
    assert scene_a == scene_b and caption_a == caption_b
    np.testing.assert_array_equal(image_a, image_b)
  captions = [shapes.make_example(seed, "train", 0, 32)[1] for seed in range(8)]
  assert len(set(captions)) > 1, "different seeds should give different examples"


@pytest.mark.parametrize("split", ["train", "validation"])
def test_held_out_pairs_never_in_train_or_validation(split):
  seen = set()
  for scene in _scenes(split, 3000):
    pairs = {(o.color, o.shape) for o in scene.objects}
    assert not pairs & shapes.HELD_OUT_PAIRS
    seen |= pairs
  # Everything else does occur, so each colour and shape is learnable.
  all_pairs = {(c, s) for c in shapes.COLORS for s in shapes.SHAPES}
  assert seen == all_pairs - shapes.HELD_OUT_PAIRS


def test_test_compositional_scenes_hold_a_held_out_pair():
  scenes = _scenes("test_compositional", 500)
  assert all(shapes.has_held_out_pair(s) for s in scenes)
  assert {(o.color, o.shape) for s in scenes for o in s.objects} >= shapes.HELD_OUT_PAIRS


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_captions_parse_back_to_their_spec(split):
  kinds = collections.Counter()
  for index in range(400):
    scene, caption, _ = shapes.make_example(0, split, index, 16)
    assert shapes.parse_caption(caption) == scene.spec, caption
    kinds[scene.spec["kind"]] += 1
    # The spec is true of the scene: same colour x shape multiset.
    objects = collections.Counter((o.color, o.shape) for o in scene.objects)
    groups = collections.Counter({(g["color"], g["shape"]): g["count"]
                                  for g in scene.spec["groups"]})
    assert objects == groups, caption
    assert 1 <= len(scene.objects) <= 3
  assert set(kinds) == set(shapes.KINDS)
  assert kinds["single"] > 150, "one-object scenes must dominate the default mix"


def test_parse_caption_examples_and_errors():
  assert shapes.parse_caption("There are two red crosses") == {
      "kind": "count", "relation": None, "position": None,
      "groups": [{"color": "red", "shape": "cross", "count": 2, "size": None}]}
  spec = shapes.parse_caption("a small blue star to the left of an orange circle")
  assert spec["relation"] == "left_of" and spec["groups"][0]["size"] == "small"
  assert shapes.parse_caption("a green square at the top")["position"] == "top"
  with pytest.raises(ValueError, match="cannot parse"):
    shapes.parse_caption("a dog on a skateboard")


def test_relations_hold_in_the_geometry():
  checked = 0
  for scene in _scenes("train", 600):
    if scene.spec["relation"] is None:
      continue
    a, b = scene.objects
    relation = scene.spec["relation"]
    assert {"left_of": a.x < b.x, "right_of": a.x > b.x, "above": a.y < b.y,
            "below": a.y > b.y}[relation]
    checked += 1
  assert checked > 50


def test_single_object_only_config():
  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng, max_objects=1) for _ in range(100)]
  assert all(len(s.objects) == 1 for s in scenes)


@pytest.mark.parametrize("high,low", [(64, 32), (32, 16), (256, 64)])
def test_rendering_is_resolution_independent(high, low):
  factor = high // low
  errors = []
  for scene in _scenes("train", 30):
    image_high = shapes.render(scene, high).astype(np.float32)
    pooled = image_high.reshape(low, factor, low, factor, 3).mean(axis=(1, 3))
    errors.append(np.abs(pooled - shapes.render(scene, low)).mean())
  # Mean error in [0, 255] units: small and only along edges.
  assert np.mean(errors) < 1.5 and np.max(errors) < 4.0, errors


def test_render_background_and_colours():
  scene, _, image = shapes.make_example(0, "train", 0, 32)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[0, 0], scene.background)  # corners stay background
  assert min(scene.background) > 220  # light background
  assert shapes.Scene.from_json(scene.to_json()) == scene


def test_parallel_preparation_matches_serial():
  tasks = [(0, "train", start, start + 3, 16, 3, None) for start in (0, 3, 6)]
  serial = [shapes.encode_examples(task) for task in tasks]
  assert list(parallel.ordered_map(shapes.encode_examples, tasks, num_workers=2)) == serial


# ----------------------------------------------------------------------------------------------
# TFDS builder


def test_config_names():
  assert shapes_tfds.config_name(32, 20_000) == "32px_20k"
  config = shapes_tfds.config_from_name("64px_500_max1_seed7")
  assert (config.resolution, config.num_train, config.max_objects, config.seed) == (64, 500, 1, 7)
  with pytest.raises(ValueError, match="does not match"):
    shapes_tfds.config_from_name("32px")
  config = shapes_tfds.config_from_name("32px_20k_max1_large")
  assert (config.max_objects, config.single_size, config.seed) == (1, "large", 0)
  assert shapes_tfds.config_name(32, 20_000, 1, 0, "large") == "32px_20k_max1_large"
  assert shapes_tfds.config_from_name("16px_64_small_seed2").single_size == "small"
  with pytest.raises(ValueError, match="single_size"):
    shapes_tfds.config_name(32, 20_000, single_size="huge")


def test_single_size_fixes_single_objects_only():
  """single_size sets the size of single-object scenes and nothing else: the same RNG draws,
  so captions that do not name a size, colours, shapes and other scene kinds are unchanged."""
  low, high = shapes.RADIUS_RANGES["large"]
  kinds = set()
  for index in range(200):
    free, free_caption, _ = shapes.make_example(0, "train", index, 32, max_objects=3)
    large, large_caption, _ = shapes.make_example(0, "train", index, 32, max_objects=3,
                                                  single_size="large")
    kinds.add(free.spec["kind"])
    assert [(o.color, o.shape) for o in large.objects] == [(o.color, o.shape)
                                                            for o in free.objects]
    if free.spec["kind"] != "single":
      assert large == free and large_caption == free_caption
      continue
    (obj,) = large.objects
    assert obj.size == "large" and low <= obj.radius <= high
    assert large.spec["groups"][0]["size"] in (None, "large")
    if free.objects[0].size == "large":
      assert large == free
  assert kinds == set(shapes.KINDS)
  with pytest.raises(ValueError, match="single_size"):
    shapes.sample_scene(np.random.default_rng(0), single_size="tiny")


def test_prepared_dataset(shapes_dir):
  sources = tfds.data_source("shapes/32px_64", data_dir=shapes_dir, download=False)
  assert {k: len(v) for k, v in sources.items()} == {
      "train": NUM_TRAIN, "validation": 16, "test_compositional": 16}
  example = sources["train"][0]
  assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
  attributes = json.loads(example["attributes"])
  assert shapes.parse_caption(example["caption"].decode()) == attributes["spec"]
  assert example["num_objects"] == len(attributes["objects"])
  for record in sources["train"]:
    assert not json.loads(record["attributes"])["held_out"]
  # Idempotent: a second call leaves the prepared data alone.
  assert shapes_tfds.prepare_shapes(shapes_dir, 32, NUM_TRAIN) == "shapes/32px_64"


def test_preparation_is_deterministic(shapes_dir, tmp_path):
  shapes_tfds.prepare_shapes(str(tmp_path), resolution=32, num_train=NUM_TRAIN, seed=0)
  first = tfds.data_source("shapes/32px_64", data_dir=shapes_dir, split="validation")
  second = tfds.data_source("shapes/32px_64", data_dir=str(tmp_path), split="validation")
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["caption"] == b["caption"] and a["attributes"] == b["attributes"]


# ----------------------------------------------------------------------------------------------
# Input pipeline


def test_batch_format(shapes_dir):
  pipeline = _pipeline(shapes_dir, lowres_resolution=16)
  batch = next(pipeline)
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["lowres"].shape == (8, 16, 16, 3) and batch["lowres"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["caption"].shape == (8,) and all(isinstance(c, str) for c in batch["caption"])
  assert batch["num_objects"].dtype == np.int32 and batch["kind"].shape == (8,)
  # lowres is the downsampled image: compare with a 2x2 average.
  pooled = batch["image"].reshape(8, 16, 2, 16, 2, 3).mean(axis=(2, 4))
  assert np.abs(pooled - batch["lowres"]).mean() < 0.05
  assert pipeline.steps_per_epoch == NUM_TRAIN // 8


def test_batches_carry_the_attributes_of_their_captions(shapes_dir):
  """Scoring generated images needs each prompt's structured attributes beside it."""
  batch = next(_pipeline(shapes_dir))  # default passthrough
  assert batch["attributes"].shape == (8,)
  for caption, attributes, num_objects in zip(batch["caption"], batch["attributes"],
                                              batch["num_objects"], strict=True):
    scene = shapes.Scene.from_json(attributes)
    assert shapes.parse_caption(caption) == scene.spec, caption
    assert len(scene.objects) == num_objects
  assert len(set(batch["attributes"])) == 8
  assert "attributes" not in next(_pipeline(shapes_dir, passthrough_keys=[]))


def test_random_crop_and_resize(shapes_dir):
  batch = next(_pipeline(shapes_dir, resolution=16, lowres_resolution=8, crop="random"))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["lowres"].shape == (8, 8, 8, 3)
  batch = next(_pipeline(shapes_dir, resolution=16, crop="center"))
  assert batch["image"].shape == (8, 16, 16, 3)


def test_random_rescale_crops_report_their_size_and_offsets(shapes_dir):
  from diffusion_jax.data.pipeline import resize_shorter_side, to_unit_range

  batch = next(_pipeline(shapes_dir, resolution=16, crop="random_rescale", max_rescale=2.0,
                         shuffle=False, passthrough_keys=["attributes"]))
  micro = batch["micro_cond"]
  assert micro.shape == (8, 4) and micro.dtype == np.float32
  assert np.all(micro[:, 0] == micro[:, 1])  # square images stay square
  assert np.all((micro[:, 0] >= 16) & (micro[:, 0] <= 32))
  assert np.all(micro[:, 2:] >= 0) and np.all(micro[:, 2:] <= micro[:, :2] - 16)
  assert len(set(micro[:, 0].tolist())) > 1  # the scale varies
  # Each crop is the rescaled image at the reported offsets.
  source = _pipeline(shapes_dir, resolution=32, shuffle=False)
  originals = next(source)["image"]
  for image, original, (h, _w, top, left) in zip(batch["image"], originals, micro, strict=True):
    pixels = ((original + 1) * 127.5).round().astype(np.uint8)
    rescaled = resize_shorter_side(pixels, int(h))
    crop = to_unit_range(rescaled[int(top):int(top) + 16, int(left):int(left) + 16])
    np.testing.assert_allclose(image, crop, atol=1e-6)
  with pytest.raises(ValueError, match="max_rescale"):
    _pipeline(shapes_dir, crop="random_rescale", max_rescale=0.5)


def test_restore_state_mid_epoch(shapes_dir):
  pipeline = _pipeline(shapes_dir, crop="random", resolution=24, lowres_resolution=12)
  for _ in range(3):
    next(pipeline)
  state = json.loads(json.dumps(pipeline.get_state()))  # survives a JSON round trip
  expected = [next(pipeline) for _ in range(9)]  # crosses the epoch boundary (8 steps/epoch)
  restored = _pipeline(shapes_dir, crop="random", resolution=24, lowres_resolution=12)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(ValueError, match="different stream"):
    _pipeline(shapes_dir, seed=1).set_state(state)


def test_epochs_are_reshuffled_and_complete(shapes_dir):
  pipeline = _pipeline(shapes_dir, passthrough_keys=["attributes"], num_epochs=2)
  epochs = [[a for _ in range(8) for a in next(pipeline)["attributes"]] for _ in range(2)]
  assert len(set(epochs[0])) == NUM_TRAIN and set(epochs[0]) == set(epochs[1])
  assert epochs[0] != epochs[1]
  with pytest.raises(StopIteration):
    next(pipeline)


def test_processes_read_disjoint_shards(shapes_dir):
  seen = []
  for index in range(2):
    pipeline = _pipeline(shapes_dir, global_batch_size=8, process_index=index, process_count=2,
                         passthrough_keys=["attributes"], num_epochs=1)
    batches = list(pipeline)
    assert all(b["image"].shape[0] == 4 for b in batches)
    seen.append({a for b in batches for a in b["attributes"]})
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == NUM_TRAIN


# What a prepared cifar10 reads from its source files; TFDS's mock knows only the indices.
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def _captions_and_labels(pipeline, num_batches=3):
  batches = list(itertools.islice(pipeline, num_batches))
  labels = np.concatenate([b["label"] for b in batches])
  assert len(set(labels)) > 1, "mock labels should vary, or a wrong mapping could pass"
  return [c for b in batches for c in b["caption"]], labels, batches[0]


def test_generic_tfds_dataset_with_label_template(tmp_path):
  """cifar10 through tfds.testing.mock_data: a label key + caption template, no TensorFlow."""
  args = dict(split="train", label_key="label", caption_template="a photo of a {label}",
              resolution=16, lowres_resolution=8, global_batch_size=4, process_index=0,
              process_count=1, num_threads=1)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    by_name = InputPipeline("cifar10", data_dir=str(tmp_path), **args)
    captions, labels, batch = _captions_and_labels(by_name)
    features = tfds.builder("cifar10", data_dir=str(tmp_path)).info.features
    assert captions == [f"a photo of a {features['label'].int2str(int(i))}" for i in labels]
    # With the real class names on the features, captions must use them, by index.
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    builder.info.features["label"].names = CIFAR10_NAMES
    named_captions, named_labels, _ = _captions_and_labels(InputPipeline(builder, **args))
  assert named_captions == [f"a photo of a {CIFAR10_NAMES[i]}" for i in named_labels]
  assert batch["image"].shape == (4, 16, 16, 3) and batch["lowres"].shape == (4, 8, 8, 3)
  assert batch["label"].shape == (4,) and "id" not in batch  # text features stay out


def test_bad_inputs(shapes_dir, tmp_path):
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset'"):
    InputPipeline("no_such_dataset", data_dir=shapes_dir, caption_key="caption", resolution=32,
                  global_batch_size=8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="data_dir is required"):
    _pipeline(None)
  with pytest.raises(FileNotFoundError, match="does not exist.*shapes_tfds --data_dir"):
    _pipeline(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="not prepared.*--config=32px_64"):
    _pipeline(str(tmp_path))
  with pytest.raises(ValueError, match="image_key='img' is not a feature.*attributes, caption"):
    _pipeline(shapes_dir, image_key="img")
  with pytest.raises(ValueError, match="caption_key='text' is not a feature"):
    _pipeline(shapes_dir, caption_key="text")
  with pytest.raises(ValueError, match="exactly one of caption_key"):
    _pipeline(shapes_dir, caption_key=None)
  with pytest.raises(ValueError, match="multiple of process_count 3"):
    _pipeline(shapes_dir, process_count=3)
  with pytest.raises(ValueError, match="Unknown split"):
    _pipeline(shapes_dir, split="test")


# ----------------------------------------------------------------------------------------------
# Preparation on many processes


def _prepare_on(process_index, events, barrier_result=True, fail=False):
  def prepare():
    events.append("prepare")
    if fail:
      raise OSError("disk full")
    return "shapes/32px_64"

  def barrier(ok):
    events.append(f"barrier({ok})")
    return barrier_result

  return multihost.prepare_once(prepare, process_index=process_index, process_count=2,
                                barrier=barrier)


def test_prepare_once_orders_process_0_before_the_others():
  events = []
  assert _prepare_on(0, events) == "shapes/32px_64" and events == ["prepare", "barrier(True)"]
  events = []
  assert _prepare_on(1, events) == "shapes/32px_64" and events == ["barrier(True)", "prepare"]
  # Process 0 fails: it releases the others with the news and raises its own error...
  events = []
  with pytest.raises(OSError, match="disk full"):
    _prepare_on(0, events, fail=True)
  assert events == ["prepare", "barrier(False)"]
  # ...and they stop without preparing.
  events = []
  with pytest.raises(RuntimeError, match="Process 0 failed to prepare"):
    _prepare_on(1, events, barrier_result=False)
  assert events == ["barrier(True)"]
  called = []
  assert multihost.prepare_once(lambda: called.append(1) or "x", process_index=0,
                                process_count=1, barrier=lambda ok: pytest.fail("no barrier"))
  assert called == [1]


def test_outcome_of_process_0_travels_through_the_coordination_service(monkeypatch):
  import jax
  from jax._src import distributed

  store = {}

  class Client:  # the two methods of jax.distributed's client that prepare_once uses
    def key_value_set(self, key, value, allow_overwrite=False):
      assert allow_overwrite or key not in store
      store[key] = value

    def blocking_key_value_get(self, key, timeout_in_ms):
      if key == "coordinator gone":  # what jax raises when the coordinator has exited
        raise jax.errors.JaxRuntimeError("UNAVAILABLE: failed to connect to all addresses")
      if key not in store:  # jax's message on a time-out
        raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with "
                                         f"key: {key} and duration: {timeout_in_ms}ms")
      return store[key]

  monkeypatch.setattr(distributed.global_state, "client", Client())
  share = functools.partial(multihost._share_outcome, timeout_s=0.5)
  assert share(True, is_source=True, key="a") and store == {"a": "ok"}
  assert share(True, is_source=True, key="a")  # a second preparation of the same data
  assert share(True, is_source=False, key="a")
  assert not share(False, is_source=True, key="b")
  assert not share(True, is_source=False, key="b")
  with pytest.raises(TimeoutError, match="process 0 to prepare the dataset after 0.5 s"):
    share(True, is_source=False, key="never written")
  # Another failure is not reported as a time-out, and its message names the exception.
  with pytest.raises(RuntimeError, match="failed before the 0.5 s time-out: JaxRuntimeError: "
                     "UNAVAILABLE: failed to connect") as info:
    share(True, is_source=False, key="coordinator gone")
  assert not isinstance(info.value, TimeoutError)


_PREPARE_WORKER = textwrap.dedent("""
    import json, sys, time
    from diffusion_jax import sharding
    from diffusion_jax.data import multihost, shapes_tfds
    port, process_id, data_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    assert sharding.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id)

    def prepare():
      found = shapes_tfds.shapes_builder(data_dir, 16, 16).is_prepared()
      if process_id == 0:
        time.sleep(2)  # without the wait, process 1 would look now and prepare too
      return shapes_tfds.prepare_shapes(data_dir, 16, 16, log=print), found

    name, found = multihost.prepare_once(prepare, key="shapes/16px_16")
    print(json.dumps({"name": name, "found_prepared": found}))
""")


def test_prepare_once_with_two_jax_processes(tmp_path):
  """Two real JAX processes on a shared data_dir: process 1 finds process 0's dataset."""
  port = local_cluster.free_port()
  outputs = local_cluster.run_together(
      [[sys.executable, "-c", _PREPARE_WORKER, str(port), str(i), str(tmp_path)]
       for i in range(2)], local_cluster.env(), timeout=240)
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert [r["name"] for r in results] == ["shapes/16px_16"] * 2
  assert [r["found_prepared"] for r in results] == [False, True]
  assert "Preparing shapes/16px_16" in outputs[0][0] and "Preparing" not in outputs[1][0]
