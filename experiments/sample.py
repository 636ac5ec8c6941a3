r"""Samples prompts through a cascade of trained stages (base stage first).

  python experiments/sample.py --workdirs=runs/demo/base,runs/demo/sr \
      --prompts="a red triangle" --prompts="two blue circles" --outdir=runs/demo/samples

Writes a captioned grid per stage (stage1_32px.png, ...), every image alone
(images/0003_64px.png) and samples.json with everything needed to regenerate them: the
checkpoint step each stage was loaded from, every stage's settings, and the command that
brings image i back alone (--prompts=<its prompt> --first_index=i, the same seed and
--checkpoint_steps, so it still holds after training continues).

Sampler settings (--sampler, --steps, --grid, --rho, --eta, --variance, --churn...,
--guidance_scale, --guidance_schedule, --guidance_min, --threshold, --percentile) take one
value or one per stage (README.md, "Sampler options"); experiments/sampling.py:
sample_cascade is the same with keyword arguments.

A super-resolution stage must follow a stage sampling at the low-res size it was trained
on (unless it was trained on random crops, config.data.crop='random': then only its
scale factor has to chain). Bad input stops with one line saying what to fix.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import cli  # noqa: E402
from absl import flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", [], "Training workdirs of the stages, base first.")
flags.DEFINE_list("stages", [], "Exported stage directories, base first (instead of "
                  "--workdirs).")
flags.DEFINE_multi_string("prompts", [], "Prompts (repeat the flag).")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
flags.DEFINE_string("outdir", None, "Where to write grids, images and samples.json.")
flags.DEFINE_integer("seed", 0, "Seed of the run; image i uses fold_in(seed key, i).")
flags.DEFINE_integer("first_index", 0, "Index of the first prompt's image in the run.")
flags.DEFINE_list("checkpoint_steps", None, "Checkpoint step to load per --workdirs entry "
                  "(an integer or 'latest'); samples.json records the steps loaded.")
flags.DEFINE_list("aug_level", None, "Low-res augmentation level t in [0, 1]: one value, "
                  "or one per super-resolution stage.")
flags.DEFINE_float("clip_guidance_scale", 0.0, "CLIP guidance weight on the base stage (GLIDE; "
                   "0: none); needs --clip_checkpoint.")
flags.DEFINE_string("clip_checkpoint", None, "A (noise-aware) CLIP directory for "
                    "--clip_guidance_scale, e.g. from experiments/train_clip.py.")
flags.DEFINE_string("export_dir", None, "Also export the loaded stages here (stage_1, ...).")
# Per-stage settings: one value (every stage) or one per stage, base first; an empty
# entry keeps that stage's own (--eta=0.5, for a ddim base stage and a heun SR stage).
PER_STAGE = "One value, or one per stage."
flags.DEFINE_list("sampler", None, f"ddpm | ddim | dpmpp_2m | euler | heun. {PER_STAGE}")
flags.DEFINE_list("steps", None, f"Sampling steps. {PER_STAGE}")
flags.DEFINE_list("guidance_scale", None, f"Classifier-free guidance scale. {PER_STAGE}")
flags.DEFINE_list("guidance_schedule", None, "constant | linear | cosine: the guidance "
                  "weight from --guidance_min at pure noise to --guidance_scale at clean "
                  f"data (linear / cosine in the schedule's t). {PER_STAGE}")
flags.DEFINE_list("guidance_min", None, "The weight at pure noise of a linear / cosine "
                  f"--guidance_schedule (default 1). {PER_STAGE}")
flags.DEFINE_list("threshold", None, f"none | static | dynamic. {PER_STAGE}")
flags.DEFINE_list("percentile", None, f"Dynamic-thresholding percentile in (0, 1]. {PER_STAGE}")
flags.DEFINE_list("grid", None, "uniform (in t) | leading | trailing | linspace (diffusers' "
                  "spacings, discrete schedules linear / cosine only) | karras (sigmas with "
                  f"--rho over the schedule's range). {PER_STAGE}")
flags.DEFINE_list("rho", None, f"Karras grid's rho > 0 (default 7). {PER_STAGE}")
flags.DEFINE_list("eta", None, f"DDIM's eta >= 0 (0 deterministic, 1 ancestral). {PER_STAGE}")
flags.DEFINE_list("variance", None, f"DDPM's variance: small | large. {PER_STAGE}")
flags.DEFINE_list("churn", None, f"Euler / Heun: EDM's S_churn >= 0. {PER_STAGE}")
flags.DEFINE_list("churn_tmin", None, f"Euler / Heun: churn only for sigma >= this. {PER_STAGE}")
flags.DEFINE_list("churn_tmax", None, f"Euler / Heun: churn only for sigma <= this. {PER_STAGE}")
flags.DEFINE_list("noise_scale", None, f"Euler / Heun: EDM's S_noise. {PER_STAGE}")
flags.mark_flags_as_required(["outdir"])


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"Unexpected argument {argv[1]!r}: every setting is a --flag.")
  if FLAGS.verbosity == 0:
    logging.set_verbosity(logging.WARNING)
  import builders
  import sampling

  builders.setup_compilation_cache()
  names = ("workdirs", "stages", "prompts", "prompts_file", "outdir", "seed", "first_index",
           "checkpoint_steps", "aug_level", "export_dir", *sampling.SPEC_SETTINGS,
           *sampling.SAMPLER_OPTIONS, "clip_guidance_scale", "clip_checkpoint")
  result = sampling.sample_cascade(**{name: FLAGS[name].value for name in names},
                                   progress=lambda msg: print(msg, flush=True))
  print("wrote " + ", ".join(str(p) for p in result.grids) + f" and {result.record_path}")


if __name__ == "__main__":
  cli.run_main(main)
