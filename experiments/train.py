r"""Trains one stage of the cascade.

  python experiments/train.py --config=configs/demo_base.py --workdir=runs/demo/base

Re-running with the same --workdir resumes from its latest checkpoint (if the config may
continue it: configs/common.py MAY_CHANGE_ON_RESUME lists what may change). One run holds a
workdir at a time (workdir/lock.json; a dead holder's lock is taken over). On a TPU VM slice,
run the same command on every host (gcloud ... ssh --worker=all --command="..."); on a
GPU cluster pass --config.distributed.coordinator_address=HOST:PORT and the process count
and id (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).

Exit codes: 0 the run finished (num_steps or its time budget); 2 a user error, printed as
one "error: ..." line (a bad config or flag, a workdir held by another run, a resume the
checkpoint's config refuses, an unreadable checkpoint, a full disk, a non-finite streak);
3 (PREEMPTED_EXIT_CODE) stopped by SIGTERM after saving a checkpoint of the current step:
rerun the same command to resume.
"""

import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # for configs/

import builders  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# A SIGTERM (preemption) stop, after its checkpoint: distinct from 0 (finished) and 2
# (user error), so a retry wrapper knows to rerun.
PREEMPTED_EXIT_CODE = 3

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and previews.")
flags.mark_flags_as_required(["config", "workdir"])


def flag_error_line(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing the flags (the config file included),
  whose messages otherwise carry ml_collections' tracebacks and field dumps."""
  text = str(error).replace("\\n", "\n")
  suggestion = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', text)
  hint = f" {suggestion.group(0)}" if suggestion else ""
  locked = re.search(r'Key "(\w+)" does not exist and cannot be added since the config is '
                     r"locked", text)
  config_arg = next((a for a in argv if a.startswith("--config=")), "--config")
  if locked:  # a config file sets a field common.py does not define
    return (f"{config_arg}: the config file sets config field {locked.group(1)!r}, which "
            f"configs/common.py does not define.{hint or ' Is it misspelt?'}")
  if isinstance(error, AttributeError | KeyError):  # --config.<path>=... with a bad path
    name = re.search(r"(\w+)\\?'", text)  # the field, quoted (and maybe escaped)
    name = name.group(1) if name else "?"
    arg = next((a for a in argv if a.startswith("--config.") and
                re.search(rf"\.{re.escape(name)}(=|$|\.)", a)), "--config.*")
    return (f"{arg}: the config has no field {name!r} (fields are defined in "
            f"configs/common.py).{hint}")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(error, OSError) and lines:  # the config file could not be loaded
    return f"{config_arg}: {lines[-1]}"
  if len(lines) > 1:  # "flag --config=...: Error whilst parsing config file:", traceback
    return f"{lines[0]} {lines[-1]}"
  return lines[0] if lines else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
  try:
    remaining = FLAGS(argv)
    FLAGS.config.get  # noqa: B018  (config_flags reports a bad file only on first use)
    return remaining
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    print(f"error: {flag_error_line(e, argv)}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  if FLAGS.verbosity == 0:  # orbax logs every save at INFO; keep the console readable
    logging.set_verbosity(logging.WARNING)
  builders.setup_compilation_cache()
  from diffusion_jax.training import loop

  try:
    builders.run_training(FLAGS.config, FLAGS.workdir)
  except builders.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except loop.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
