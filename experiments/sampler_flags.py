"""The stage and sampler flags of experiments/sample.py, defined once so other scripts
(experiments/evaluate.py) take the same ones; ``values(FLAGS)`` -> keyword arguments."""

from absl import flags

NAMES = ("workdirs", "stages", "checkpoint_steps", "seed", "sampler", "steps",
         "guidance_scale", "threshold", "percentile", "aug_level")


def define() -> None:
  flags.DEFINE_list("workdirs", [], "Training workdirs of the stages, base first.")
  flags.DEFINE_list("stages", [], "Exported stage directories, base first (instead of "
                    "--workdirs).")
  flags.DEFINE_list("checkpoint_steps", None, "Checkpoint step to load per --workdirs entry "
                    "(an integer or 'latest').")
  flags.DEFINE_integer("seed", 0, "Seed of the run; image i uses fold_in(seed key, i).")
  flags.DEFINE_string("sampler", None, "ddpm | ddim | dpmpp_2m | euler | heun (all stages).")
  flags.DEFINE_integer("steps", None, "Sampling steps (all stages).")
  flags.DEFINE_list("guidance_scale", None, "Guidance scale: one value, or one per stage.")
  flags.DEFINE_string("threshold", None, "none | static | dynamic.")
  flags.DEFINE_float("percentile", None, "Dynamic-thresholding percentile in (0, 1].")
  flags.DEFINE_list("aug_level", None, "Low-res augmentation level t in [0, 1]: one value, "
                    "or one per super-resolution stage.")


def values(flag_values) -> dict:
  """The flags above as keyword arguments (``evaluating.run_evaluation``'s names)."""
  return {name: getattr(flag_values, name) for name in NAMES}
