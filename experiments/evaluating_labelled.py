"""Stages trained on a labelled real-data set (Fashion-MNIST, MNIST 5k, Noto emoji) -> class
accuracy of their samples by the set's classifier judge + FD in the judge's feature space
against the real test split -> eval.json, eval.md and an example grid; and the in-training
evaluator of such a stage. What ``evaluating.py`` is for ShapesEval, for these sets (it hands
over to this module when the base stage's dataset is one of them).

The judge (``diffusion_jax.evaluation.labelled``) is trained on the set's real train split,
once, and cached (``$DIFFUSION_JAX_JUDGE_DIR`` or ``.cache/judges``). The prompts are:
- Fashion-MNIST / MNIST 5k: every class caption ("a photo of a sneaker"), category
  ``class``; all classes are trained on, so there is no held-out split.
- Emoji: emoji captions ("red apple, food and drink") scored by whether the image shows an
  emoji of the caption's Unicode group (category ``emoji_group``): ``held_out`` prompts
  from the test split (emoji never trained on), ``seen`` ones from the train split, at most
  ``max_prompts`` of each (every k-th, so the choice is fixed).

FD: ``fd_images`` images generated from the captions of as many real test images, against
those images, and the floor (other real test images against them), in the judge's
penultimate features (``fd_judge`` in eval.json; a generated image larger than the judge's
resolution is area-averaged down to it).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
import sampling
from builders import UserError

# The generated images of the FD use run indices from here, apart from the scored ones'.
FD_INDEX_OFFSET = 1_000_000


def labelled_dataset(config) -> str | None:
  """The labelled real-data set a stage's config trains on, else None (shapes)."""
  from diffusion_jax.data import real_tfds

  dataset = str(config.data.dataset)
  return dataset if real_tfds.is_real_dataset(dataset) else None


def dataset_of_workdirs(workdirs) -> tuple[str | None, str | None]:
  """(labelled dataset, data_dir) of the base stage's training workdir, or (None, None)."""
  if not workdirs:
    return None, None
  try:
    config = sampling.load_workdir_config(workdirs[0])
  except UserError:  # (reported where ShapesEval's arguments have been checked first)
    return None, None
  dataset = labelled_dataset(config)
  return dataset, (str(config.data.data_dir) if dataset else None)


def check_flags(dataset: str, **shapes_only) -> None:
  """Refuses ShapesEval's flags for a labelled set (they would be silently ignored, or, as
  classifier guidance's shapes attribute classifier, could not read its prompts)."""
  given = sorted(name for name, value in shapes_only.items() if value)
  if given:
    raise UserError(f"--{given[0]} is a ShapesEval setting; the stages trained on {dataset}, "
                    "which is scored by its classifier judge: drop it.")


def category_of(dataset: str) -> str:
  return "emoji_group" if dataset.startswith("noto_emoji") else "class"


def judge_dir(cache_dir=None) -> str:
  root = pathlib.Path(__file__).resolve().parent.parent
  return str(cache_dir or os.environ.get("DIFFUSION_JAX_JUDGE_DIR") or root / ".cache" / "judges")


# The judge's training steps when none are given (None: labelled.ClassifierSettings').
JUDGE_STEPS = None


def load_judge(dataset: str, data_dir: str, cache_dir=None, steps: int | None = None, log=print):
  """The cached judge of ``dataset`` (trained on first use); UserError if the data is not
  prepared."""
  from diffusion_jax.evaluation import labelled

  steps = JUDGE_STEPS if steps is None else steps
  if steps is not None and steps < 1:
    raise UserError(f"--judge_steps={steps}; it must be >= 1.")
  settings = labelled.ClassifierSettings(**({} if steps is None else {"steps": steps}))
  try:
    return labelled.load_or_train(dataset, data_dir, judge_dir(cache_dir), settings, log=log)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"the {dataset} judge: {e}") from None


def _every_kth(items: list[str], limit: int | None) -> list[str]:
  if not limit or len(items) <= limit:
    return items
  return items[::-(-len(items) // limit)][:limit]


def scored_prompts(dataset: str, data_dir: str, judge, max_prompts: int | None = None
                   ) -> list[tuple[str, bool]]:
  """[(prompt, held_out)]: the class captions, or for emoji up to ``max_prompts`` seen
  (train split) and held-out (test split) emoji captions, in a fixed order."""
  from diffusion_jax.evaluation import labelled

  if category_of(dataset) == "class":
    return [(caption, False) for caption in judge.captions]
  out = []
  for split, held in (("train", False), ("test", True)):
    prompts = sorted(set(labelled.read_examples(dataset, data_dir, split)[2]))
    out += [(p, held) for p in _every_kth(prompts, max_prompts)]
  return out


def sample_prompts(sample_fn, prompts: list[str], images_per_prompt: int, batch_size: int,
                   first_index: int = 0, log=None) -> np.ndarray:
  """uint8 images [len(prompts) * images_per_prompt, H, W, C], replica-major (image
  r * len(prompts) + i is replica r of prompt i, run index first_index + that). Every call
  passes ``batch_size`` prompts (padded with the last one), so one compiled sampler serves."""
  texts = [p for _ in range(images_per_prompt) for p in prompts]
  batch_size = min(batch_size, len(texts))
  out = []
  for s in range(0, len(texts), batch_size):
    chunk = texts[s:s + batch_size]
    images = np.asarray(sample_fn(chunk + [chunk[-1]] * (batch_size - len(chunk)),
                                  first_index + s))
    out.append(images[:len(chunk)])
    if log is not None:
      log(f"[eval] sampled {s + len(chunk)}/{len(texts)}")
  return np.concatenate(out)


def score(judge, prompts: list[tuple[str, bool]], images: np.ndarray, category: str
          ) -> tuple[list, dict]:
  """(records, summary) of images sampled by ``sample_prompts`` for ``prompts``: each
  image's class as the judge reads it against the class its prompt asks for; the summary in
  evaluating.py's layout ({"categories": {category: {"all", "seen"?, "held_out"?,
  "per_prompt"}}, "overall"}), each cell {correct, n, accuracy, ci95 (Wilson)}."""
  from diffusion_jax.evaluation import shapes_eval

  predicted = judge.predict(images)
  records = []
  for j, label in enumerate(predicted):
    prompt, held = prompts[j % len(prompts)]
    want = judge.class_of(prompt)
    records.append({"prompt": prompt, "held_out": held, "replica": j // len(prompts),
                    "wanted": judge.captions[want], "read": judge.captions[int(label)],
                    "correct": bool(int(label) == want)})

  cell = shapes_eval.cell
  entry = {"all": cell([r["correct"] for r in records])}
  for name, held in (("seen", False), ("held_out", True)):
    part = [r["correct"] for r in records if r["held_out"] == held]
    if part and any(r["held_out"] for r in records):
      entry[name] = cell(part)
  if len(prompts) <= 50:  # the class sets: one row per class
    entry["per_prompt"] = {p: cell([r["correct"] for r in records if r["prompt"] == p])
                           for p, _ in prompts}
  return records, {"categories": {category: entry}, "overall": entry["all"]["accuracy"]}


def check_fd_images(num: int, dataset: str, test_size: int) -> None:
  if test_size < 2 * num:
    raise UserError(f"--fd_images={num}: the {dataset} test split has {test_size} images, "
                    f"the FD needs 2 x {num}; use --fd_images <= {test_size // 2}.")


def fd_judge(judge, sample_fn, test: tuple, num: int, batch_size: int) -> dict:
  """Frechet distance in the judge's features between ``num`` images generated from the
  captions of real test images (``test``: read_examples' triple) and those images, and the
  real-vs-real floor (as many other test images against them)."""
  from diffusion_jax.evaluation import frechet

  images, _, prompts = test
  # Every other image, so the two halves hold the same mix of classes.
  real, other = images[0:2 * num:2], images[1:2 * num:2]
  generated = sample_prompts(sample_fn, list(prompts[0:2 * num:2]), 1, batch_size,
                             FD_INDEX_OFFSET)
  stats = {name: frechet.FeatureStats().update(judge.features(x))
           for name, x in (("generated", generated), ("real", real), ("other", other))}
  return {"generated_vs_real": stats["generated"].frechet_distance(stats["real"]),
          "real_vs_real_floor": stats["other"].frechet_distance(stats["real"]),
          "num_images": num, "feature_dim": int(stats["real"].mean.shape[0]),
          "judge_resolution": int(judge.resolution)}


def markdown(summary: dict, dataset: str, fd: dict | None, judge_accuracy: float) -> str:
  (category, entry), = summary["categories"].items()
  lines = [f"{dataset}: the judge's reading of the samples ({category})", "",
           "| split | right | images | accuracy | 95% CI |", "|---|---|---|---|---|"]
  for split in ("all", "seen", "held_out"):
    if split in entry:
      c = entry[split]
      lines.append(f"| {split} | {c['correct']} | {c['n']} | {c['accuracy']:.3f} | "
                   f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] |")
  if "per_prompt" in entry:
    lines += ["", "| prompt | right / images |", "|---|---|"]
    lines += [f"| {p} | {c['correct']}/{c['n']} |" for p, c in entry["per_prompt"].items()]
  lines += ["", f"The judge's own accuracy on the real test split: {judge_accuracy:.3f}."]
  if fd:
    lines.append(f"FD in the judge's features ({fd['num_images']} images, "
                 f"{fd['judge_resolution']} px): {fd['generated_vs_real']:.3f} (real vs real: "
                 f"{fd['real_vs_real_floor']:.3f}).")
  return "\n".join(lines) + "\n"


def judge_accuracy(judge, test: tuple) -> float:
  """The judge's accuracy on the real test split (what its readings are worth)."""
  images, labels, _ = test
  return float((judge.predict(images) == labels).mean())


def run_labelled_evaluation(*, outdir, workdirs=(), stages=(), dataset: str, data_dir: str,
                            images_per_prompt=4, batch_size=48, fd_images=200,
                            max_prompts: int | None = 96, judge=None, judge_cache_dir=None,
                            judge_steps: int | None = None, seed=0, log=print,
                            **sampler_kwargs) -> dict:
  """Scores a cascade of stages trained on ``dataset`` (see the module docstring); writes
  eval.json, eval.md and examples.png into ``outdir`` and returns eval.json's content."""
  import jax

  from diffusion_jax import images as images_lib

  if images_per_prompt < 1:
    raise UserError(f"--images_per_prompt={images_per_prompt}; it must be >= 1.")
  if fd_images < 0 or fd_images == 1:
    raise UserError(f"--fd_images={fd_images}; use 0 (no FD) or at least 2.")
  if batch_size < 1:
    raise UserError(f"--batch_size={batch_size}; it must be >= 1.")
  from diffusion_jax.evaluation import labelled

  if max_prompts is not None and max_prompts < 1:
    raise UserError(f"--max_prompts={max_prompts}; it must be >= 1.")
  cascade, described, text_meta = sampling.prepare_cascade(workdirs=workdirs, stages=stages,
                                                           **sampler_kwargs)
  judge = judge or load_judge(dataset, data_dir, judge_cache_dir, judge_steps, log)
  test = labelled.read_examples(dataset, data_dir, "test")
  check_fd_images(fd_images, dataset, len(test[0]))
  prompts = scored_prompts(dataset, data_dir, judge, max_prompts)
  start = time.time()
  own_accuracy = judge_accuracy(judge, test)
  log(f"[eval] the {dataset} judge on the real test split: {own_accuracy:.3f}")
  key = jax.random.key(seed)

  def sample_fn(texts, first_index):
    return images_lib.to_uint8(cascade.sample(texts, key, first_index=first_index)[-1])

  images = sample_prompts(sample_fn, [p for p, _ in prompts], images_per_prompt, batch_size,
                          log=log)
  records, summary = score(judge, prompts, images, category_of(dataset))
  fd = None
  if fd_images:
    log(f"[eval] FD in the judge's features: {fd_images} images from test captions ...")
    fd = fd_judge(judge, sample_fn, test, fd_images, batch_size)
  result = {
      "summary": summary, "fd_judge": fd,
      "judge": {"dataset": dataset, "accuracy_on_real_test": own_accuracy,
                "classes": list(judge.captions)},
      "config": {"workdirs": list(workdirs or []), "stages_dirs": list(stages or []),
                 "stages": described, "text_encoder": text_meta, "dataset": dataset,
                 "images_per_prompt": images_per_prompt, "max_prompts": max_prompts,
                 "seed": seed, "batch_size": batch_size, "fd_images": fd_images,
                 "sampler_flags": {k: v for k, v in sampler_kwargs.items() if v is not None}},
      "seconds": round(time.time() - start, 1),
      "records": records,
  }
  out = pathlib.Path(outdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "eval.json").write_text(json.dumps(result, indent=2))
  text = markdown(summary, dataset, fd, own_accuracy)
  (out / "eval.md").write_text(text)
  images_lib.save_png(example_grid(images, records), out / "examples.png")
  log(text)
  log(f"[eval] wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'examples.png'}")
  return result


def _short(text: str, common: list[str]) -> str:
  words = text.split(" ")
  return " ".join(words[len(common):]) or text


def example_grid(images: np.ndarray, records: list[dict], count: int = 32) -> np.ndarray:
  """The first ``count`` images, each captioned with its prompt and, when the judge read
  another class, "NO, read: <class>" (the words every class caption shares dropped:
  "a photo of a t-shirt" -> "a t-shirt")."""
  from diffusion_jax import images as images_lib

  classes = sorted({r["wanted"] for r in records} | {r["read"] for r in records})
  common = []
  for words in zip(*(c.split(" ") for c in classes), strict=False):
    if len(set(words)) > 1:
      break
    common.append(words[0])
  shown = list(range(min(len(records), count)))
  captions = []
  for i in shown:
    r = records[i]
    prompt = _short(r["prompt"], common) if r["prompt"] in classes else r["prompt"]
    captions.append(prompt if r["correct"] else f"{prompt}; NO, read: {_short(r['read'], common)}")
  return images_lib.make_grid(images[shown], captions, columns=8, scale=2)


# ----------------------------------------------------------------------------------------------
# Inside training.


def training_evaluator(config, cascade, judge=None, log=print):
  """``evaluator(state, step) -> {"eval/<category>/<split>": accuracy}`` for a base stage
  trained on a labelled set: ``config.eval.images_per_prompt`` images of each scored prompt
  (at most 48 emoji prompts per split) on the EMA params. ``cascade``: the one-stage cascade
  the loop's params are put into (evaluating.training_evaluator builds it)."""
  import jax

  from diffusion_jax import images as images_lib

  dataset, data_dir = labelled_dataset(config), str(config.data.data_dir)
  judge = judge or load_judge(dataset, data_dir, log=log)
  prompts = scored_prompts(dataset, data_dir, judge, max_prompts=48)
  stage = cascade.stages[0]

  def evaluate(state, step):
    stage.params = state.ema_params  # the compiled sampler takes params as an argument
    key = jax.random.key(config.train.seed)
    images = sample_prompts(
        lambda texts, first: images_lib.to_uint8(cascade.sample(texts, key,
                                                                first_index=first)[-1]),
        [p for p, _ in prompts], config.eval.images_per_prompt, batch_size=48)
    _, summary = score(judge, prompts, images, category_of(dataset))
    (category, entry), = summary["categories"].items()
    out = {f"eval/{category}/{split}": entry[split]["accuracy"]
           for split in ("all", "seen", "held_out") if split in entry}
    c = entry["all"]
    log(f"[eval] step {step}: {category} {c['correct']}/{c['n']} = {c['accuracy']:.3f} "
        f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]")
    return out

  return evaluate


def scored_counts(config, judge=None) -> tuple[str, int, int]:
  """(category, images scored, held-out images scored) by ``training_evaluator``."""
  dataset, data_dir = labelled_dataset(config), str(config.data.data_dir)
  judge = judge or load_judge(dataset, data_dir)
  prompts = scored_prompts(dataset, data_dir, judge, max_prompts=48)
  ipp = int(config.eval.images_per_prompt)
  return category_of(dataset), len(prompts) * ipp, sum(h for _, h in prompts) * ipp
