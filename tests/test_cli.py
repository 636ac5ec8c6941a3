"""The scripts' command lines: every noise schedule (and low-res augmentation schedule)
reachable with its own arguments, the same schedule at training and at sampling, and
every script's bad flag as one error line with exit code 2 (experiments/cli.py).

Cheap by design: configs are parsed and checked, nothing is trained or compiled; the
scripts run as subprocesses only where absl's global flags need a process of their own.
"""

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from cli_helpers import one_error_line
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import builders  # noqa: E402
import cli  # noqa: E402
import sampling  # noqa: E402

from diffusion_jax.diffusion import schedules  # noqa: E402

# A non-default value of one argument per schedule (so a dropped argument shows).
CHANGED = {"linear": ("beta_end", 0.03), "cosine": ("s", 0.02), "sigmoid": ("start", -2.0),
           "shifted_cosine": ("resolution", 16)}
T = np.linspace(0.0, 1.0, 9, dtype=np.float32)


def test_every_schedule_has_a_changed_argument_here():
  assert set(CHANGED) == set(schedules.NAMES)  # a new schedule must be added to CHANGED


def _parse(config_file, *overrides):
  """The config train.py gets for these command-line overrides (a locked config)."""
  argv = ["train.py", f"--config={ROOT / config_file}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)  # (overrides are read from argv here)
  values(argv)
  return values.config


def _logsnr(schedule):
  return np.asarray(schedule.logsnr(T))


@pytest.mark.parametrize("name", schedules.NAMES)
def test_every_schedule_trains_and_samples_with_its_own_arguments(name):
  arg, value = CHANGED[name]
  config = _parse("configs/demo_base.py:smoke", f"--config.diffusion.schedule={name}",
                  f"--config.diffusion.schedule_kwargs.{name}.{arg}={value}")
  own = _parse("configs/demo_base.py:smoke").diffusion.schedule_kwargs[name].to_dict()
  expected = schedules.get(name, **{**own, arg: value})
  assert not np.allclose(_logsnr(expected), _logsnr(schedules.get(name)))
  trained = builders.diffusion_settings(config).schedule
  np.testing.assert_array_equal(_logsnr(trained), _logsnr(expected))
  # Sampling builds its StageSpec from the workdir's config.json (config.to_dict()).
  saved = sampling.ml_collections.ConfigDict(config.to_dict())
  _, spec = sampling.workdir_stage_spec("run", saved, None)
  np.testing.assert_array_equal(_logsnr(spec.noise_schedule()), _logsnr(expected))
  assert dict(spec.schedule_kwargs)[arg] == value
  assert spec.grid().shape == (spec.num_steps + 1,)


@pytest.mark.parametrize("name", schedules.NAMES)
def test_every_lowres_schedule_with_its_own_arguments(name):
  arg, value = CHANGED[name]
  config = _parse("configs/demo_sr.py:smoke", f"--config.diffusion.lowres_schedule={name}",
                  f"--config.diffusion.lowres_schedule_kwargs.{name}.{arg}={value}")
  own = _parse("configs/demo_sr.py:smoke").diffusion.lowres_schedule_kwargs[name].to_dict()
  expected = schedules.get(name, **{**own, arg: value})
  trained = builders.diffusion_settings(config).lowres_schedule
  np.testing.assert_array_equal(_logsnr(trained), _logsnr(expected))
  saved = sampling.ml_collections.ConfigDict(config.to_dict())
  _, spec = sampling.workdir_stage_spec("run", saved, 32)
  sampled = schedules.get(spec.lowres_schedule, **dict(spec.lowres_schedule_kwargs))
  np.testing.assert_array_equal(_logsnr(sampled), _logsnr(expected))


def test_a_config_json_of_the_older_flat_layout_still_samples():
  config = _parse("configs/demo_base.py:smoke")
  old = config.to_dict()
  old["diffusion"]["schedule_kwargs"] = {"resolution": 32, "base_resolution": 64}
  _, spec = sampling.workdir_stage_spec("run", sampling.ml_collections.ConfigDict(old), None)
  assert dict(spec.schedule_kwargs) == {"resolution": 32, "base_resolution": 64}


def _run(script, *args):
  return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                        text=True, timeout=600, cwd=ROOT)


def test_a_misspelt_schedule_argument_names_the_schedules_arguments():
  line = one_error_line(_run("experiments/train.py", "--config=configs/demo_base.py:smoke",
                             "--workdir=/nonexistent/run",
                             "--config.diffusion.schedule=sigmoid",
                             "--config.diffusion.schedule_kwargs.sigmoid.strat=-3"))
  assert "--config.diffusion.schedule_kwargs.sigmoid.strat=-3: the config has no field " \
         "'strat'" in line, line
  assert 'Did you mean "start"' in line
  assert "Schedule 'sigmoid' takes start, end, tau, logsnr_min, logsnr_max." in line


@pytest.mark.parametrize("override,hint", [
    ("--config.diffusion.schedule_kwargs.start=-3", "Each schedule's arguments have their "
     "own sub-dict: --config.diffusion.schedule_kwargs.<schedule>.start=... (schedules: "
     "linear, cosine, sigmoid, shifted_cosine)."),
    ("--config.diffusion.lowres_schedule_kwargs.cosine.tau=2", "Schedule 'cosine' takes "
     "num_timesteps, s, max_beta."),
])
def test_a_schedule_argument_in_the_wrong_place_says_where_it_goes(override, hint):
  argv = ["train.py", "--config=configs/demo_sr.py", override]
  with pytest.raises(AttributeError) as e:
    _parse("configs/demo_sr.py", override)
  line = cli.flag_error_line(e.value, argv)
  assert line.startswith(f"{override}: the config has no field") and line.endswith(hint), line


# absl scripts: each bad flag fails while flags are parsed or checked, before any
# workdir, dataset or checkpoint is looked at (none of these exist).
@pytest.mark.parametrize("script,args,message", [
    ("experiments/sample.py", ["--workdirs=a", "--prompts=x"],
     "Flag --outdir must have a value other than None"),
    ("experiments/sample.py", ["--workdirs=a", "--prompts=x", "--outdir=o", "--seed=abc"],
     "flag --seed=abc"),
    ("experiments/sample.py", ["--workdirs=a,b", "--prompts=x", "--outdir=o",
                               "--steps=abc"], "--steps=abc: not a list of integers"),
    ("experiments/demo.py", ["--steps=abc"], "flag --steps=abc"),
    ("experiments/demo.py", ["--base_minutes=-1"], "--base_minutes=-1.0; it must be positive"),
    ("experiments/demo.py", ["--eval_images_per_prompt=-1"],
     "--eval_images_per_prompt=-1; it must be >= 0"),
    ("benchmarks/train.py", ["--config=configs/demo_base.py:smoke", "--steps=0"],
     "--steps=0; time at least 1 step"),
])
def test_absl_scripts_report_a_bad_flag_in_one_line(script, args, message):
  line = one_error_line(_run(script, *args))
  assert message in line, line


# The same checks of sample_cascade (what sample.py calls with its flags), in this process.
@pytest.mark.parametrize("changes,message", [
    (dict(guidance_scale="x"), "--guidance_scale=x: not a list of numbers"),
    (dict(grid="fast"), "--grid=fast: unknown 'fast'; choose one of uniform, leading, "
     "trailing, linspace, karras"),
    (dict(sampler=["ddim", "ddpn"]), "--sampler=ddim,ddpn: unknown 'ddpn'; choose one of"),
    (dict(variance="tiny"), "--variance=tiny: unknown 'tiny'; choose one of small, large"),
    (dict(guidance_schedule="step"), "unknown 'step'; choose one of constant, linear, cosine"),
    (dict(eta=["0.1", "0.2", "0.3"]), "--eta needs 1 or 2 values (one per stage), got 3"),
    (dict(rho="high"), "--rho=high: not a list of numbers"),
])
def test_sampling_values_fail_before_any_workdir_is_read(tmp_path, changes, message):
  with pytest.raises(cli.UserError) as e:
    sampling.sample_cascade(workdirs=["a", "b"], prompts=["x"], outdir=tmp_path / "out",
                            **changes)
  assert message in str(e.value), e.value
  assert not (tmp_path / "out").exists()


def _load(script, monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (their `import common`)
  spec = importlib.util.spec_from_file_location(f"script_{pathlib.Path(script).stem}",
                                                ROOT / script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Done:
  def __init__(self, returncode, stderr):
    self.returncode, self.stderr, self.stdout = returncode, stderr, ""


# argparse scripts, in this process (their modules import nothing new for the suite).
@pytest.mark.parametrize("script,args,message", [
    ("benchmarks/sample.py", ["--batch", "x"], "invalid int value: 'x'"),
    ("benchmarks/sample.py", ["--batch", "0"], "--batch and --repeats must be >= 1"),
    ("benchmarks/sample.py", ["--steps", "ddim=x"], "--steps 'ddim=x': use sampler=N"),
    ("benchmarks/samplers.py", ["--steps", "0"], "must be >= 1"),
    ("benchmarks/text.py", ["--encoders", "t5-huge"], "unknown encoder 't5-huge'"),
    ("benchmarks/unet.py", ["--dtype", "float16"], "invalid choice: 'float16'"),
    ("benchmarks/data.py", ["--stages", "demo_xl"], "unknown stage 'demo_xl'"),
    ("benchmarks/peer_imagen_pytorch.py", ["--batch", "many"], "invalid int value: 'many'"),
])
def test_argparse_scripts_report_a_bad_flag_in_one_line(script, args, message, monkeypatch,
                                                        capsys):
  module = _load(script, monkeypatch)
  monkeypatch.setattr(sys, "argv", [script, *args])
  with pytest.raises(SystemExit) as exit_:
    cli.call_main(module.main)
  line = one_error_line(_Done(exit_.value.code, capsys.readouterr().err))
  assert message in line, line


def test_a_user_error_is_one_line_even_if_its_message_is_not(capsys):
  def main():
    raise cli.UserError("first line\nsecond line")

  with pytest.raises(SystemExit) as exit_:
    cli.call_main(main)
  assert one_error_line(_Done(exit_.value.code, capsys.readouterr().err)) == \
      "error: first line second line"
