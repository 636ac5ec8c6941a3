"""experiments/unclip.py evaluate: ShapesEval of the unCLIP pipeline (text -> prior ->
decoder -> super-resolution), scored by the shapes probe exactly as evaluate.py scores a
text-conditioned cascade (shapes_eval.sample_suite / judge_records / summarise), and the
probe's agreement of image variations with their inputs
(diffusion_jax/evaluation/variation_agreement.py)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np
from builders import UserError

VARIATION_INDEX_OFFSET = 2_000_000  # variation images' run indices, apart from the suite's


def load_probe(probe_dir=None, probe_path=None, log=print):
  from diffusion_jax.evaluation import probe as probe_lib

  if probe_path:
    if not pathlib.Path(probe_path).exists():
      raise UserError(f"--probe_path {probe_path} does not exist; omit it to use (and on "
                      "first use train) the cached probe.")
    return probe_lib.load(probe_path)
  return probe_lib.load_or_train(cache_dir=probe_dir, log=log)


def sample_variations(cascade, embedder, inputs: np.ndarray, per_input: int, key,
                      batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 variations [N, K, H, W, 3], CLIP cosine of each to its input [N, K]) of
  images [N, R, R, 3] in [-1, 1]; variation k of input i is image
  VARIATION_INDEX_OFFSET + i * K + k of the run (calls padded to ``batch_size``)."""
  from diffusion_jax import images as images_lib
  from diffusion_jax import unclip

  emb = np.asarray(embedder(inputs))
  flat = np.repeat(emb, per_input, axis=0)
  out, cosines = [], []
  for s in range(0, len(flat), batch_size):
    chunk = flat[s:s + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
    final = unclip.decode(cascade, padded, [""] * batch_size, key,
                          first_index=VARIATION_INDEX_OFFSET + s)[-1][:len(chunk)]
    cosines.append(np.sum(np.asarray(embedder(final)) * chunk, axis=1))
    out.append(images_lib.to_uint8(final))
  images = np.concatenate(out)
  return (images.reshape(len(inputs), per_input, *images.shape[1:]),
          np.concatenate(cosines).reshape(len(inputs), per_input))


def evaluate(cascade, prior, embedder, f, prior_key, decoder_key, *, resolution: int,
             log=print) -> dict:
  """Writes eval.json, eval.md, examples.png and variations.png into ``f.outdir``."""
  from diffusion_jax import images as images_lib
  from diffusion_jax import unclip
  from diffusion_jax.evaluation import probe_accuracy, shapes_eval, variation_agreement

  try:
    shapes_eval.suite(list(f.categories))
  except ValueError as e:
    raise UserError(f"--categories: {e}") from None
  probe = load_probe(f.probe_dir, f.probe_path, log)
  start = time.time()
  accuracy = probe_accuracy.measure(probe)
  log(f"[eval] probe accuracy on real images: {probe_accuracy.summary(accuracy)}")

  def sample_fn(prompts, first_index):
    emb = prior(prompts, prior_key, first_index)
    captions = prompts if f.decoder_caption else [""] * len(prompts)
    return images_lib.to_uint8(unclip.decode(cascade, emb, captions, decoder_key,
                                             first_index=first_index)[-1])

  records, images = shapes_eval.sample_suite(sample_fn, list(f.categories),
                                             f.images_per_prompt, f.batch_size,
                                             shapes_eval.Progress("unCLIP ShapesEval"))
  shapes_eval.judge_records(records, probe.read(images))
  summary = shapes_eval.summarise(records)
  result = {"summary": summary, "variations": None}
  out = pathlib.Path(f.outdir)
  out.mkdir(parents=True, exist_ok=True)
  md = [shapes_eval.markdown(summary), ""]
  if f.num_inputs:
    inputs, specs, _ = variation_agreement.input_scenes(f.num_inputs, resolution)
    log(f"[eval] {f.num_inputs} inputs x {f.variations_per_input} variations ...")
    variations, cosines = sample_variations(
        cascade, embedder, inputs.astype(np.float32) / 127.5 - 1.0, f.variations_per_input,
        decoder_key, f.batch_size)
    k = f.variations_per_input
    readings = probe.read(variations.reshape(-1, *variations.shape[2:]))
    agreement = variation_agreement.score(specs, probe.read(inputs),
                                          [readings[i * k:(i + 1) * k]
                                           for i in range(len(inputs))])
    agreement["clip_cosine_to_input"] = {"mean": float(cosines.mean()),
                                         "min": float(cosines.min())}
    result["variations"] = agreement
    md += [variation_agreement.markdown(agreement),
           f"CLIP cosine of variations to their input: {cosines.mean():.3f} (mean).", ""]
    shown = min(8, len(inputs))
    res = variations.shape[2]
    big = np.asarray(images_lib.to_uint8(_resize(inputs[:shown], res)))
    tiles = np.concatenate([np.concatenate([big[i:i + 1], variations[i]])
                            for i in range(shown)])
    captions = [c for i in range(shown) for c in
                ["input"] + [f"variation {j + 1}" for j in range(k)]]
    images_lib.save_png(images_lib.make_grid(tiles, captions, columns=k + 1,
                                             scale=max(1, 128 // res)), out / "variations.png")
  md += ["The probe on real images (its own accuracy):", "", probe_accuracy.markdown(accuracy)]
  result.update(
      probe={"settings": dataclasses.asdict(probe.settings), "accuracy_on_real": accuracy},
      settings={"categories": list(f.categories), "images_per_prompt": f.images_per_prompt,
                "num_inputs": f.num_inputs, "variations_per_input": f.variations_per_input,
                "decoder_caption": f.decoder_caption, "batch_size": f.batch_size},
      seconds=round(time.time() - start, 1), records=records)
  (out / "eval.json").write_text(json.dumps(result, indent=2, default=str))
  (out / "eval.md").write_text("\n".join(md) + "\n")
  images_lib.save_png(shapes_eval.example_grid(records, images), out / "examples.png")
  log("\n".join(md[:-3]))
  log(f"[eval] wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'examples.png'}")
  return result


def _resize(images_uint8: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, R, R, 3] -> floats [N, size, size, 3] in [-1, 1] (nearest for upscaling)."""
  x = images_uint8.astype(np.float32) / 127.5 - 1.0
  factor = size // x.shape[1]
  return x.repeat(factor, 1).repeat(factor, 2) if factor >= 1 and size % x.shape[1] == 0 \
      else x
