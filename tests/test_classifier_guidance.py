"""Classifier guidance with a noise-aware attribute classifier.

Closed form: for data from an equal mixture of N(+M 1, S^2 I) and N(-M 1, S^2 I), the exact
unconditional denoiser guided at scale 1 by the exact log p(y | x_t) is the denoiser of
component y, so every sampler (composed with classifier-free guidance) draws from N(+-M,
S^2). Then the prompt -> labels parsing, the classifier (shapes, loss falling, save / load),
and one-line errors of the sampling flags.
"""

import functools
import json
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import one_error_line

from diffusion_jax.diffusion import classifier_guidance as cg
from diffusion_jax.diffusion import grids, guidance, samplers, schedules
from diffusion_jax.diffusion.schedules import alpha_sigma, broadcast_to_image
from diffusion_jax.models import attribute_classifier as ac_lib
from diffusion_jax.training import classifier_train

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT))  # for configs/

M, S, D = 1.0, 0.3, 2


def mixture_x0(x_t, logsnr):
  """E[x0 | x_t] of the equal mixture of N(+-M 1, S^2 I) in D dims: exact."""
  alpha, sigma = alpha_sigma(logsnr)
  a, s = broadcast_to_image(alpha, x_t), broadcast_to_image(sigma, x_t)
  var = a**2 * S**2 + s**2
  p_plus = jax.nn.sigmoid(jnp.sum(2 * a * M * x_t / var, axis=1, keepdims=True))
  mu = M * (2 * p_plus - 1)
  return mu + a * S**2 / var * (x_t - a * mu)


def component_logits(x_t, logsnr):
  """Exact logits of the component y (0: +M, 1: -M) given x_t: log N(x_t; +-a M, var)
  differ by 2 a M sum(x_t) / var, so [+half, -half] has that log-odds."""
  alpha, sigma = alpha_sigma(logsnr)
  a, s = alpha[:, None], sigma[:, None]
  half = jnp.sum(a * M * x_t / (a**2 * S**2 + s**2), axis=1)
  return {"component": jnp.stack([half, -half], axis=1)}


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_exact_classifier_at_scale_one_samples_the_class_component(sampler):
  n = 4000
  schedule = schedules.get("shifted_cosine", resolution=32, base_resolution=32)
  grid = grids.uniform_time(schedule, 50)
  labels = jnp.arange(n) % 2                       # rows alternate between the components
  target = jnp.where(labels == 0, M, -M)[:, None]
  # Classifier-free guidance underneath, of a "conditional" model that ignores its
  # condition (so CFG leaves it unchanged): the wrappers compose.
  cfg = guidance.classifier_free(lambda x, lam, c: mixture_x0(x, lam), {"c": jnp.ones((n,))},
                                 {"c": jnp.zeros(())}, 3.0)
  guided = cg.classifier_guided(cfg, component_logits, {"component": labels}, 1.0, "x0")
  x_T = samplers.initial_noise(jax.random.key(0), (n, D))
  run = functools.partial(samplers.sample, sampler, guided, parameterization="x0")
  x0 = np.asarray(jax.jit(run)(x_T, grid, jax.random.key(1)))
  residual = x0 - np.asarray(target)
  # 2000 draws per component: the mean's standard error is S / sqrt(2000) = 0.0067, so
  # 0.03 is 4.5 of them. The standard deviation: 50 steps of a first-order sampler
  # shrink it (measured: ddim / euler -0.015, ddpm -0.028, halving with twice the steps);
  # the second-order ones are within 0.003 (its own standard error is 0.005).
  for rows in (labels == 0, labels == 1):
    np.testing.assert_allclose(residual[np.asarray(rows)].mean(0), 0.0, atol=0.03)
    std_tol = 0.015 if sampler in ("dpmpp_2m", "heun") else 0.04
    np.testing.assert_allclose(x0[np.asarray(rows)].std(0), S, atol=std_tol)
  if sampler == "ddim":  # unguided, the same noise gives both components about equally
    plain = np.asarray(jax.jit(functools.partial(
        samplers.sample, sampler, mixture_x0, parameterization="x0"))(x_T, grid,
                                                                      jax.random.key(1)))
    assert 0.45 < np.mean(plain.mean(1) > 0) < 0.55


def test_guided_is_classifier_guidance_of_the_summed_log_softmax():
  x = jax.random.normal(jax.random.key(2), (3, D))
  logsnr = jnp.array([-1.0, 0.5, 2.0])

  def logits_fn(x_t, lam):  # two attributes
    return {"a": jnp.stack([x_t[:, 0], x_t[:, 1], x_t.sum(1)], 1) * lam[:, None],
            "b": jnp.stack([x_t[:, 0] ** 2, -x_t[:, 1]], 1)}

  labels = {"a": jnp.array([2, 0, 1]), "b": jnp.array([1, cg.UNSTATED, 0])}
  got = jax.jit(cg.classifier_guided(mixture_x0, logits_fn, labels, 2.0, "x0"))(x, logsnr)

  def log_p(x_t):
    la = jax.nn.log_softmax(logits_fn(x_t, logsnr)["a"])
    lb = jax.nn.log_softmax(logits_fn(x_t, logsnr)["b"])
    return (la[0, 2] + lb[0, 1]) + la[1, 0] + (la[2, 1] + lb[2, 0])  # row 1: b unstated
  alpha, sigma = alpha_sigma(logsnr)
  a, s = alpha[:, None], sigma[:, None]
  eps = (x - a * mixture_x0(x, logsnr)) / s - 2.0 * s * jax.jit(jax.grad(log_p))(x)
  np.testing.assert_allclose(got, (x - s * eps) / a, rtol=1e-4, atol=1e-5)
  assert cg.classifier_guided(mixture_x0, logits_fn, labels, 0.0, "x0") is mixture_x0


def test_composes_with_clip_guidance_as_the_sum_of_both_shifts():
  from diffusion_jax.diffusion import clip_guidance

  x = jax.random.normal(jax.random.key(4), (3, D))
  logsnr = jnp.array([-2.0, 0.0, 1.5])
  embed = lambda x_t, lam: x_t / jnp.linalg.norm(x_t, axis=1, keepdims=True)  # noqa: E731
  text_emb = jnp.array([0.6, 0.8])
  labels = {"component": jnp.array([0, 1, 0])}
  both = cg.classifier_guided(clip_guidance.clip_guided(mixture_x0, embed, text_emb, 3.0, "x0"),
                              component_logits, labels, 1.5, "x0")
  cos = clip_guidance.similarity_fn(embed, text_emb)
  log_p = cg.attribute_log_prob_fn(component_logits, labels)
  alpha, sigma = alpha_sigma(logsnr)
  a, s = alpha[:, None], sigma[:, None]
  grad = jax.jit(jax.grad(lambda v: jnp.sum(3.0 * cos(v, logsnr) + 1.5 * log_p(v, logsnr))))
  eps = (x - a * mixture_x0(x, logsnr)) / s - s * grad(x)
  np.testing.assert_allclose(jax.jit(both)(x, logsnr), (x - s * eps) / a, rtol=1e-4,
                             atol=1e-5)


def test_prompt_labels_of_shapes_captions():
  attrs = classifier_train.SHAPES_ATTRIBUTES
  got = cg.prompt_labels(["a red circle", "two blue squares",
                          "a picture of a green star on the left"], attrs)
  colours, shape_names, positions = (dict(attrs)[k] for k in ("colour", "shape", "position"))
  assert got["colour"].tolist() == [colours.index(c) for c in ("red", "blue", "green")]
  assert got["shape"].tolist() == [shape_names.index(s) for s in ("circle", "square", "star")]
  assert got["position"].tolist() == [cg.UNSTATED, cg.UNSTATED, positions.index("left")]
  for bad, message in (("a purple banana", "cannot read prompt"),
                       ("a red circle and a blue square", "names 2"),
                       ("a red circle left of a red square", "names 2")):
    with pytest.raises(ValueError, match=message) as info:
      cg.prompt_labels(["a red circle", bad], attrs)
    assert "\n" not in str(info.value)


TINY = classifier_train.ClassifierTrainSettings(
    resolution=8, width=8, levels=2, num_train=32, num_eval=16, batch_size=32, num_steps=30,
    warmup_steps=1, learning_rate=1e-2, schedule_kwargs=(("base_resolution", 8),
                                                         ("resolution", 8)),
    eval_times=(0.0, 0.5))


@pytest.fixture(scope="module")
def tiny_classifier():
  """TINY's classifier as ``train`` initialises it (its seed)."""
  return ac_lib.init(TINY.classifier_config(), seed=TINY.seed)


def test_classifier_shapes_its_loss_falls_and_accuracy_by_noise_level(tiny_classifier):
  classifier = tiny_classifier
  logits = jax.eval_shape(classifier.logits, jnp.zeros((5, 8, 8, 3)), jnp.zeros((5,)))
  assert {k: v.shape for k, v in logits.items()} == {"colour": (5, 8), "shape": (5, 6),
                                                     "position": (5, 5)}
  with pytest.raises(ValueError, match=r"reads \[B, 8, 8, 3\]"):
    jax.eval_shape(classifier.logits, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))
  # train() renders these same 32 images and draws batches of all 32: memorised, the
  # loss on one fixed draw of x_t at low noise must fall.
  images, labels = classifier_train.render_examples("train", 32, 8, count_fraction=0.3)
  assert images.shape == (32, 8, 8, 3) and labels.shape == (32, 3)
  assert (labels[:, :2] >= 0).all() and (labels[:, 2] == cg.UNSTATED).any()
  logsnr = TINY.make_schedule().logsnr(jnp.linspace(0.0, 0.4, 32))
  noise = np.random.default_rng(9).standard_normal(images.shape).astype(np.float32)
  x_t = schedules.q_sample(images, noise, logsnr)

  @jax.jit
  def held_loss(params):
    return classifier_train.classification_loss(classifier.logits(x_t, logsnr, params),
                                                labels, classifier.config.names)

  before = float(held_loss(classifier.params))
  trained, summary = classifier_train.train(TINY, log=lambda s: None)
  after = float(held_loss(trained.params))
  assert after < 0.8 * before, (before, after)  # (measured: 1.81 -> 1.19; chance 1.83)
  assert summary["steps"] == TINY.num_steps
  accuracy = classifier_train.accuracy_by_noise_level(trained, TINY)
  for split in ("validation", "held_out"):
    assert [level["t"] for level in accuracy[split]] == [0.0, 0.5]
    assert [level["clean"] for level in accuracy[split]] == [True, False]
    for level in accuracy[split]:
      assert level["colour_images"] == level["shape_images"] == 16
      assert all(0.0 <= level[n] <= 1.0 for n in ("colour", "shape"))


def test_config_is_the_settings_dataclass():
  import builders

  from configs import attribute_classifier_shapes as config_file
  assert builders.classifier_train_settings(config_file.get_config()) == \
      classifier_train.ClassifierTrainSettings()
  smoke = builders.classifier_train_settings(config_file.get_config("smoke"))
  assert smoke.resolution == 8 and dict(smoke.schedule_kwargs)["resolution"] == 8
  bad = config_file.get_config("smoke").unlock()
  bad.count_fraction = 1.0
  with pytest.raises(builders.UserError, match="count_fraction"):
    builders.classifier_train_settings(bad)
  with pytest.raises(ValueError, match="':smoke'"):
    config_file.get_config("tiny")


def test_save_load_round_trip_and_one_line_errors(tiny_classifier, tmp_path):
  classifier = tiny_classifier
  ac_lib.save(classifier, tmp_path / "classifier")
  loaded = ac_lib.load(tmp_path / "classifier")
  x, lam = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jnp.array([0.0, 3.0])
  logits = jax.jit(lambda params: classifier.logits(x, lam, params))
  for name, value in logits(classifier.params).items():
    np.testing.assert_allclose(logits(loaded.params)[name], value, rtol=1e-6)
  assert loaded.config == classifier.config
  clip_dir = tmp_path / "clip"
  clip_dir.mkdir()
  (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip"}))
  ac_lib.save(classifier, tmp_path / "wider")  # its JSON then claims another width
  meta = json.loads((tmp_path / "wider" / ac_lib.CONFIG_NAME).read_text())
  meta["config"]["width"] = 16
  (tmp_path / "wider" / ac_lib.CONFIG_NAME).write_text(json.dumps(meta))
  for where, error, message in ((tmp_path / "none", FileNotFoundError, "no attribute-"),
                                (clip_dir, ValueError, "holds a clip config.json"),
                                (tmp_path / "wider", ValueError, "architecture")):
    with pytest.raises(error, match=message) as info:
      ac_lib.load(where)
    assert "\n" not in str(info.value)


def test_guide_builders_refuse_bad_flags_in_one_line(tiny_classifier, tmp_path):
  import guide_builders
  from builders import UserError

  (tmp_path / "clip").mkdir()
  (tmp_path / "bad").mkdir()  # the right format, a config without its attributes
  (tmp_path / "bad" / ac_lib.CONFIG_NAME).write_text(json.dumps(
      {"format": ac_lib.FORMAT, "config": {"resolution": 16}}))
  (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
  for settings, message in (
      ({"classifier_guidance_scale": 2.0}, "needs --classifier_checkpoint"),
      ({"classifier_guidance_scale": -1.0, "classifier_checkpoint": "x"}, "must be >= 0"),
      ({"classifier_guidance_scale": float("nan"), "classifier_checkpoint": "x"},
       "must be >= 0 and finite"),
      ({"classifier_guidance_scale": 2.0, "classifier_checkpoint": str(tmp_path / "bad")},
       "malformed classifier config"),
      ({"classifier_guidance_scale": 2.0, "classifier_checkpoint": str(tmp_path / "none")},
       "no attribute-classifier directory"),
      ({"classifier_guidance_scale": 2.0, "classifier_checkpoint": str(tmp_path / "clip")},
       "not an attribute-classifier directory")):
    with pytest.raises(UserError, match=message):
      guide_builders.load_guides(settings)
  ac_lib.save(tiny_classifier, tmp_path / "classifier")
  guides = guide_builders.load_guides({"classifier_guidance_scale": 2.0,
                                       "classifier_checkpoint": str(tmp_path / "classifier")})
  # Guides read pixels: a latent base stage is refused in one line, before compiling.
  latent = types.SimpleNamespace(
      kind=types.SimpleNamespace(name="latent", sample_shape=lambda size, c: (4, 4, 4)),
      spec=types.SimpleNamespace(output_size=16),
      model=types.SimpleNamespace(config=types.SimpleNamespace(out_channels=3)))
  with pytest.raises(UserError, match="needs a pixel base stage"):
    guide_builders.check_stage(guides, latent, "runs/latent")
  with pytest.raises(UserError, match="names 2"):
    guide_builders.check_prompts(guides, ["a red circle", "a red circle and a blue star"])
  assert guide_builders.record({"classifier_guidance_scale": 2.0,
                                "classifier_checkpoint": "c"}) == {
      "clip_guidance": None, "classifier_guidance": {"scale": 2.0, "checkpoint": "c"}}


def test_a_sweep_axis_of_the_scale_is_checked_before_training():
  import evaluation_adapter
  from builders import UserError

  evaluator = evaluation_adapter.ShapesEvaluator({})
  evaluator.check({"classifier_guidance_scale": 2.0, "classifier_checkpoint": "c"}, 2, "arm")
  for overrides, message in (({"classifier_guidance_scale": 2.0}, "needs --classifier_"),
                             ({"classifier_guidance_scale": -2.0}, "must be >= 0")):
    with pytest.raises(UserError, match=f"arm: --classifier_guidance_scale.*{message}"):
      evaluator.check(overrides, 2, "arm")


def test_sample_flags_refuse_in_one_line_exit_2(tmp_path):
  (tmp_path / "clip").mkdir()
  (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
  r = subprocess.run([sys.executable, str(ROOT / "experiments" / "sample.py"),
                      "--prompts=a red circle", f"--outdir={tmp_path}",
                      f"--stages={tmp_path / 'none'}", "--classifier_guidance_scale=2",
                      f"--classifier_checkpoint={tmp_path / 'clip'}"],
                     capture_output=True, text=True, cwd=ROOT, timeout=300)
  line = one_error_line(r)
  assert f"--classifier_checkpoint={tmp_path / 'clip'}: " in line
  assert "not an attribute-classifier directory" in line


@pytest.mark.slow  # a U-Net trained two steps, then sample.py three times
def test_sample_py_guides_the_base_stage_and_records_it(tiny_classifier, tmp_path):
  import test_sample
  from PIL import Image

  from configs import demo_base
  base = test_sample._train(tmp_path / "base",
                            test_sample._tiny(demo_base.get_config("smoke"), 8))
  trained, _ = classifier_train.train(TINY, log=lambda s: None)
  checkpoint = ac_lib.save(trained, tmp_path / "classifier")
  common = [f"--workdirs={base}", "--prompts=a red circle", "--prompts=two blue squares",
            "--steps=3", "--sampler=ddim", "--guidance_scale=2", "--seed=1"]
  r = test_sample._sample(*common, f"--outdir={tmp_path / 'plain'}")
  assert r.returncode == 0, r.stderr[-3000:]
  r = test_sample._sample(*common, "--classifier_guidance_scale=30",
                          f"--classifier_checkpoint={checkpoint}",
                          f"--outdir={tmp_path / 'guided'}")
  assert r.returncode == 0, r.stderr[-3000:]
  record = json.loads((tmp_path / "guided" / "samples.json").read_text())
  assert record["classifier_guidance"] == {"scale": 30.0, "checkpoint": str(checkpoint)}
  assert record["clip_guidance"] is None
  assert (f"--classifier_guidance_scale=30.0 --classifier_checkpoint={checkpoint}"
          in record["regenerate"])
  plain, guided = (np.asarray(Image.open(tmp_path / d / "images" / "0000_8px.png"))
                   for d in ("plain", "guided"))
  assert plain.shape == guided.shape and np.abs(plain.astype(int) - guided).max() > 0
  # Refused in one line before sampling: a prompt of two kinds of object, a classifier
  # of another resolution than the base stage.
  r = test_sample._sample(common[0], "--prompts=a red circle and a blue star",
                          "--classifier_guidance_scale=3",
                          f"--classifier_checkpoint={checkpoint}",
                          f"--outdir={tmp_path / 'bad'}")
  assert "names 2" in one_error_line(r)
  wide = ac_lib.save(ac_lib.init(ac_lib.ClassifierConfig(
      classifier_train.SHAPES_ATTRIBUTES, resolution=16, width=8, levels=2)), tmp_path / "c16")
  r = test_sample._sample(common[0], "--prompts=a red circle", "--classifier_guidance_scale=3",
                          f"--classifier_checkpoint={wide}", f"--outdir={tmp_path / 'bad'}")
  assert "reads (16, 16, 3) images, the guided stage samples (8, 8, 3)" in one_error_line(r)


def test_train_classifier_refuses_a_bad_config_in_one_line(tmp_path):
  script = str(ROOT / "experiments" / "train_classifier.py")
  r = subprocess.run([sys.executable, script,
                      "--config=configs/attribute_classifier_shapes.py:smoke",
                      "--config.count_fraction=1.5", f"--workdir={tmp_path}"],
                     capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert "--config: count_fraction must lie in [0, 1)" in one_error_line(r)


@pytest.mark.slow  # the script end to end (~25 s)
def test_train_classifier_writes_a_loadable_classifier_and_eval(tmp_path):
  r = subprocess.run([sys.executable, str(ROOT / "experiments" / "train_classifier.py"),
                      "--config=configs/attribute_classifier_shapes.py:smoke",
                      f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=ROOT,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  classifier = ac_lib.load(tmp_path / "classifier")
  assert classifier.config.resolution == 8 and classifier.info["train"]["steps"] == 3
  result = json.loads((tmp_path / "eval.json").read_text())
  assert [level["t"] for level in result["accuracy"]["validation"]] == [0.0, 0.25, 0.5, 0.75,
                                                                        0.9]
  assert result["attributes"]["colour"][0] == "red"
