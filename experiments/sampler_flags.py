"""The stage, checkpoint and sampler flags of experiments/sample.py, defined once so the
other scripts that sample (experiments/evaluate.py) take the same ones;
``values(FLAGS)`` -> keyword arguments of ``sampling.prepare_cascade`` / ``sample_cascade``
(and ``evaluating.run_evaluation``), plus ``seed``."""

from absl import flags

# Per-stage settings: one value (every stage) or one per stage, base first; an empty
# entry keeps that stage's own (--eta=0.5, for a ddim base stage and a heun SR stage).
PER_STAGE = "One value, or one per stage."

NAMES = ("workdirs", "stages", "seed", "checkpoint_steps", "aug_level", "clip_guidance_scale",
         "clip_checkpoint", "classifier_guidance_scale", "classifier_checkpoint", "sampler",
         "steps", "guidance_scale", "guidance_schedule", "guidance_min", "threshold",
         "percentile", "grid", "rho", "eta", "variance", "churn", "churn_tmin", "churn_tmax",
         "noise_scale", "refine_strength")


def define() -> None:
  flags.DEFINE_list("workdirs", [], "Training workdirs of the stages, base first.")
  flags.DEFINE_list("stages", [], "Exported stage directories, base first (instead of "
                    "--workdirs).")
  flags.DEFINE_integer("seed", 0, "Seed of the run; image i uses fold_in(seed key, i).")
  flags.DEFINE_list("checkpoint_steps", None, "Checkpoint step to load per --workdirs entry "
                    "(an integer or 'latest'); samples.json records the steps loaded.")
  flags.DEFINE_list("aug_level", None, "Low-res augmentation level t in [0, 1]: one value, "
                    "or one per super-resolution stage.")
  flags.DEFINE_float("clip_guidance_scale", 0.0, "CLIP guidance weight on the base stage (GLIDE; "
                     "0: none); needs --clip_checkpoint.")
  flags.DEFINE_string("clip_checkpoint", None, "A (noise-aware) CLIP directory for "
                      "--clip_guidance_scale, e.g. from experiments/train_clip.py.")
  flags.DEFINE_float("classifier_guidance_scale", 0.0, "Classifier guidance weight on the base "
                     "stage (Dhariwal & Nichol; 0: none) toward the prompt's colour, shape "
                     "and position; needs --classifier_checkpoint.")
  flags.DEFINE_string("classifier_checkpoint", None, "A noise-aware attribute-classifier "
                      "directory for --classifier_guidance_scale, e.g. <workdir>/classifier "
                      "from experiments/train_classifier.py.")
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
  flags.DEFINE_list("refine_strength", None, "Makes a text-to-image stage after the first a "
                    "refiner: SDEdit of the previous stage's output (same resolution) from this "
                    "fraction in (0, 1] of its grid, as SDXL's refiner. One per stage, e.g. "
                    "--workdirs=base,sr,refiner --refine_strength=,,0.3.")


def values(flag_values) -> dict:
  """The flags above as keyword arguments."""
  return {name: getattr(flag_values, name) for name in NAMES}
