r"""Trains the noise-aware attribute classifier of classifier guidance and measures it.

  python experiments/train_classifier.py --config=configs/attribute_classifier_shapes.py \
      --workdir=runs/classifier_shapes

Writes ``<workdir>/classifier/`` (classifier.json: architecture, vocabulary, training
summary; params.msgpack), loadable with ``diffusion_jax.models.attribute_classifier.load``
and given to sample.py / evaluate.py as ``--classifier_checkpoint``, and
``<workdir>/eval.json``: accuracy per attribute on held-out images at the config's noise
levels (clean included), on validation scenes and on held-out colour x shape pairs.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # for configs/

import cli  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/attribute_classifier_shapes.py[:arg]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (classifier/ and eval.json).")
flags.mark_flags_as_required(["config", "workdir"])


def train_and_evaluate(config, workdir) -> dict:
  """Trains, saves ``workdir/classifier`` and ``workdir/eval.json``; returns the eval."""
  import dataclasses

  import builders

  from diffusion_jax.models import attribute_classifier as ac_lib
  from diffusion_jax.training import classifier_train

  settings = builders.classifier_train_settings(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  classifier, summary = classifier_train.train(settings)
  accuracy = classifier_train.accuracy_by_noise_level(classifier, settings)
  info = {"train": summary, "settings": dataclasses.asdict(settings)}
  ac_lib.save(dataclasses.replace(classifier, info=info), workdir / "classifier")
  result = {"train": summary, "accuracy": accuracy,
            "attributes": dict(classifier.config.to_json()["attributes"])}
  (workdir / "eval.json").write_text(json.dumps(result, indent=2))
  for split in ("validation", "held_out"):
    for level in accuracy[split]:
      shown = ", ".join(f"{n} {level[n]:.2f}" for n in classifier.config.names
                        if level[n] is not None)
      print(f"{split} t={level['t']:.2f}{' (clean)' if level['clean'] else ''}: {shown}")
  print(f"wrote {workdir / 'classifier'} and {workdir / 'eval.json'}")
  return result


def main(argv):
  cli.begin(argv)
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run_main(main)
