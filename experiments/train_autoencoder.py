r"""Trains the KL autoencoder of a latent stage (diffusion_jax.training.autoencoder).

  python experiments/train_autoencoder.py --config=configs/autoencoder_shapes.py \
      --workdir=runs/ae_shapes

Resumes from the workdir's checkpoints; at the end computes the latent scale factor and
the reconstruction PSNR and exports <workdir>/autoencoder/ (diffusers AutoencoderKL
layout) for --config.autoencoder.directory of a latent stage.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # for configs/

import builders  # noqa: E402
import train  # noqa: E402  (its --config / --workdir flags and their one-line errors)
from absl import app, logging  # noqa: E402

FLAGS = train.FLAGS


def main(argv):
  del argv
  if FLAGS.verbosity == 0:
    logging.set_verbosity(logging.WARNING)
  builders.setup_compilation_cache()
  import latent_builders
  try:
    latent_builders.run_autoencoder_training(FLAGS.config, FLAGS.workdir)
  except builders.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=train.parse_flags)
