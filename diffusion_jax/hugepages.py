"""Transparent huge pages for XLA:CPU's buffers: a start-up switch for CPU hosts.

Why: XLA:CPU allocates each executable's temporaries with malloc on every call, and glibc
serves large requests with fresh ``mmap``s that it returns to the kernel on free. So every
train step touches its activations on brand-new 4 KiB pages, and the kernel zero-fills
each one on first touch. Measured on the 2-core development machine: writing one
[16, 8, 1024, 1024] float32 attention-score tensor (537 MB) took 581 ms with 131k minor
page faults, 190 ms with 768 faults when glibc backs its mmaps with transparent huge
pages, against 111 ms for the same exp() fused into a reduction that writes nothing.
At 64 px a train step touches gigabytes of temporaries, so this is a large share of it
(see README, "Measured").

glibc (2.35+) does that when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` and the
kernel's THP mode is ``madvise`` or ``always``. Tunables are read once, when the process
starts, so ``reexec_with_hugepages()`` re-executes the current command with the tunable
set; experiment scripts and benchmarks call it before importing JAX. It does nothing when
the tunable is already set, on non-Linux or non-glibc systems, when THP is ``never``, or
when ``DIFFUSION_JAX_HUGEPAGES=0``. Accelerator hosts are unaffected apart from their host
buffers.
"""

from __future__ import annotations

import os
import pathlib
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (ValueError, OSError, AttributeError):
    return None


def _thp_available() -> bool:
  try:
    return "[never]" not in _THP_MODE.read_text()
  except OSError:
    return False


def supported() -> bool:
  """True when this host's glibc and kernel can back malloc with transparent huge pages."""
  version = _glibc_version()
  return sys.platform == "linux" and version is not None and version >= (2, 35) and (
      _thp_available())


def active() -> bool:
  """True when this process was started with the huge-page malloc tunable."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
  """A copy of ``env`` (default: os.environ) with the tunable added to GLIBC_TUNABLES."""
  env = dict(os.environ if env is None else env)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  if TUNABLE not in tunables:
    tunables.append(TUNABLE)
  env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def reexec_with_hugepages() -> None:
  """Re-executes the running Python command with huge-page malloc, if useful and allowed.

  Call it first thing in a script's ``__main__`` (before JAX starts threads). Returns
  without doing anything when the tunable is already active or cannot help here.
  """
  if active() or os.environ.get("DIFFUSION_JAX_HUGEPAGES", "1") == "0" or not supported():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment())
