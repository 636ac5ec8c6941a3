"""Runs a few local processes together, e.g. as one JAX cluster over gloo, for the
multi-process tests."""

import os
import pathlib
import socket
import subprocess

import jax

TESTS = pathlib.Path(__file__).resolve().parent


def env(**extra) -> dict:
  """The environment for a test subprocess: this one's, plus ``extra``, with tests/ and the
  repository on PYTHONPATH, JAX on the CPU, and the suite's compilation cache (conftest.py)
  passed on unless already set."""
  result = dict(os.environ, **extra)
  result["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent),
                                          result.get("PYTHONPATH", "")])
  result.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")
  result["JAX_PLATFORMS"] = "cpu"
  return result


def free_port() -> int:
  """A TCP port nobody listens on right now (for a coordinator on 127.0.0.1)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_together(commands: list[list[str]], env: dict, timeout: float) -> list[tuple[str, str]]:
  """Starts every command at once and waits for all of them; the ones still running after
  ``timeout`` (one may block on a peer that died) are killed. Asserts that each exited 0,
  showing the ends of their outputs if not. Returns each one's (stdout, stderr)."""
  procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for command in commands]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(
      (out + err)[-3000:] for out, err in outputs)
  return outputs
