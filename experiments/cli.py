"""How every script (experiments/*.py, benchmarks/*.py) reports what the user can fix: one
line ``error: ...`` on stderr and exit code 2, never a traceback.

* absl scripts: ``cli.run_main(main)`` instead of ``app.run(main)``: a bad flag (unknown,
  unparsable, missing, a config override naming no field) and a ``UserError`` raised by
  ``main`` both end as that line.
* argparse scripts: ``cli.ArgumentParser`` (its ``error`` prints that line, without the
  usage block) and ``cli.call_main(main)`` (a ``UserError`` from ``main`` likewise).

This module imports nothing heavy, so a bad flag fails before jax is even imported by it.
"""

from __future__ import annotations

import argparse
import re
import sys

# tests/cli_helpers.py: one_error_line checks for it.
USER_ERROR_EXIT_CODE = 2
# A SIGTERM (preemption) stop after its checkpoint (training.loop.Preempted): distinct
# from 0 (finished) and 2 (user error), so a retry wrapper knows to rerun.
PREEMPTED_EXIT_CODE = 3


class UserError(Exception):
  """Something the user can fix (flag, config, missing data or checkpoint); one-line
  message saying what is wrong and how to fix it."""


def exit_with_error(message) -> None:
  """Prints ``error: <message>`` (one line) on stderr and exits with code 2."""
  text = " ".join(str(message).split())  # a message never spans lines
  print(f"error: {text}", file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT_CODE)


def _schedule_hint(arg: str) -> str:
  """For a bad schedule argument: the arguments the schedule takes
  (--config.diffusion.schedule_kwargs.<name>.<misspelt>), or where they go (an argument
  given without its schedule: --config.diffusion.schedule_kwargs.start)."""
  found = re.search(r"((?:lowres_)?schedule_kwargs)\.(\w+)(\.|=|$)", arg)
  if not found:
    return ""
  from diffusion_jax.diffusion import schedules

  field, name = found.group(1), found.group(2)
  if name in schedules.NAMES:
    accepted = ", ".join(schedules.default_arguments(name))
    return f" Schedule {name!r} takes {accepted}."
  if found.group(3) == ".":
    return f" Schedules: {', '.join(schedules.NAMES)}."
  return (f" Each schedule's arguments have their own sub-dict: --config.diffusion.{field}."
          f"<schedule>.{name}=... (schedules: {', '.join(schedules.NAMES)}).")


def flag_error_line(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing the flags (a config file included),
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
            f"configs/common.py).{hint}{_schedule_hint(arg)}")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(error, OSError) and lines:  # the config file could not be loaded
    return f"{config_arg}: {lines[-1]}"
  if len(lines) > 1:  # "flag --config=...: Error whilst parsing config file:", traceback
    return f"{lines[0]} {lines[-1]}"
  return lines[0] if lines else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser for ``app.run(..., flags_parser=parse_flags)``: a bad flag is one
  line and exit 2 instead of absl's usage dump (or a config file's traceback)."""
  from absl import flags

  values = flags.FLAGS
  try:
    remaining = values(argv)
    for name in ("config",):  # config_flags reports a bad config file only on first use
      if name in values:
        getattr(values, name).get  # noqa: B018
    return remaining
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    exit_with_error(flag_error_line(e, argv))


def begin(argv: list[str]) -> None:
  """The start of every absl script's main: refuses stray arguments (an unquoted prompt
  would otherwise be dropped silently), keeps absl's INFO logging (orbax logs every save)
  off the console unless --verbosity asks, and turns on the persistent compilation
  cache."""
  if len(argv) > 1:
    raise UserError(f"Unexpected argument {argv[1]!r}: every setting is a --flag.")
  from absl import flags, logging

  if flags.FLAGS.verbosity == 0:
    logging.set_verbosity(logging.WARNING)
  import builders

  builders.setup_compilation_cache()


def run_main(main) -> None:
  """``app.run(main)`` with bad flags (``parse_flags``) and a ``UserError`` from ``main``
  reported as one line, exit 2; a training run stopped by SIGTERM exits 3."""
  from absl import app

  def guarded(argv):
    try:
      return main(argv)
    except UserError as e:
      exit_with_error(e)
    except Exception as e:
      # Only a script that trained can be preempted, so the loop module is loaded then.
      loop = sys.modules.get("diffusion_jax.training.loop")
      if loop is not None and isinstance(e, loop.Preempted):
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
      raise

  app.run(guarded, flags_parser=parse_flags)


def call_main(main, *args, **kwargs):
  """``main(*args, **kwargs)`` with a ``UserError`` reported as one line, exit 2 (for
  scripts whose flags ``ArgumentParser`` parses)."""
  try:
    return main(*args, **kwargs)
  except UserError as e:
    exit_with_error(e)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with a bad argument reported as ``error: <prog>: <message>`` (one line,
  exit 2) instead of the usage block and a second line."""

  def error(self, message):
    exit_with_error(f"{self.prog}: {message} (see --help).")


def read_png(path: str, what: str, resolution: int | None = None, mode: str = "RGB",
             resize: bool = True):
  """The image at ``path`` as uint8 [H, W(, C)] in PIL ``mode``, or a UserError naming
  ``what`` (e.g. "--image") when it is missing or unreadable. With ``resolution``, an image
  of another size is resized (nearest for masks, bilinear otherwise), or refused when not
  ``resize``."""
  import pathlib

  import numpy as np
  from PIL import Image, UnidentifiedImageError

  if not pathlib.Path(path).is_file():
    raise UserError(f"{what} {path} does not exist.")
  try:
    image = Image.open(path).convert(mode)
  except (UnidentifiedImageError, OSError) as e:
    raise UserError(f"{what} {path} is not a readable image ({e}).") from None
  if resolution and image.size != (resolution, resolution):
    if not resize:
      raise UserError(f"{what} is {image.size[0]}x{image.size[1]} px but the stage takes "
                      f"{resolution}x{resolution} px images; resize it first.")
    resample = Image.NEAREST if mode == "L" else Image.BILINEAR
    image = image.resize((resolution, resolution), resample)
  return np.asarray(image)
