r"""Samples prompts through a cascade of trained stages (base stage first).

  python experiments/sample.py --workdirs=runs/demo/base,runs/demo/sr \
      --prompts="a red triangle" --prompts="two blue circles" --outdir=runs/demo/samples

Writes a captioned grid per stage (stage1_32px.png, ...), every image alone
(images/0003_64px.png) and samples.json with everything needed to regenerate them: the
checkpoint step each stage was loaded from, every stage's settings, and the command that
brings image i back alone (--prompts=<its prompt> --first_index=i, the same seed and
--checkpoint_steps, so it still holds after training continues).

A super-resolution stage must follow a stage sampling at the low-res size it was trained
on (unless it was trained on random crops, config.data.crop='random': then only its
scale factor has to chain). Bad input stops with one line saying what to fix.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import builders  # noqa: E402
import sampling  # noqa: E402
from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", [], "Training workdirs of the stages, base first.")
flags.DEFINE_list("stages", [], "Exported stage directories, base first (instead of "
                  "--workdirs).")
flags.DEFINE_multi_string("prompts", [], "Prompts (repeat the flag).")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
flags.DEFINE_string("outdir", None, "Where to write grids, images and samples.json.")
flags.DEFINE_integer("seed", 0, "Seed of the run; image i uses fold_in(seed key, i).")
flags.DEFINE_integer("first_index", 0, "Index of the first prompt's image in the run.")
flags.DEFINE_string("sampler", None, "ddpm | ddim | dpmpp_2m | euler | heun (all stages).")
flags.DEFINE_integer("steps", None, "Sampling steps (all stages).")
flags.DEFINE_list("guidance_scale", None, "Guidance scale: one value, or one per stage.")
flags.DEFINE_string("threshold", None, "none | static | dynamic.")
flags.DEFINE_float("percentile", None, "Dynamic-thresholding percentile in (0, 1].")
flags.DEFINE_list("aug_level", None, "Low-res augmentation level t in [0, 1]: one value, "
                  "or one per super-resolution stage.")
flags.DEFINE_list("checkpoint_steps", None, "Checkpoint step to load per --workdirs entry "
                  "(an integer or 'latest'); samples.json records the steps loaded.")
flags.DEFINE_float("clip_guidance_scale", 0.0, "CLIP guidance weight on the base stage (GLIDE; "
                   "0: none); needs --clip_checkpoint.")
flags.DEFINE_string("clip_checkpoint", None, "A (noise-aware) CLIP directory for "
                    "--clip_guidance_scale, e.g. from experiments/train_clip.py.")
flags.DEFINE_string("export_dir", None, "Also export the loaded stages here (stage_1, ...).")
flags.mark_flags_as_required(["outdir"])


def main(argv):
  del argv
  if FLAGS.verbosity == 0:
    logging.set_verbosity(logging.WARNING)
  builders.setup_compilation_cache()
  try:
    sampling.run_sampling(FLAGS)
  except builders.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
