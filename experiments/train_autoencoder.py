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

import cli  # noqa: E402
import train  # noqa: E402, F401  (defines its --config / --workdir flags)
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS


def main(argv):
  cli.begin(argv)
  import latent_builders
  latent_builders.run_autoencoder_training(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run_main(main)  # bad flags, config values and UserErrors: one line, exit 2
