"""Stages -> ShapesEval samples -> probe verdicts + FD-probe (+ FID with Inception weights)
-> eval.json, eval.md and an
example grid: the body of experiments/evaluate.py, a plain function for the demo and the
ablation harness (``run_evaluation``), and the evaluator that training runs every
``config.eval.every`` steps (``training_evaluator``).

Every argument is checked before a checkpoint is read or anything compiles; bad input
raises builders.UserError with one line saying what to fix.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import builders
import guide_builders
import numpy as np
import sampling
from builders import UserError

# FD-probe's generated images use run indices from here, apart from the suite's.
FD_INDEX_OFFSET = 1_000_000


def _check(categories, images_per_prompt, fd_images, batch_size):
  from diffusion_jax.evaluation import shapes_eval

  try:
    shapes_eval.suite(categories)
  except ValueError as e:
    raise UserError(f"--categories: {e}") from None
  if images_per_prompt < 1:
    raise UserError(f"--images_per_prompt={images_per_prompt}; it must be >= 1 (images "
                    "sampled per prompt).")
  if fd_images < 0 or fd_images == 1:
    raise UserError(f"--fd_images={fd_images}; use 0 (no FD-probe) or at least 2.")
  if batch_size < 1:
    raise UserError(f"--batch_size={batch_size}; it must be >= 1.")


def _scene_settings(workdirs) -> tuple[int, str | None]:
  """Objects per scene (3 if unknown) and single-object size (None: either) of the base
  stage's training data, so FD-probe's real images are drawn as it was trained."""
  if not workdirs:
    return 3, None
  config = sampling.load_workdir_config(workdirs[0])
  return int(config.data.get("shapes_max_objects", 3)), builders.shapes_single_size(config)


def fd_captions(num: int, max_objects: int, single_size: str | None = None) -> list[str]:
  """The validation captions FD-probe samples (``fd_probe``; rendered at 8 px: cheap)."""
  from diffusion_jax.data import shapes

  return [shapes.make_example(0, "validation", i, 8, max_objects=max_objects,
                              single_size=single_size)[1] for i in range(num)]


def fd_probe(features, sample_fn, num: int, resolution: int, max_objects: int,
             batch_size: int, fid_features=None, single_size: str | None = None) -> dict:
  """Frechet distance of ``features`` (images [B, H, W, 3] uint8 -> [B, D]; FD-probe with
  the probe's) between ``num`` images generated from validation captions and the same
  validation scenes rendered at ``resolution``, and the floor: those real images against
  ``num`` other real validation images. ``fid_features``, if given (Inception-v3's), gives
  the same two distances on the same images under ``"fid"``. ``single_size``: the size of
  single objects in the stage's training data (``config.data.shapes_single_size``)."""
  from diffusion_jax.data import shapes
  from diffusion_jax.evaluation import frechet

  examples = [shapes.make_example(0, "validation", i, resolution, max_objects=max_objects,
                                  single_size=single_size) for i in range(2 * num)]
  captions = [caption for _, caption, _ in examples[:num]]
  real = np.stack([image for _, _, image in examples[:num]])
  other = np.stack([image for _, _, image in examples[num:]])
  generated = []
  for s in range(0, num, batch_size):
    chunk = captions[s:s + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
    generated.append(np.asarray(sample_fn(chunk, FD_INDEX_OFFSET + s)))
  generated = np.concatenate(generated)[:num]

  def distances(extract):
    stats = {name: frechet.FeatureStats().update(extract(images))
             for name, images in (("generated", generated), ("real", real), ("other", other))}
    return {"generated_vs_real": stats["generated"].frechet_distance(stats["real"]),
            "real_vs_real_floor": stats["other"].frechet_distance(stats["real"]),
            "num_images": num, "resolution": resolution,
            "feature_dim": stats["real"].mean.shape[0]}

  result = distances(features)
  if fid_features is not None:
    result["fid"] = distances(fid_features)
  return result


def load_fid_features(fid_weights, fd_images: int):
  """The Inception-v3 feature extractor of a weights file, or UserError (one line)."""
  from diffusion_jax.evaluation import inception

  if not fd_images:
    raise UserError(f"--fid_weights={fid_weights} needs --fd_images >= 2 (FID uses "
                    "FD-probe's images).")
  try:
    return inception.InceptionFeatures.load(fid_weights)
  except inception.WeightsError as e:
    raise UserError(f"--fid_weights: {e}") from None


def load_clip_scorer(path):
  """The CLIP of --clip_score_model (a CLIP directory: trained here by
  experiments/train_clip.py, or a Hugging Face CLIPModel), or UserError (one line)."""
  from diffusion_jax.models import clip as clip_lib

  try:
    return clip_lib.load(path)
  except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as e:
    raise UserError(f"--clip_score_model={path}: {e}") from None


def clip_score_of(clip, images_uint8: np.ndarray, prompts: list[str], model: str) -> dict:
  """CLIP score (100 x the cosine clipped at 0, averaged over image-prompt pairs, as
  evaluation.clip_score) of the scored images and their prompts, with a normal 95% interval
  of the mean over images."""
  from diffusion_jax.evaluation import clip_score

  per_image = clip_score.clip_scores(clip, images_uint8.astype(np.float32) / 127.5 - 1.0,
                                     prompts)
  half = 1.959964 * per_image.std(ddof=1) / np.sqrt(len(per_image)) if len(per_image) > 1 \
      else float("nan")
  value = float(per_image.mean())
  return {"value": value, "ci95": [value - half, value + half], "num_images": len(prompts),
          "model": str(model)}


def run_evaluation(*, outdir, workdirs=(), stages=(), categories=None, images_per_prompt=4,
                   batch_size=48, fd_images=200, probe=None, probe_dir=None,
                   probe_path=None, features=None, fid_weights=None, clip_score_model=None,
                   seed=0, log=print, **sampler_kwargs) -> dict:
  """Evaluates a cascade (training ``workdirs`` or exported ``stages``, base first) on
  ShapesEval and FD-probe; writes eval.json, eval.md and examples.png into ``outdir`` and
  returns eval.json's content. ``sampler_kwargs``: sample.py's flags (checkpoint_steps,
  sampler, steps, guidance_scale, threshold, percentile, aug_level). ``probe``: a loaded
  probe; ``probe_path``: a saved probe file; default: the cached one, trained on first use
  into ``probe_dir``. ``features``: the Frechet distance's feature extractor (images
  [B, H, W, 3] uint8 -> [B, D]); default the probe's (FD-probe). ``fid_weights``: an
  Inception-v3 weights file (``diffusion_jax.evaluation.inception``): FID on FD-probe's
  images too, under ``"fid"``; checked (and loaded) before anything is sampled.
  ``clip_score_model``: a CLIP directory: the CLIP score of the suite's images and prompts
  under ``"clip_score"`` (loaded before anything is sampled)."""
  import jax

  from diffusion_jax import images as images_lib
  from diffusion_jax.evaluation import probe as probe_lib
  from diffusion_jax.evaluation import probe_accuracy, shapes_eval

  categories = list(categories) if categories else list(shapes_eval.CATEGORIES)
  _check(categories, images_per_prompt, fd_images, batch_size)
  fid_net = load_fid_features(fid_weights, fd_images) if fid_weights else None
  clip = load_clip_scorer(clip_score_model) if clip_score_model else None
  cascade, described, text_meta = sampling.prepare_cascade(workdirs=workdirs, stages=stages,
                                                           **sampler_kwargs)
  max_objects, single_size = _scene_settings(list(workdirs or []))
  # Every prompt to be sampled, so a guide refuses one it cannot read before compiling.
  guide_builders.check_prompts(cascade.guides, [p.text for p in shapes_eval.suite(categories)],
                               " Choose those with --categories.")
  guide_builders.check_prompts(cascade.guides, fd_captions(fd_images, max_objects, single_size),
                               f" (an FD-probe caption of {max_objects}-object scenes: "
                               "--fd_images=0, or a stage trained on 1-object scenes)")
  if probe is None and probe_path:
    if not pathlib.Path(probe_path).exists():
      raise UserError(f"--probe_path {probe_path} does not exist; omit it to use (and on "
                      "first use train) the cached probe.")
    probe = probe_lib.load(probe_path)
  if probe is None:
    probe = probe_lib.load_or_train(cache_dir=probe_dir, log=log)
  start = time.time()
  accuracy = probe_accuracy.measure(probe)
  log(f"[eval] probe accuracy on real images: {probe_accuracy.summary(accuracy)}")
  key = jax.random.key(seed)

  def sample_fn(prompts, first_index):
    return images_lib.to_uint8(cascade.sample(prompts, key, first_index=first_index)[-1])

  records, images = shapes_eval.sample_suite(
      sample_fn, categories, images_per_prompt, batch_size, shapes_eval.Progress())
  shapes_eval.judge_records(records, probe.read(images))
  summary = shapes_eval.summarise(records)
  clip_result = (clip_score_of(clip, images, [r["prompt"] for r in records], clip_score_model)
                 if clip is not None else None)
  resolution = described[-1]["resolution"]
  fd = None
  if fd_images:
    log(f"[eval] FD-probe: {fd_images} images from validation captions ...")
    fd = fd_probe(features or probe.features, sample_fn, fd_images, resolution, max_objects,
                  batch_size, fid_features=fid_net and fid_net.features, single_size=single_size)
  fid = fd.pop("fid") if fd and fid_net else None
  if fid:
    fid.update(weights=str(fid_weights), input_size=fid_net.settings.input_size,
               width=fid_net.settings.width)
  result = {
      "summary": summary, "fd_probe": fd, "fid": fid, "clip_score": clip_result,
      "probe": {"settings": dataclasses.asdict(probe.settings), "accuracy_on_real": accuracy,
                "train_seconds": probe.info.get("train_seconds")},
      "config": {"workdirs": list(workdirs or []), "stages_dirs": list(stages or []),
                 "stages": described, "text_encoder": text_meta, "categories": categories,
                 "images_per_prompt": images_per_prompt, "seed": seed,
                 "batch_size": batch_size, "fd_images": fd_images,
                 "fid_weights": None if fid_weights is None else str(fid_weights),
                 "clip_score_model": None if clip_score_model is None else
                 str(clip_score_model),
                 "sampler_flags": {k: v for k, v in sampler_kwargs.items() if v is not None}},
      "seconds": round(time.time() - start, 1),
      "records": records,
  }
  out = pathlib.Path(outdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "eval.json").write_text(json.dumps(result, indent=2))
  md = [shapes_eval.markdown(summary), ""]
  if fd:
    md.append(f"FD-probe ({fd['num_images']} images, {resolution} px): "
              f"{fd['generated_vs_real']:.3f} (real vs real: {fd['real_vs_real_floor']:.3f})")
    md.append("")
  if fid:
    md.append(f"FID (Inception-v3 pool3, {fid['feature_dim']}-d, {fid['weights']}; "
              f"{fid['num_images']} images, {resolution} px resized to {fid['input_size']}): "
              f"{fid['generated_vs_real']:.3f} (real vs real: {fid['real_vs_real_floor']:.3f})")
    md.append("")
  if clip_result:
    low, high = clip_result["ci95"]
    md.append(f"CLIP score ({clip_result['num_images']} images, {clip_score_model}): "
              f"{clip_result['value']:.2f} [{low:.2f}, {high:.2f}]")
    md.append("")
  md += ["The probe on real images (its own accuracy):", "", probe_accuracy.markdown(accuracy)]
  (out / "eval.md").write_text("\n".join(md) + "\n")
  images_lib.save_png(shapes_eval.example_grid(records, images), out / "examples.png")
  log(shapes_eval.markdown(summary))
  log(f"[eval] wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'examples.png'}")
  return result


# ----------------------------------------------------------------------------------------------
# Inside training.


def training_evaluator(config, model_cfg, text_encoder, kind=None, log=print, probe=None):
  """An ``evaluator(state, step) -> {name: scalar}`` for the training loop (ShapesEval's
  ``config.eval.categories`` on the EMA params; for a stage trained on a labelled real-data set,
  its judge's class accuracy: evaluating_labelled.training_evaluator), or None when
  ``config.eval.every`` is 0 or the stage cannot be scored alone (a super-resolution stage needs
  its base stage; a jointly trained text encoder or several processes are not supported yet).
  ``kind``: the stage kind training uses (``diffusion_jax.stage_kinds``; default pixels), which
  decodes the samples. ``probe``: default the cached one (trained on first use)."""
  import jax

  from diffusion_jax import cascade as cascade_lib
  from diffusion_jax import images as images_lib
  from diffusion_jax import stage_kinds
  from diffusion_jax.evaluation import probe as probe_lib
  from diffusion_jax.evaluation import shapes_eval
  from diffusion_jax.models import unet as unet_lib

  e = config.eval
  if e.every < 0 or e.images_per_prompt < 1:
    raise UserError(f"config.eval: every={e.every} must be >= 0 (0: off) and "
                    f"images_per_prompt={e.images_per_prompt} >= 1.")
  if not e.every:
    return None
  kind = kind or stage_kinds.PIXEL
  why_not = ("a super-resolution stage" if model_cfg.super_resolution else
             "a trainable text encoder" if config.text.trainable else
             "several processes" if jax.process_count() > 1 else None)
  if why_not:
    log(f"[eval] config.eval.every={e.every} ignored: in-training ShapesEval does not "
        f"support {why_not}.")
    return None
  import evaluating_labelled

  labelled = evaluating_labelled.labelled_dataset(config)
  if not labelled:
    try:
      shapes_eval.suite(list(e.categories))
    except ValueError as err:
      raise UserError(f"config.eval.categories: {err}") from None
  # The stage as sampling will load it (schedule and its arguments, preconditioning, the
  # kind's defaults), with the eval section's steps and guidance.
  _, spec = sampling.workdir_stage_spec("the training run", config, None,
                                        num_steps=e.num_steps, guidance_scale=e.guidance_scale)
  model = unet_lib.UNet(model_cfg)
  import conditioning_builders  # (micro-conditioning and aspect buckets: sampling defaults)

  conditions = conditioning_builders.conditions(config, model_cfg.in_channels)
  stage = cascade_lib.Stage(model, None, spec, kind, tuple(c.to_json() for c in conditions))
  cascade = cascade_lib.Cascade([stage], text_encoder)
  if labelled:  # a real labelled set: its classifier judge instead of ShapesEval's probe
    return evaluating_labelled.training_evaluator(config, cascade, log=log)
  probe = probe or probe_lib.load_or_train(log=log)

  def evaluate(state, step):
    stage.params = state.ema_params  # the compiled sampler takes params as an argument
    key = jax.random.key(config.train.seed)
    records, images = shapes_eval.sample_suite(
        lambda prompts, first: images_lib.to_uint8(
            cascade.sample(prompts, key, first_index=first)[-1]),
        list(e.categories), e.images_per_prompt, batch_size=48)
    shapes_eval.judge_records(records, probe.read(images))
    summary = shapes_eval.summarise(records)
    out = {}
    for category, entry in summary["categories"].items():
      for split in ("all", "seen", "held_out"):
        if split in entry:
          out[f"eval/{category}/{split}"] = entry[split]["accuracy"]
    log(f"[eval] step {step}: " + ", ".join(shapes_eval.one_line(summary, c)
                                            for c in summary["categories"]))
    return out

  return evaluate
