"""Shared by the tests that run experiments/*.py as commands."""

import subprocess

# experiments/train.py and experiments/sample.py exit with this after printing a user error
# (builders.UserError, a bad flag) as one "error: ..." line.
USER_ERROR_EXIT_CODE = 2
# experiments/train.py exits with this after a SIGTERM stop that saved a checkpoint.
PREEMPTED_EXIT_CODE = 3


def one_error_line(r: subprocess.CompletedProcess) -> str:
  """Asserts that the command failed as on a user error: exit code 2, no traceback and
  exactly one line starting "error: " on stderr. Returns that line."""
  assert r.returncode == USER_ERROR_EXIT_CODE, (r.returncode, r.stdout[-2000:],
                                                r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  return errors[0]
