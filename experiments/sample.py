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
scale factor has to chain). A stage trained on aspect buckets (config.data.aspect_buckets)
samples at one of them with --height=H --width=W (default its square), sampled alone. Bad
input stops with one line saying what to fix.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import cli  # noqa: E402
import sampler_flags  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
sampler_flags.define()  # the stages, checkpoints and every sampler setting
flags.DEFINE_multi_string("prompts", [], "Prompts (repeat the flag).")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
flags.DEFINE_string("outdir", None, "Where to write grids, images and samples.json.")
flags.DEFINE_integer("first_index", 0, "Index of the first prompt's image in the run.")
flags.DEFINE_string("export_dir", None, "Also export the loaded stages here (stage_1, ...).")
flags.DEFINE_integer("height", None, "With --width: the base stage's output size, one of its "
                     "aspect buckets (config.data.aspect_buckets; default its square).")
flags.DEFINE_integer("width", None, "See --height.")
flags.mark_flags_as_required(["outdir"])


def main(argv):
  cli.begin(argv)
  import sampling

  names = ("prompts", "prompts_file", "outdir", "first_index", "export_dir", "height", "width")
  result = sampling.sample_cascade(**{name: FLAGS[name].value for name in names},
                                   **sampler_flags.values(FLAGS),
                                   progress=lambda msg: print(msg, flush=True))
  print("wrote " + ", ".join(str(p) for p in result.grids) + f" and {result.record_path}")


if __name__ == "__main__":
  cli.run_main(main)
