"""The huge-page malloc switch: environment handling and the re-exec of a script."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from diffusion_jax import hugepages


def test_environment_adds_the_tunable_once_and_keeps_others():
  env = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}"
  assert env["A"] == "b"
  assert hugepages.environment(env)["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]
  assert hugepages.environment({})["GLIBC_TUNABLES"] == hugepages.TUNABLE


SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    from diffusion_jax import hugepages
    hugepages.reexec_with_hugepages()
    print(json.dumps([hugepages.active(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES")]))
""")


def run_script(tmp_path, env_extra):
  script = tmp_path / "script.py"
  script.write_text(SCRIPT.format(root=str(pathlib.Path(__file__).resolve().parent.parent)))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(env_extra)
  out = subprocess.run([sys.executable, str(script), "--flag=1", "two words"], env=env,
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout)


@pytest.mark.skipif(not hugepages.supported(), reason="no glibc >= 2.35 with THP here")
def test_script_is_reexecuted_with_its_arguments(tmp_path):
  active, argv, tunables = run_script(tmp_path, {})
  assert active and argv == ["--flag=1", "two words"] and tunables == hugepages.TUNABLE


def test_opt_out_leaves_the_process_alone(tmp_path):
  active, argv, tunables = run_script(tmp_path, {"DIFFUSION_JAX_HUGEPAGES": "0"})
  assert not active and argv == ["--flag=1", "two words"] and tunables is None
