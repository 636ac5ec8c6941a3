r"""Runs a sweep declared in a config file: arms trained, evaluated, resumed and reported.

  python experiments/ablate.py --sweep=configs/sweeps/guidance.py --root=runs/sweeps
  python experiments/ablate.py --sweep=configs/sweeps/guidance.py --root=runs/sweeps --report

A sweep file's ``get_config()`` returns a dict (override paths have dots, which ConfigDict
keys cannot) holding: ``stages`` (stage name -> config file),
optionally ``stage_sets`` (name -> stage names, base first), ``axes`` (path -> values,
their product) and/or ``arms`` (explicit override dicts), ``fixed`` (overrides of every
arm), ``evaluate`` (ShapesEval settings of every arm) and ``report`` (plots). Paths are
``<stage>.<config field>`` (training) or ``sample.<setting>`` (evaluation only); arms
that differ only in ``sample.*`` share their training runs, and a stage's training run
depends only on its own overrides.

Layout under ``<root>/<sweep name>/``: ``train/<stage>/<run>/`` (training workdirs),
``arms/<arm>/`` (``result.json``, the evaluation's files), ``results.{csv,md}`` and
``plots/``. A finished arm (its result.json exists) is never run again; an interrupted
sweep (kill -9 included) continues where it stopped; several workers (processes or
hosts on a shared filesystem) may run the same command at once: each arm and each
training run is claimed by one of them (diffusion_jax.ablation.claims). A bad axis name
or value is refused before anything runs, in one line naming it (exit 2).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import cli  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("sweep", None, "Sweep config file (configs/sweeps/<name>.py).")
flags.DEFINE_string("root", "runs/sweeps", "Where sweeps write (<root>/<sweep name>/).")
flags.DEFINE_bool("report", False, "Only regenerate tables and plots from the arms' files.")
flags.DEFINE_bool("dry_run", False, "List the arms and their training runs, run nothing.")
flags.DEFINE_string("worker", "", "A name for this worker in claim files and logs.")
flags.DEFINE_integer("max_arms", None, "Stop after finishing this many arms.")
flags.DEFINE_string("export", None, "Also copy the report (tables, plots, each arm's "
                    "result.json and examples.png) to this directory, e.g. docs/ablations/x.")
flags.mark_flags_as_required(["sweep"])


def main(argv):
  cli.begin(argv)
  import ablation_runner

  ablation_runner.run(FLAGS.sweep, FLAGS.root, report_only=FLAGS.report,
                      dry_run=FLAGS.dry_run, worker=FLAGS.worker, max_arms=FLAGS.max_arms,
                      export=FLAGS.export)


if __name__ == "__main__":
  cli.run_main(main)
