r"""Converts pytorch-fid's Inception-v3 weights (a torch state dict) once into the .npz that
``diffusion_jax.evaluation.inception`` (and ``evaluate.py --fid_weights``) reads with numpy.

  curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/\
pt_inception-2015-12-05-6726825d.pth
  python experiments/convert_fid_inception.py --pth=pt_inception-2015-12-05-6726825d.pth \
      --out=pt_inception-2015-12-05-6726825d.npz

The only step that needs torch (``pip install torch``, CPU is enough). Keys and layouts are
kept as they are; the result is checked by loading it into the Flax network.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import cli  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("pth", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
flags.DEFINE_string("out", None, "The .npz to write.")
flags.mark_flags_as_required(["pth", "out"])


def main(argv):
  cli.begin(argv)
  from diffusion_jax.evaluation import inception

  source, out = pathlib.Path(FLAGS.pth), pathlib.Path(FLAGS.out)
  if not source.is_file():
    raise cli.UserError(f"--pth={source} does not exist; download it from "
                        f"{inception.WEIGHTS_URL}.")
  if out.suffix != ".npz":
    raise cli.UserError(f"--out={out}: the output must end in .npz.")
  try:
    import torch  # noqa: F401
  except ImportError:
    raise cli.UserError("reading the .pth needs torch: pip install torch (CPU is enough), "
                        "once, for this conversion.") from None
  try:
    count = inception.convert_torch_file(source, out)
  except inception.WeightsError as e:
    raise cli.UserError(f"--pth={source}: {e}") from None
  except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
    raise cli.UserError(f"--pth={source} is not a readable torch state dict "
                        f"({type(e).__name__}: {e}).") from None
  print(f"wrote {out} ({count} arrays)")


if __name__ == "__main__":
  cli.run_main(main)
