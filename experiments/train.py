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
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # for configs/

import builders  # noqa: E402
import cli  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

PREEMPTED_EXIT_CODE = cli.PREEMPTED_EXIT_CODE  # SIGTERM after its checkpoint: rerun

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and previews.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.begin(argv)
  builders.run_training(FLAGS.config, FLAGS.workdir)  # UserError / Preempted: cli.run_main


if __name__ == "__main__":
  cli.run_main(main)  # bad flags and config values: one line, exit 2
