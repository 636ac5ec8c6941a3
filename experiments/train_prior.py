r"""Trains DALL-E 2's diffusion prior (configs/prior_shapes.py) against a frozen CLIP and
reports how close its sampled image embeddings come to the true ones on validation images.

  python experiments/train_prior.py --config=configs/prior_shapes.py \
      --config.clip_dir=runs/clip_shapes --workdir=runs/prior_shapes

Writes into the workdir: ``checkpoints/`` (orbax; rerunning the same command resumes from
the latest, refusing a config that changes what the weights mean), ``config.json``,
``prior.json`` (the network, caption length, schedule and the CLIP directory, read by
experiments/unclip.py) and ``eval.json``. Bad input stops with one line (exit 2).
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # for configs/

import cli  # noqa: E402
from absl import flags  # noqa: E402
from cli import UserError  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/prior_shapes.py[:smoke]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, prior.json and eval.json go here.")
flags.mark_flags_as_required(["config", "workdir"])

PRIOR_JSON = "prior.json"
# What a resumed run may change: how long it trains, logs and saves, and its evaluation.
MAY_CHANGE_ON_RESUME = ("num_steps", "time_budget_s", "log_every", "checkpoint_every",
                        "keep_checkpoints", "num_eval", "eval_*", "clip_dir",
                        "optimizer.learning_rate", "optimizer.warmup_steps",
                        "optimizer.decay_steps")


def _checked(what, fn, *args, **kwargs):
  try:
    return fn(*args, **kwargs)
  except (ValueError, TypeError) as e:
    raise UserError(f"{what}: {e}") from None


def settings_from_config(c):
  """(PriorConfig, OptimizerSettings, PriorTrainSettings) of the config (UserError)."""
  from diffusion_jax.models import prior as prior_lib
  from diffusion_jax.training import prior_train
  from diffusion_jax.training import state as state_lib

  model = _checked("config.model", prior_lib.PriorConfig, **c.model.to_dict())
  if model.hidden_size % model.num_attention_heads:
    raise UserError(f"config.model.hidden_size={model.hidden_size} must divide by "
                    f"num_attention_heads={model.num_attention_heads}.")
  optimizer = _checked("config.optimizer", state_lib.OptimizerSettings,
                       **c.optimizer.to_dict())
  settings = _checked("config", prior_train.PriorTrainSettings,
                      resolution=c.resolution, num_train=c.num_train, num_eval=c.num_eval,
                      batch_size=c.batch_size, num_steps=c.num_steps,
                      time_budget_s=c.time_budget_s, cond_drop_prob=c.diffusion.cond_drop_prob,
                      ema_decay=c.ema_decay, seed=c.seed, log_every=c.log_every,
                      checkpoint_every=c.checkpoint_every,
                      keep_checkpoints=c.keep_checkpoints, eval_steps=c.eval_steps,
                      eval_guidance_scale=c.eval_guidance_scale)
  return model, optimizer, settings


def train_and_evaluate(config, workdir: str, log=print) -> dict:
  """Trains (resuming), writes prior.json and eval.json; returns the eval dict."""
  import jax

  from diffusion_jax import unclip
  from diffusion_jax.diffusion import schedules
  from diffusion_jax.training import checkpoint, prior_train, resume, workdir_lock
  from diffusion_jax.training import loop as loop_lib

  model, optimizer, settings = settings_from_config(config)
  _checked(f"config.diffusion.schedule={config.diffusion.schedule!r}", schedules.get,
           config.diffusion.schedule)
  import unclip_builders

  clip, clip_dir = unclip_builders.load_clip_dir(config.clip_dir, "--config.clip_dir")
  try:
    loop_lib.check_workdir(workdir)
  except ValueError as e:
    raise UserError(str(e)) from None
  workdir = pathlib.Path(workdir)
  rules = resume.ResumeRules(may_change=MAY_CHANGE_ON_RESUME)
  try:
    with workdir_lock.hold(workdir):
      checkpointer = checkpoint.Checkpointer(workdir, max_to_keep=settings.keep_checkpoints)
      try:
        step = checkpointer.latest_step()
        if step is not None:
          resume.check_config(checkpointer.stored_json("config", step), config.to_dict(),
                              rules, str(checkpointer.directory / str(step)))
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        spec, params, summary, train_data, val = prior_train.train(
            clip, model, optimizer, settings, schedule_name=config.diffusion.schedule,
            checkpointer=checkpointer, config_json=config.to_dict(), log=log)
      finally:
        checkpointer.close()
      (workdir / PRIOR_JSON).write_text(json.dumps(
          {**spec.to_json(), "clip_dir": clip_dir, "step": summary["steps"]}, indent=2))
      sampler = unclip.PriorSampler(spec, params, clip, num_steps=settings.eval_steps,
                                    guidance_scale=settings.eval_guidance_scale)
      result = {"train": summary, "clip_dir": clip_dir,
                "validation": prior_train.evaluate(sampler, val, train_data,
                                                   jax.random.key(settings.seed + 1))}
      (workdir / "eval.json").write_text(json.dumps(result, indent=2))
  except (workdir_lock.WorkdirLockedError, resume.IncompatibleResumeError,
          checkpoint.CheckpointError) as e:
    raise UserError(str(e)) from None
  v = result["validation"]
  log(f"validation: cosine(sampled, true) {v['cosine_sampled_vs_true']['mean']:.3f}, "
      f"text embedding {v['cosine_text_embedding_vs_true']['mean']:.3f}, unrelated "
      f"{v['cosine_unrelated_images']['mean']:.3f}; nearest train image's colour and shape "
      f"right {v['nearest_train_image_pair_right']:.3f}")
  return result


def main(argv):
  cli.begin(argv)
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run_main(main)
