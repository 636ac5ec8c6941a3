r"""Trains the small shapes CLIP (configs/clip_shapes.py) and reports its zero-shot accuracy.

  python experiments/train_clip.py --config=configs/clip_shapes.py --workdir=runs/clip_shapes

Writes ``<workdir>/clip/`` (a Hugging Face CLIPModel directory, loadable with
``diffusion_jax.models.clip.load`` and transformers' CLIPModel) and ``<workdir>/eval.json``.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # for configs/

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/clip_shapes.py[:arg]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (clip/ and eval.json).")
flags.mark_flags_as_required(["config", "workdir"])


def settings_from_config(c):
  from diffusion_jax.training import clip_train
  return clip_train.ClipTrainSettings(
      resolution=c.resolution, num_train=c.num_train, batch_size=c.batch_size,
      num_steps=c.num_steps, time_budget_s=c.time_budget_s, learning_rate=c.learning_rate,
      warmup_steps=c.warmup_steps, weight_decay=c.weight_decay, seed=c.seed,
      noise_aware=c.noise_aware, schedule=c.schedule,
      schedule_kwargs=tuple(sorted(c.schedule_kwargs.items())), log_every=c.log_every)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, saves ``workdir/clip`` and ``workdir/eval.json``; returns the eval dict."""
  from diffusion_jax.models import clip as clip_lib
  from diffusion_jax.training import clip_train
  settings = settings_from_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  clip, summary = clip_train.train(settings)
  clip_lib.save(clip, workdir / "clip")
  result = {"train": summary, "noise_aware": settings.noise_aware,
            **clip_train.shapes_zero_shot(clip, config.num_eval, settings.resolution)}
  (workdir / "eval.json").write_text(json.dumps(result, indent=2))
  print(json.dumps(result))
  return result


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a bad flag or config file reported as one line (exit 2)."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.get  # noqa: B018  (config_flags reports a bad file only on first use)
    return remaining
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    lines = [line.strip() for line in str(e).replace("\\n", "\n").splitlines()
             if line.strip()]
    print(f"error: {lines[-1] if lines else type(e).__name__}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
