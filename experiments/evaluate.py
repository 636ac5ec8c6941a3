r"""Scores a cascade of trained stages on ShapesEval and FD-probe (base stage first), or, when
the base stage trained on a labelled real-data set (Fashion-MNIST, MNIST 5k, Noto emoji), by
that set's classifier judge: class accuracy of the samples and FD in the judge's features
against the real test split (experiments/evaluating_labelled.py; --judge_dir, --max_prompts).

  python experiments/evaluate.py --workdirs=runs/demo/base,runs/demo/sr \
      --categories=colour_shape,counting --images_per_prompt=4 --outdir=runs/demo/eval

Writes eval.json (every score with its 95% interval, FD-probe, the probe's own accuracy on
real images, the run's config and one record per image), eval.md (the tables) and
examples.png (examples framed green / red with what the probe read). With
--fid_weights=PATH (Inception-v3 weights, see diffusion_jax/evaluation/inception.py) FID is
computed too, on FD-probe's images; with --clip_score_model=DIR (a CLIP directory) the CLIP
score of the scored images. The probe is trained
once on first use (a few CPU minutes) and cached in .cache/probe. The stage and sampler
flags are sample.py's. Bad input stops with one line saying what to fix.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import cli  # noqa: E402
import sampler_flags  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
sampler_flags.define()
flags.DEFINE_list("categories", None, "ShapesEval categories (default all): colour_shape, "
                  "counting, position, relation, binding.")
flags.DEFINE_integer("images_per_prompt", 4, "Images sampled per prompt.")
flags.DEFINE_integer("batch_size", 48, "Images per sampling call.")
flags.DEFINE_integer("fd_images", 200, "Images for FD-probe (0: skip it).")
flags.DEFINE_string("probe_dir", None, "Where the trained probe is cached (default "
                    ".cache/probe, or $DIFFUSION_JAX_PROBE_DIR).")
flags.DEFINE_string("probe_path", None, "A saved probe file to judge with instead of the "
                    "cached default probe.")
flags.DEFINE_string("fid_weights", None, "Inception-v3 weights (.npz, pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth converted by "
                    "experiments/convert_fid_inception.py): FID on FD-probe's images too.")
flags.DEFINE_string("clip_score_model", None, "A CLIP directory (experiments/train_clip.py's, "
                    "or a Hugging Face CLIPModel): the CLIP score of the scored images too.")
flags.DEFINE_string("judge_dir", None, "Labelled real-data sets: where their classifier judge "
                    "is cached (default .cache/judges, or $DIFFUSION_JAX_JUDGE_DIR).")
flags.DEFINE_integer("judge_steps", None, "Labelled sets: the judge's training steps when it "
                     "is first trained (default 1500; each setting is cached apart).")
flags.DEFINE_integer("max_prompts", 96, "Emoji: at most this many seen and as many held-out "
                     "emoji captions are scored.")
flags.DEFINE_string("outdir", None, "Where to write eval.json, eval.md and examples.png.")
flags.mark_flags_as_required(["outdir"])


def main(argv):
  cli.begin(argv)
  import evaluating
  import evaluating_labelled

  dataset, data_dir = evaluating_labelled.dataset_of_workdirs(FLAGS.workdirs)
  if dataset:
    evaluating_labelled.check_flags(
        dataset, categories=FLAGS.categories, probe_dir=FLAGS.probe_dir,
        probe_path=FLAGS.probe_path, fid_weights=FLAGS.fid_weights,
        classifier_guidance_scale=FLAGS.classifier_guidance_scale)
    evaluating_labelled.run_labelled_evaluation(
        outdir=FLAGS.outdir, dataset=dataset, data_dir=data_dir,
        images_per_prompt=FLAGS.images_per_prompt, batch_size=FLAGS.batch_size,
        fd_images=FLAGS.fd_images, max_prompts=FLAGS.max_prompts,
        judge_cache_dir=FLAGS.judge_dir, judge_steps=FLAGS.judge_steps,
        **sampler_flags.values(FLAGS))
    return
  evaluating.run_evaluation(
      outdir=FLAGS.outdir, categories=FLAGS.categories,
      images_per_prompt=FLAGS.images_per_prompt, batch_size=FLAGS.batch_size,
      fd_images=FLAGS.fd_images, probe_dir=FLAGS.probe_dir, probe_path=FLAGS.probe_path,
      fid_weights=FLAGS.fid_weights, clip_score_model=FLAGS.clip_score_model,
      **sampler_flags.values(FLAGS))


if __name__ == "__main__":
  cli.run_main(main)
