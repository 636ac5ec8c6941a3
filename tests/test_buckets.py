"""SDXL's aspect buckets (diffusion_jax/data/buckets.py): the bucket checks and draws, the
shapes scenes re-laid out per bucket, the bucketed pipeline, a bucketed stage through the
training loop (one shape per batch, the same bucket sequence after a resume) and sampling
at a bucket (its shape, its conditioning, one-line refusals)."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import training_helpers as th
from cli_helpers import one_error_line

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

from diffusion_jax import cascade, conditioning  # noqa: E402
from diffusion_jax.data import buckets, shapes, shapes_tfds  # noqa: E402
from diffusion_jax.data.pipeline import InputPipeline  # noqa: E402
from diffusion_jax.models import unet as unet_lib  # noqa: E402
from diffusion_jax.training import loop as loop_lib  # noqa: E402
from diffusion_jax.training import state as state_lib  # noqa: E402
from diffusion_jax.training import step as step_lib  # noqa: E402

BUCKETS = ((16, 16), (12, 20))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  shapes_tfds.prepare_shapes(data_dir, resolution=16, num_train=48, max_objects=3)
  return data_dir


def _pipeline(data_dir, **kwargs):
  args = dict(data_dir=data_dir, buckets=BUCKETS, global_batch_size=4, seed=0,
              process_index=0, process_count=1, num_threads=2)
  return buckets.BucketedShapesPipeline("shapes/16px_48", **{**args, **kwargs})


def test_bucket_checks_give_one_line_and_draws_follow_the_weights():
  assert buckets.check_buckets([[16, 16], (12, 20)], 16, 4) == BUCKETS
  for bad, message in [([(16, 16), (12, 18)], r"\(12, 18\): 18 does not divide by 4"),
                       ([(12, 20)], r"lack the square bucket \(16, 16\)"),
                       ([(16, 16), (16, 32)], r"\(16, 32\) has 512 pixels, 200%"),
                       ([(16, 16), (16, 16)], "listed twice"),
                       ([(16, 16), (12, 20, 3)], "not a \\(height, width\\) pair")]:
    with pytest.raises(ValueError, match=message):
      buckets.check_buckets(bad, 16, 4)
  with pytest.raises(ValueError, match="2 non-negative numbers"):
    buckets.bucket_probabilities([1.0, -1.0], 2)
  np.testing.assert_allclose(buckets.bucket_probabilities((), 4), [0.25] * 4)
  p = buckets.bucket_probabilities([3, 1], 2)
  draws = np.array([buckets.bucket_index(0, n, p) for n in range(4000)])
  # Bernoulli(1/4) over 4000 draws: std 0.0068, so +-0.03 is 4.4 sigma.
  assert abs(draws.mean() - 0.25) < 0.03
  again = [buckets.bucket_index(0, n, p) for n in range(50)]
  assert again == draws[:50].tolist()  # the key (seed, batch) alone decides
  assert again != [buckets.bucket_index(1, n, p) for n in range(50)]


def test_relayout_keeps_every_object_inside_and_the_caption_true():
  for height, width in ((12, 20), (20, 12), (16, 64)):
    extent = shapes.bucket_extent(height, width)
    for index in range(40):
      scene, caption, _ = shapes.make_example(0, "train", index, 8)
      moved = shapes.relayout(scene, extent, np.random.default_rng(index))
      assert shapes.parse_caption(caption) == moved.spec and moved.extent == extent
      circles = [(o.x, o.y, o.radius) for o in moved.objects]
      for x, y, r in circles:  # inside the frame, with the margin
        assert r + shapes.MARGIN - 1e-5 <= x <= extent[0] - r - shapes.MARGIN + 1e-5
        assert r + shapes.MARGIN - 1e-5 <= y <= extent[1] - r - shapes.MARGIN + 1e-5
      assert all(np.hypot(a[0] - b[0], a[1] - b[1]) >= a[2] + b[2] + 0.04 - 1e-4
                 for i, a in enumerate(circles) for b in circles[i + 1:])
      if scene.spec["relation"]:
        assert shapes._relation_holds(circles[0], circles[1], scene.spec["relation"], 0.04)
      assert shapes.Scene.from_json(moved.to_json()) == moved
      assert shapes.render(moved, (height, width)).shape == (height, width, 3)
  with pytest.raises(ValueError, match="relayout it"):
    shapes.render(scene, (12, 20))


def test_every_batch_is_one_bucket_and_a_restored_state_continues_the_sequence(data_dir):
  pipeline = _pipeline(data_dir)
  batches = [next(pipeline) for _ in range(8)]
  sizes = [b["image"].shape[1:3] for b in batches]
  assert sizes == [pipeline.bucket_of(n) for n in range(8)] and set(sizes) == set(BUCKETS)
  for batch, size in zip(batches, sizes, strict=True):
    np.testing.assert_array_equal(batch["target_size"], [size] * 4)
    for attributes, caption in zip(batch["attributes"], batch["caption"], strict=True):
      scene = shapes.Scene.from_json(attributes)
      assert scene.extent == shapes.bucket_extent(*size)
      assert shapes.parse_caption(caption) == scene.spec
  # The square bucket is the stored dataset itself (same shuffle, no relayout).
  stored = InputPipeline("shapes/16px_48", data_dir=data_dir, caption_key="caption",
                         resolution=16, global_batch_size=4, seed=0, process_index=0,
                         process_count=1, num_threads=2)
  for n, batch in enumerate(stored):
    if n == 8:
      break
    if sizes[n] == (16, 16):
      np.testing.assert_array_equal(batches[n]["image"], batch["image"])
  pipeline = _pipeline(data_dir)
  next(pipeline)
  state = json.loads(json.dumps(pipeline.get_state()))
  restored = _pipeline(data_dir)
  restored.set_state(state)
  for want in batches[1:5]:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(ValueError, match="different stream"):
    _pipeline(data_dir, weights=(1, 3)).set_state(state)
  rescaled = next(_pipeline(data_dir, crop="random_rescale", max_rescale=2.0))
  micro = rescaled["micro_cond"]  # (rendered height, width, top, left)
  h, w = rescaled["image"].shape[1:3]
  assert np.all(micro[:, 0] >= h) and np.all(micro[:, 1] >= w) and np.all(micro[:, 0] <= 2 * h)
  assert np.all(micro[:, 2] <= micro[:, 0] - h) and np.all(micro[:, 3] <= micro[:, 1] - w)


class _Recording:
  """The pipeline, noting each batch's (height, width)."""

  def __init__(self, inner, sizes):
    self.inner, self.sizes = inner, sizes

  def __next__(self):
    batch = next(self.inner)
    self.sizes.append(batch["image"].shape[1:3])
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _config(**fields):
  return dataclasses.replace(th.tiny_unet().config, **fields)


def test_a_bucketed_stage_trains_one_shape_per_step_and_resumes_the_sequence(data_dir,
                                                                             tmp_path):
  target = conditioning.TargetSize(BUCKETS)
  model = unet_lib.UNet(_config(**conditioning.unet_requirements((target,))))
  assert model.config.micro_cond_dim == 2

  def run(num_steps, sizes):
    return loop_lib.train(
        tmp_path, model=model,
        loop=loop_lib.LoopSettings(num_steps=num_steps, batch_size=4, resolution=16,
                                   log_every=1, checkpoint_every=2),
        step_settings=step_lib.StepSettings(step_lib.DiffusionSettings(conditions=(target,)),
                                            ema_decay=0.9),
        optimizer=state_lib.OptimizerSettings(learning_rate=1e-3, warmup_steps=1),
        data_factory=lambda: _Recording(_pipeline(data_dir), sizes),
        text_encoder=th.HashText(), log=lambda s: None)

  # Two steps, then a resumed run to four: the sequence an uninterrupted stream draws.
  sizes = []
  run(2, sizes)
  run(4, sizes)
  assert sizes == [_pipeline(data_dir).bucket_of(n) for n in range(4)]
  assert set(sizes) == set(BUCKETS)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A bucketed stage with random params (zero-initialised layers would hide the
  conditioning), exported with the offline T5 it reads: (directory, encoder)."""
  from diffusion_jax import text as text_lib

  encoder = text_lib.TextEncoder.from_pretrained("t5-offline", max_length=8)
  target = conditioning.TargetSize(BUCKETS)
  cfg = _config(text_width=encoder.width, **conditioning.unet_requirements((target,)))
  model = unet_lib.UNet(cfg)

  @jax.jit  # (one program: initialising op by op takes many times longer)
  def random_params(key):
    params = nn.unbox(model.init(key, **unet_lib.example_inputs(cfg, 1)))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves, strict=True)])

  spec = cascade.StageSpec(resolution=16, num_steps=2, guidance_scale=1.0)
  stage = cascade.Stage(model, random_params(jax.random.key(0)), spec,
                        conditioning=(target.to_json(),))
  directory = tmp_path_factory.mktemp("export") / "stage"
  cascade.export_stage(stage, directory, {"encoder": "t5-offline", "max_length": 8,
                                          "id": encoder.encoder_id})
  return directory, encoder


def test_sampling_at_a_bucket_gives_its_shape_and_its_size_conditions_the_network(exported):
  import sampling

  directory, encoder = exported
  prompts = ["red", "a star"]  # (within the 8 byte-level tokens)
  loaded, described, _ = sampling.prepare_cascade(stages=[str(directory)], height=12,
                                                  width=20)
  assert "--height=12" in sampling.regenerate_command([], [directory], 0, described)
  out = loaded.sample(prompts, jax.random.key(0))[0]
  assert out.shape == (2, 12, 20, 3)
  stage = loaded.stages[0]
  emb, mask = encoder.encode(prompts)
  null_emb, null_mask = encoder.encode([""])
  null = {"text_emb": jnp.asarray(null_emb[0]), "text_mask": jnp.asarray(null_mask[0])}
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), i))(
      jnp.arange(2, dtype=jnp.uint32))
  grid = stage.spec.grid()  # (numpy, built outside the trace)

  @jax.jit
  def sample(target):
    return cascade.sample_stage(
        stage.model, stage.params, jnp.asarray(emb), jnp.asarray(mask), null, keys,
        grid, image_shape=(12, 20, 3), parameterization="v",
        extra_cond={"micro_cond": jnp.broadcast_to(target, (2, 2))})

  # The bucket's size is its conditioning (crop (0, 0) has no values without micro=True).
  np.testing.assert_allclose(out, sample(jnp.asarray([12.0, 20.0])), atol=1e-5)
  assert float(jnp.abs(sample(jnp.asarray([16.0, 16.0])) - out).max()) > 1e-3
  transposed = cascade.replace_spec(stage, size=(20, 12))
  with pytest.raises(ValueError, match="20x12 is not one of the stage's aspect buckets"):
    cascade.Cascade([transposed], encoder)
  with pytest.raises(ValueError, match="trained on 16x16 images only"):
    cascade.Cascade([dataclasses.replace(stage, conditioning=())], encoder)


def test_bad_buckets_and_sizes_stop_with_one_line(exported, tmp_path):
  import builders
  import conditioning_builders
  import latent_builders

  from configs import demo_base

  config = demo_base.get_config("smoke")
  config.data.resolution = 16
  config.data.aspect_buckets = ((16, 16), (12, 20))
  assert conditioning_builders.conditions(config)[-1] == conditioning.TargetSize(BUCKETS)
  unet = latent_builders.stage_unet_config(config, builders.unet_config(config))
  assert unet.micro_cond_dim == 2  # the target size; 6 with conditioning.micro
  config.data.aspect_buckets = ((16, 16), (14, 18))
  with pytest.raises(builders.ConfigError, match=r"\(14, 18\): 14 does not divide by 4.*"
                     "3 levels halve it 2 times"):
    latent_builders.stage_unet_config(config, builders.unet_config(config))
  config.data.aspect_buckets, config.data.crop = BUCKETS, "random"
  with pytest.raises(builders.ConfigError, match="crop 'center' or 'random_rescale'"):
    conditioning_builders.conditions(config)
  # sample.py: a size that is not a bucket, before any param is read.
  r = subprocess.run([sys.executable, str(ROOT / "experiments" / "sample.py"),
                      f"--stages={exported[0]}", "--prompts=a star", "--height=20",
                      "--width=12", f"--outdir={tmp_path / 'out'}"],
                     capture_output=True, text=True, timeout=600, cwd=ROOT)
  line = one_error_line(r)
  assert "20x12 is not one of the stage's aspect buckets (16x16, 12x20)" in line, line
