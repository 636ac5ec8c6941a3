r"""Textual inversion on the shapes world: teach a base stage a colour its data never names.

  python experiments/textual_inversion_eval.py --workdir=runs/demo/base --outdir=runs/ti_eval

Renders --num_concept images of a teal (0, 128, 128) circle at random places and sizes,
learns the embedding of "<s*>" from them with everything else frozen (edit.py's
textual-inversion: diffusion_jax/editing/textual_inversion.py, initialised from "circle"),
then samples --num_images per prompt and reads each sample's object from its pixels (the
probe knows only the dataset's colours): the object's mean colour, nearest among the
dataset's colours and teal, and its centroid. Reports, per prompt, how often the object is
teal and how often it is on the left (x < 0.5) with Wilson 95% intervals:

  "a <s*>", "a <s*> on the left", "a <s*> on the right"   the learnt word, composed
  "a circle"                                             the init word, for reference

Writes ti_eval.md / ti_eval.json / ti_eval.png and learned_embeds.safetensors to --outdir.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

TEAL = (0, 128, 128)
TOKEN = "<s*>"
PROMPTS = ("a {}", "a {} on the left", "a {} on the right", "a circle")


def concept_images(num: int, resolution: int, seed: int = 0) -> np.ndarray:
  """uint8 [num, R, R, 3]: teal circles on the dataset's backgrounds, random x, y, size."""
  from diffusion_jax.data import shapes

  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    radius = rng.uniform(0.12, 0.2)
    obj = shapes.SceneObject("circle", "teal", TEAL, "medium", rng.uniform(0.25, 0.75),
                             rng.uniform(0.25, 0.75), radius)
    scene = shapes.Scene((240, 240, 240), (obj,), {"kind": "single"})
    out.append(shapes.render(scene, resolution))
  return np.stack(out)


def read_object(image: np.ndarray) -> tuple[str, float]:
  """(nearest colour name of the pixels unlike the corners' background, their mean x in
  image widths); ("none", nan) when no pixel differs."""
  from diffusion_jax.data import shapes

  x = image.astype(np.float64)
  background = np.median(np.concatenate([x[:2, :2], x[:2, -2:], x[-2:, :2], x[-2:, -2:]])
                         .reshape(-1, 3), axis=0)
  mask = np.linalg.norm(x - background, axis=-1) > 60
  if mask.sum() < 3:
    return "none", float("nan")
  mean = x[mask].mean(0)
  palette = {**shapes.COLORS, "teal": TEAL}
  name = min(palette, key=lambda c: np.linalg.norm(mean - np.asarray(palette[c])))
  xs = (np.nonzero(mask)[1] + 0.5) / image.shape[1]
  return name, float(xs.mean())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="A trained text-to-image base stage.")
  parser.add_argument("--outdir", required=True)
  parser.add_argument("--num_concept", type=int, default=6)
  parser.add_argument("--num_images", type=int, default=32)
  parser.add_argument("--train_steps", type=int, default=300)
  parser.add_argument("--learning_rate", type=float, default=5e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  import jax
  import sampling
  from cli import UserError

  from diffusion_jax import cascade as cascade_lib
  from diffusion_jax import images as images_lib
  from diffusion_jax.diffusion import guidance, samplers
  from diffusion_jax.editing import textual_inversion as ti
  from diffusion_jax.evaluation import shapes_eval

  try:
    cascade, described, _ = sampling.load_cascade([args.workdir])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  stage, spec = cascade.stages[0], cascade.stages[0].spec
  concept = concept_images(args.num_concept, spec.resolution, args.seed)
  encoder, ids = ti.add_tokens(cascade.text_encoder, TOKEN, init_word="circle")
  settings = ti.InversionSettings(parameterization=spec.parameterization,
                                  schedule=spec.schedule, schedule_kwargs=spec.schedule_kwargs,
                                  learning_rate=args.learning_rate)
  net = cascade_lib.stage_model_fn(stage.model, stage.params)
  key = jax.random.key(args.seed)
  encoder, history = ti.train(encoder, net, ids, concept.astype(np.float32) / 127.5 - 1.0,
                              [f"a {TOKEN}"], key, num_steps=args.train_steps,
                              settings=settings, batch_size=min(4, len(concept)))
  outdir = pathlib.Path(args.outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  vectors = np.asarray(encoder.params[ti.table_name(encoder)]["embedding"])[ids]
  ti.save_embedding(outdir / "learned_embeds.safetensors", TOKEN, vectors)
  null_emb, null_mask = encoder.encode([""])
  null = {"text_emb": jax.numpy.asarray(null_emb[0]),
          "text_mask": jax.numpy.asarray(null_mask[0])}
  n, grid = args.num_images, spec.grid()
  shape = (spec.resolution, spec.resolution, stage.model.config.out_channels)
  rows, tiles, captions = {}, [images_lib.to_uint8(concept[:8] / 127.5 - 1.0)], \
      [f"concept {i + 1}" for i in range(min(8, len(concept)))]
  for prompt in PROMPTS:
    text = prompt.format(TOKEN)
    emb, mask = encoder.encode([text] * n)
    cond = {"text_emb": jax.numpy.asarray(emb), "text_mask": jax.numpy.asarray(mask)}
    model_fn = guidance.thresholded(
        guidance.classifier_free(net, cond, null, spec.guidance_scale),
        spec.parameterization, spec.threshold, spec.percentile)
    keys = samplers.image_keys(key, n)
    out = jax.jit(lambda k, fn=model_fn: samplers.sample(
        spec.sampler, fn, samplers.initial_noise(k, (n, *shape)), grid, k,
        parameterization=spec.parameterization, **dict(spec.sampler_options)))(keys)
    images = np.asarray(images_lib.to_uint8(np.asarray(out)))
    reads = [read_object(im) for im in images]
    rows[text] = {"teal": shapes_eval.cell([c == "teal" for c, _ in reads]),
                  "left": shapes_eval.cell([x < 0.5 for _, x in reads if x == x]),
                  "colours": [c for c, _ in reads]}
    tiles.append(images[:8])
    captions += [text] * min(8, n)

  def fmt(c):
    low, high = c["ci95"]
    return f"{c['accuracy']:.3f} [{low:.3f}, {high:.3f}] ({c['correct']}/{c['n']})"

  table = ["| prompt | object teal | object on the left |", "|---|---|---|"]
  table += [f"| {t} | {fmt(r['teal'])} | {fmt(r['left'])} |" for t, r in rows.items()]
  text = (f"Textual inversion of {TOKEN} ({args.train_steps} steps, loss {history[0]:.4f} -> "
          f"{history[-1]:.4f}) on {args.num_concept} teal circles; {n} samples per prompt\n\n"
          + "\n".join(table) + "\n")
  (outdir / "ti_eval.md").write_text(text)
  (outdir / "ti_eval.json").write_text(json.dumps(
      {"stage": described, "train_steps": args.train_steps, "loss": [history[0], history[-1]],
       "rows": rows}, indent=2, default=str))
  grid_image = images_lib.make_grid(np.concatenate(tiles), captions, columns=8,
                                    scale=max(1, 128 // spec.resolution))
  images_lib.save_png(grid_image, outdir / "ti_eval.png")
  print(text, end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
