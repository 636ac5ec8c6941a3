r"""unCLIP (DALL-E 2, Ramesh et al. 2022): text -> prior -> CLIP image embedding -> decoder ->
super-resolution stages; and image variations (an image's CLIP embedding -> new images).

  python experiments/unclip.py sample --prior=runs/prior_shapes \
      --workdirs=runs/unclip/decoder,runs/demo/sr --prompts="a red circle" --outdir=runs/u
  python experiments/unclip.py variations --workdirs=runs/unclip/decoder,runs/demo/sr \
      --image=in.png --num_images=4 --outdir=runs/u_var
  python experiments/unclip.py evaluate --prior=runs/prior_shapes \
      --workdirs=runs/unclip/decoder,runs/demo/sr --outdir=runs/u_eval

--workdirs: the decoder (trained with configs/unclip_decoder_shapes.py, i.e.
config.conditioning.kind='image_embed') first, then super-resolution stages; the stage and
sampler flags are sample.py's (one value or one per stage). The CLIP is the decoder's
config.conditioning.clip_dir (--clip_dir overrides it, e.g. after moving it); the prior
must have been trained against the same CLIP. sample: a grid per stage captioned with the
prompts. variations: the input beside --num_images variations (no caption: the decoder
sees the embedding alone, --caption gives it one). evaluate: ShapesEval of the pipeline
(--categories, default colour_shape: the 1-object world the CLIP and prior know), and the
probe's agreement of --variations_per_input variations of --num_inputs validation images
with their inputs (eval.json, eval.md, examples.png). Bad input: one "error:" line, exit 2.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import builders  # noqa: E402
import cli  # noqa: E402
import sampler_flags  # noqa: E402
import sampling  # noqa: E402
import unclip_builders as ub  # noqa: E402
from absl import flags, logging  # noqa: E402
from cli import UserError  # noqa: E402

COMMANDS = ("sample", "variations", "evaluate")

FLAGS = flags.FLAGS
sampler_flags.define()
flags.DEFINE_string("prior", None, "sample / evaluate: a train_prior.py workdir.")
flags.DEFINE_integer("prior_checkpoint_step", None, "The prior's checkpoint (default latest).")
flags.DEFINE_integer("prior_steps", 25, "DDIM steps of the prior.")
flags.DEFINE_float("prior_guidance_scale", 3.0, "The prior's classifier-free guidance.")
flags.DEFINE_integer("prior_candidates", 2, "Embeddings the prior draws per caption, the one "
                     "closest to the caption's CLIP text embedding kept (DALL-E 2: 2).")
flags.DEFINE_string("clip_dir", None, "The CLIP (default: the decoder's "
                    "config.conditioning.clip_dir).")
flags.DEFINE_multi_string("prompts", [], "sample: prompts (repeatable).")
flags.DEFINE_string("prompts_file", None, "sample: a file with one prompt per line.")
flags.DEFINE_bool("decoder_caption", True, "sample / evaluate: give the decoder the caption "
                  "too (False: the embedding alone).")
flags.DEFINE_string("image", None, "variations: the input image (PNG).")
flags.DEFINE_string("caption", "", "variations: a caption for the decoder (default none).")
flags.DEFINE_integer("num_images", 4, "variations: variations of --image.")
flags.DEFINE_list("categories", ["colour_shape"], "evaluate: ShapesEval categories.")
flags.DEFINE_integer("images_per_prompt", 2, "evaluate: images per ShapesEval prompt.")
flags.DEFINE_integer("num_inputs", 48, "evaluate: validation images to make variations of "
                     "(0: none).")
flags.DEFINE_integer("variations_per_input", 2, "evaluate: variations per input image.")
flags.DEFINE_integer("batch_size", 48, "evaluate: images per sampling call.")
flags.DEFINE_string("probe_dir", None, "evaluate: the probe cache (default .cache/probe).")
flags.DEFINE_string("probe_path", None, "evaluate: a saved probe file instead.")
flags.DEFINE_string("outdir", None, "Where to write the grids and unclip.json / eval.json.")


def check_flags(command: str, f) -> None:
  """Every check that reads no checkpoint."""
  if command not in COMMANDS:
    raise UserError(f"unknown sub-command {command!r}; choose one of {', '.join(COMMANDS)} "
                    "(python experiments/unclip.py sample --prior=... --workdirs=...).")
  if not f.workdirs:
    raise UserError("--workdirs is required: the decoder's training workdir (config."
                    "conditioning.kind='image_embed'), then any super-resolution stages.")
  if not f.outdir:
    raise UserError("--outdir is required.")
  if command in ("sample", "evaluate") and not f.prior:
    raise UserError(f"{command} needs --prior: a workdir of experiments/train_prior.py.")
  if command == "variations" and f.num_images < 1:
    raise UserError(f"--num_images={f.num_images}; it must be >= 1.")
  if command == "evaluate":
    if f.images_per_prompt < 1 or f.batch_size < 1:
      raise UserError("--images_per_prompt and --batch_size must be >= 1.")
    if f.num_inputs < 0 or f.variations_per_input < 1:
      raise UserError("--num_inputs must be >= 0 and --variations_per_input >= 1.")
  if f.prior_steps < 1 or f.prior_candidates < 1:
    raise UserError(f"--prior_steps={f.prior_steps} and --prior_candidates="
                    f"{f.prior_candidates} must be >= 1.")


def _save_grid(images_lib, tiles, captions, path, columns):
  res = tiles.shape[1]
  return images_lib.save_png(images_lib.make_grid(tiles, captions, columns=columns,
                                                  scale=max(1, 128 // res)), path)


def run(command: str, f) -> dict:
  """The sub-command's work; returns the record it wrote."""
  import jax
  import numpy as np

  from diffusion_jax import images as images_lib
  from diffusion_jax import unclip

  check_flags(command, f)
  if command == "sample":
    prompts = sampling.read_prompts(f.prompts, f.prompts_file)
  if command == "variations":
    config = ub.decoder_config(f.workdirs[0])  # its resolution, before anything is loaded
    image = ub.read_image(f.image, config.data.resolution)
  cascade, described, embedder, clip, config = ub.load_decoder(f)
  prior = ub.load_prior(f, embedder, clip) if command in ("sample", "evaluate") else None
  key = jax.random.key(f.seed)
  prior_key, decoder_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
  outdir = pathlib.Path(f.outdir)
  record = {"command": command, "seed": f.seed, "stages": described,
            "clip": embedder.directory,
            "prior": None if prior is None else {"workdir": str(f.prior), **prior.settings}}
  if command == "evaluate":
    import unclip_evaluation

    result = unclip_evaluation.evaluate(
        cascade, prior, embedder, f, prior_key, decoder_key,
        resolution=config.data.resolution)
    return {**record, **result}

  outdir.mkdir(parents=True, exist_ok=True)
  if command == "sample":
    emb = prior(prompts, prior_key)
    captions = prompts if f.decoder_caption else [""] * len(prompts)
    outputs = unclip.decode(cascade, emb, captions, decoder_key)
    written = [_save_grid(images_lib, out, prompts, outdir / f"stage{i + 1}_"
                          f"{out.shape[1]}px.png", min(4, len(prompts)))
               for i, out in enumerate(outputs)]
    record.update(prompts=prompts, decoder_caption=f.decoder_caption)
  else:
    n = f.num_images
    emb = np.repeat(np.asarray(embedder(image[None])), n, axis=0)
    outputs = unclip.decode(cascade, emb, [f.caption] * n, decoder_key)
    final = outputs[-1]
    res = final.shape[1]
    shown = np.asarray(jax.image.resize(image[None], (1, res, res, 3), "linear"))
    written = [_save_grid(images_lib, np.concatenate([shown, final]),
                          ["input"] + [f"variation {i + 1}" for i in range(n)],
                          outdir / "variations.png", min(n + 1, 5))]
    # How close each variation's own CLIP embedding is to the input's (1: the same).
    cosine = np.asarray(embedder(final)) @ emb[0]
    record.update(image=str(f.image), num_images=n, caption=f.caption,
                  clip_cosine_to_input=[round(float(c), 4) for c in cosine])
  record["grids"] = [str(p) for p in written]
  (outdir / "unclip.json").write_text(json.dumps(record, indent=2, default=str))
  print(f"wrote {', '.join(record['grids'])} and {outdir / 'unclip.json'}")
  return record


def main(argv):
  if FLAGS.verbosity == 0:
    logging.set_verbosity(logging.WARNING)
  if len(argv) != 2:
    raise UserError(f"give one sub-command first: python experiments/unclip.py "
                    f"{{{','.join(COMMANDS)}}} --workdirs=... (got {argv[1:]}).")
  builders.setup_compilation_cache()
  run(argv[1], FLAGS)


if __name__ == "__main__":
  cli.run_main(main)
