r"""Trains the shapes probe once and caches it (ShapesEval's judge; see
diffusion_jax/evaluation/probe.py), then prints its accuracy on real images.

  python experiments/train_probe.py [--config=configs/probe_shapes.py] [--probe_dir=DIR]

A probe already cached for these settings is loaded, not retrained.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import builders  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "probe_shapes.py"),
                                "The probe's config file.")
flags.DEFINE_string("probe_dir", None, "Cache directory (default .cache/probe or "
                    "$DIFFUSION_JAX_PROBE_DIR).")


def main(argv):
  del argv
  if FLAGS.verbosity == 0:
    logging.set_verbosity(logging.WARNING)
  builders.setup_compilation_cache()
  from diffusion_jax.evaluation import probe as probe_lib
  from diffusion_jax.evaluation import probe_accuracy

  settings = builders.checked("--config", probe_lib.ProbeSettings, **FLAGS.config.to_dict())
  try:
    probe = probe_lib.load_or_train(settings, FLAGS.probe_dir)
  except builders.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(probe_accuracy.markdown(probe.info["accuracy"]))
  print(f"probe: {probe_lib.cache_path(settings, FLAGS.probe_dir)} (trained in "
        f"{probe.info.get('train_seconds', '?')} s)")


if __name__ == "__main__":
  app.run(main)
