"""The ablation harness's library: sweep expansion and naming, claim files (two processes
never hold one arm; a killed owner's claim is taken over), result tables and plots."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from local_cluster import env as subprocess_env

from diffusion_jax.ablation import claims, report
from diffusion_jax.ablation import sweep as sweep_lib

STAGES = {"base": "configs/demo_base.py", "sr": "configs/demo_sr.py"}


def test_product_of_axes_and_fixed_overrides():
  s = sweep_lib.Sweep.create(
      "w", STAGES, axes={"base.diffusion.weighting": ["uniform", "min_snr"],
                         "sample.guidance_scale": [1.0, 3.0, 5.0]},
      fixed={"base.train.num_steps": 10, "sample.guidance_scale": 2.0})
  arms = s.expand()
  assert len(arms) == 6
  assert [a.name for a in arms[:3]] == ["weighting=uniform,guidance_scale=1",
                                        "weighting=uniform,guidance_scale=3",
                                        "weighting=uniform,guidance_scale=5"]
  # The fixed override is in every arm, and an axis overrides a fixed value.
  assert all(a.value("base.train.num_steps") == 10 for a in arms)
  assert arms[1].sample_overrides == {"guidance_scale": 3.0}
  # Arms differing only in sampling settings share their training run; the weighting
  # axis gives two base runs and one sr run (the sr stage has no override).
  assert len({a.train_name for a in arms}) == 2
  assert {s.stage_run_name(a, "base") for a in arms} == {"weighting=uniform",
                                                         "weighting=min_snr"}
  assert {s.stage_run_name(a, "sr") for a in arms} == {"default"}
  assert s.stage_overrides(arms[3], "base") == {"train.num_steps": 10,
                                                "diffusion.weighting": "min_snr"}


def test_explicit_arms_and_stage_sets():
  s = sweep_lib.Sweep.create(
      "c", {**STAGES, "base64": "configs/demo_base.py"},
      stage_sets={"cascade": ["base", "sr"], "single": ["base64"]},
      arms=[{"stages": "cascade"}, {"stages": "single", "base64.data.resolution": 64}])
  arms = s.expand()
  assert [s.stages_of(a) for a in arms] == [("base", "sr"), ("base64",)]
  assert arms[0].name == "stages=cascade"
  assert arms[1].name == "stages=single,resolution=64"


@pytest.mark.parametrize("kwargs,message", [
    (dict(axes={"diffusion.weighting": ["uniform"]}), "'diffusion' is not a stage"),
    (dict(axes={"weighting": ["uniform"]}), "must be '<stage>.<config field>'"),
    (dict(axes={"base.diffusion.weighting": []}), "has no values"),
    (dict(axes={"sample.steps": [5, 5]}), "repeats a value"),
    (dict(axes={"stages": ["nope"]}), "stages='nope' is not a stage set"),
    (dict(), "declares no axes and no arms"),
    (dict(stage_sets={"x": ["base", "ghost"]}, axes={"sample.steps": [1]}),
     "names stages ['ghost']"),
])
def test_bad_declarations_are_refused_in_one_line(kwargs, message):
  with pytest.raises(sweep_lib.SweepError) as e:
    sweep_lib.Sweep.create("bad", STAGES, **kwargs)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_arm_names_stay_distinct_when_long_or_ambiguous():
  s = sweep_lib.Sweep.create("n", STAGES, axes={"base.train.seed": [0, 1],
                                                "sr.train.seed": [0, 1]})
  names = [a.name for a in s.expand()]
  assert len(set(names)) == 4  # two fields named "seed": hashed apart


def test_claim_is_exclusive_and_released(tmp_path):
  first = claims.try_claim(tmp_path / "arm")
  assert first is not None
  assert claims.try_claim(tmp_path / "arm") is None
  first.release()
  again = claims.try_claim(tmp_path / "arm")
  assert again is not None
  again.release()


def test_stale_heartbeat_is_taken_over(tmp_path):
  (tmp_path / "arm").mkdir()
  record = {"host": "another-host", "pid": 1, "heartbeat": time.time() - 1000, "token": "x"}
  (tmp_path / "arm" / claims.CLAIM_FILE).write_text(json.dumps(record))
  taken = claims.try_claim(tmp_path / "arm", lease_s=60)
  assert taken is not None
  taken.release()
  # A fresh heartbeat from another host (whose pid cannot be checked here) is respected.
  record["heartbeat"] = time.time()
  (tmp_path / "arm" / claims.CLAIM_FILE).write_text(json.dumps(record))
  assert claims.try_claim(tmp_path / "arm", lease_s=60) is None


_CLAIMER = """
import os, sys, time
from diffusion_jax.ablation import claims
root, me = sys.argv[1], sys.argv[2]
for i in range(40):
    c = claims.try_claim(f"{root}/arm{i}", worker=me)
    if c is None:
        continue
    with c:  # as ablate.py does: a finished arm is skipped under its claim
        if os.path.exists(f"{root}/arm{i}/done"):
            continue
        with open(f"{root}/arm{i}/ran_by_{me}", "w") as f:
            f.write("x")
        time.sleep(0.01)
        open(f"{root}/arm{i}/done", "w").close()
"""

_HOLDER = """
import sys, time
from diffusion_jax.ablation import claims
c = claims.try_claim(sys.argv[1], lease_s=3600)
print("claimed", flush=True)
time.sleep(600)
"""


def test_two_processes_never_run_the_same_arm(tmp_path):
  procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(tmp_path), name],
                            env=subprocess_env()) for name in ("a", "b")]
  for p in procs:
    assert p.wait(timeout=120) == 0
  for i in range(40):
    ran = sorted(f.name for f in (tmp_path / f"arm{i}").glob("ran_by_*"))
    assert len(ran) == 1, (i, ran)


def test_a_killed_owners_claim_is_taken_over(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "arm")],
                            env=subprocess_env(), stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "claimed"
  assert claims.try_claim(tmp_path / "arm", lease_s=3600) is None  # alive: refused
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  claim = claims.try_claim(tmp_path / "arm", lease_s=3600)
  assert claim is not None and claim.record["pid"] == os.getpid()
  claim.release()


def _record(name, scale, acc, fd):
  return {"name": name, "overrides": [["sample.guidance_scale", scale]],
          "varying": ["sample.guidance_scale"],
          "train": {"base": {"workdir": "w", "steps": 10, "minutes": 1.5}},
          "metrics": {"accuracy": {"value": acc, "low": acc - 0.1, "high": acc + 0.1},
                      "fd_probe": {"value": fd, "low": None, "high": None}}}


def test_tables_and_plots(tmp_path):
  records = [_record("g1", 1.0, 0.5, 3.0), _record("g3", 3.0, 0.8, 4.0),
             _record("g5", 5.0, 0.7, 6.0)]
  md, csv_path = report.write_tables(tmp_path, records)
  lines = md.read_text().splitlines()
  assert lines[0] == ("| arm | sample.guidance_scale | train_steps | train_minutes | accuracy "
                      "| fd_probe |")
  assert lines[3] == "| g3 | 3 | 10 | 1.5 | 0.8 [0.7, 0.9] | 4 |"
  rows = csv_path.read_text().splitlines()
  assert rows[0].endswith("accuracy,accuracy_low,accuracy_high,fd_probe,fd_probe_low,"
                          "fd_probe_high")
  assert rows[2].split(",")[-6:-3] == ["0.8", "0.7000000000000001", "0.9"]
  for path in (report.plot_metric_vs_axis(records, "sample.guidance_scale", "accuracy",
                                          tmp_path / "a.png"),
               report.plot_pareto(records, "fd_probe", "accuracy", "sample.guidance_scale",
                                  tmp_path / "p.png"),
               report.plot_curves({"x": [(0, 1.0), (1, 0.5)]}, "step", "loss",
                                  tmp_path / "c.png")):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front():
  points = [(3.0, 0.5), (4.0, 0.8), (6.0, 0.7), (5.0, 0.9), (2.0, 0.4)]
  # Lower x and higher y are better: (6, 0.7) is dominated by (4, 0.8) and (5, 0.9).
  assert report.pareto_front(points) == [(2.0, 0.4), (3.0, 0.5), (4.0, 0.8), (5.0, 0.9)]
  assert report.pareto_front(points, lower_x_is_better=False) == [(5.0, 0.9), (6.0, 0.7)]


# ---------------------------------------------------------------------------------------
# experiments/ablate.py: the shipped sweeps check; a two-arm sweep of a tiny stage runs,
# reports, skips its finished arms and resumes one whose worker was killed.

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

# demo_base:smoke at 8 px with the offline T5: trains in seconds.
TINY_FIXED = """{
    "base.data.resolution": 8,
    "base.diffusion.schedule_kwargs.shifted_cosine.resolution": 8,
    "base.diffusion.schedule_kwargs.shifted_cosine.base_resolution": 8,
    "base.text.encoder": "t5-offline", "base.text.max_length": 32, "base.text.cache_dir": "",
    "base.train.batch_size": 4, "base.train.num_steps": 2, "base.train.preview_every": 0,
    "base.data.data_dir": %r, "sample.steps": 2}"""

SWEEP = """def get_config():
  return {"name": "tiny", "stages": {"base": "configs/demo_base.py:smoke"},
          "fixed": %s, "axes": {%s: [1.0, 2.0]},
          "evaluate": {"categories": ["colour_shape"], "images_per_prompt": 1,
                       "fd_images": 0, "batch_size": 48, "probe_path": %r}}
"""


def _sweep_file(tmp_path, axis='"sample.guidance_scale"'):
  import probe_helpers

  _, probe_path = probe_helpers.tiny_probe()
  path = tmp_path / "tiny_sweep.py"
  path.write_text(SWEEP % (TINY_FIXED % str(tmp_path / "data"), axis, str(probe_path)))
  return path


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "sweeps").glob(
    "*.py") if p.stem != "__init__"))
def test_shipped_sweeps_plan_without_errors(name):
  import ablation_runner

  ablation_runner.run(f"configs/sweeps/{name}.py", "unused", dry_run=True, log=lambda m: None)


@pytest.mark.parametrize("axis,message", [
    ('"base.diffusion.weightin"', "axis 'base.diffusion.weightin': the config has no field"),
    ('"sample.sampler"', "arm guidance_scale"),  # a value no sampler has (below)
])
def test_a_bad_axis_is_refused_before_anything_runs(tmp_path, axis, message):
  from cli_helpers import one_error_line

  sweep = _sweep_file(tmp_path, axis)
  if axis == '"sample.sampler"':  # sampler names 1.0 and 2.0 do not exist
    message = "--sampler=1.0"
  r = subprocess.run([sys.executable, str(ROOT / "experiments" / "ablate.py"),
                      f"--sweep={sweep}", f"--root={tmp_path / 'runs'}"],
                     capture_output=True, text=True, timeout=600, env=subprocess_env())
  assert message in one_error_line(r)
  assert not (tmp_path / "runs").exists()


def test_two_arm_sweep_runs_reports_skips_and_resumes(tmp_path):
  import ablation_runner

  sweep = _sweep_file(tmp_path)
  logs = []
  records = ablation_runner.run(str(sweep), str(tmp_path / "runs"), log=logs.append)
  root = tmp_path / "runs" / "tiny"
  assert [r["name"] for r in records] == ["guidance_scale=1", "guidance_scale=2"]
  # One training run shared by both arms (they differ only in a sampling setting).
  assert [p.name for p in (root / "train" / "base").iterdir()] == ["default"]
  assert sum("training" in m for m in logs) == 1
  for r in records:
    assert 0.0 <= r["metrics"]["colour_shape"]["value"] <= 1.0
    assert r["metrics"]["colour_shape"]["low"] <= r["metrics"]["colour_shape"]["value"]
    assert r["train"]["base"]["steps"] == 2
  table = (root / "results.md").read_text().splitlines()
  assert len(table) == 4 and table[2].startswith("| guidance_scale=1 | 1 | 2 |")
  assert (root / "plots" / "colour_shape_vs_guidance_scale.png").stat().st_size > 0
  assert (root / "plots" / "loss_curves.png").stat().st_size > 0
  # Re-running finds every arm finished and runs nothing.
  stamps = {p: p.stat().st_mtime_ns for p in root.rglob("result.json")}
  logs.clear()
  ablation_runner.run(str(sweep), str(tmp_path / "runs"), log=logs.append)
  assert logs[0] == "arms: 2 done, 0 running elsewhere, 0 left"
  assert {p: p.stat().st_mtime_ns for p in root.rglob("result.json")} == stamps
  # A worker killed in the middle of an arm leaves its claim and no result: the next run
  # takes the dead worker's claim over and finishes that arm alone.
  arm = root / "arms" / "guidance_scale=2"
  (arm / "result.json").unlink()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (arm / claims.CLAIM_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time(),
       "token": "dead"}))
  logs.clear()
  records = ablation_runner.run(str(sweep), str(tmp_path / "runs"), log=logs.append)
  assert logs[0] == "arms: 1 done, 1 running elsewhere, 0 left"
  assert [m for m in logs if m.startswith("evaluating")] == ["evaluating guidance_scale=2"]
  assert not any(m.startswith("training") for m in logs)
  assert len(records) == 2 and (arm / "result.json").exists()
  # --report --export copies what docs/ keeps: tables, plots, each arm's result and examples.
  docs = tmp_path / "docs"
  ablation_runner.run(str(sweep), str(tmp_path / "runs"), report_only=True, export=str(docs),
                      log=lambda m: None)
  assert (docs / "results.md").read_text() == (root / "results.md").read_text()
  assert (docs / "plots" / "colour_shape_vs_guidance_scale.png").exists()
  assert sorted(p.name for p in (docs / "arms" / "guidance_scale=2").iterdir()) == [
      "examples.png", "result.json"]


def test_equal_compute_sets_each_arms_steps_from_its_step_flops(tmp_path):
  import ablation_runner
  import evaluation_adapter
  import train_flops
  from builders import UserError

  # Two arms of different batch sizes: the budget buys the smaller batch more steps.
  sweep = sweep_lib.Sweep.create(
      "flops", {"base": "configs/demo_base.py:smoke"},
      axes={"base.train.batch_size": [4, 8]},
      fixed={"base.data.resolution": 8, "base.text.encoder": "t5-offline",
             "base.text.max_length": 32, "base.text.cache_dir": "",
             "base.diffusion.schedule_kwargs.shifted_cosine.resolution": 8,
             "base.train.time_budget_s": 60.0})
  evaluator = evaluation_adapter.ShapesEvaluator({})
  plain = ablation_runner.plan(sweep, evaluator)
  per_step = [train_flops.step_gflop(p["configs"]["base"]) for p in plain]
  assert 1.6 < per_step[1] / per_step[0] < 2.1  # twice the batch, about twice the FLOPs
  budget = 10.5 * per_step[0] / 1e3  # TFLOP: 10 steps of the small batch
  planned = ablation_runner.plan(sweep, evaluator, {"base": budget})
  steps = [p["configs"]["base"].train.num_steps for p in planned]
  assert steps == [10, int(budget * 1e3 // per_step[1])] and steps[1] in (5, 6)
  assert all(p["configs"]["base"].train.time_budget_s is None for p in planned)
  assert planned[1]["compute"]["base"] == {"gflop_per_step": per_step[1],
                                           "budget_tflop": budget}
  for bad, message in [({"sr": 1.0}, "'sr' is not a stage of this sweep"),
                       ({"base": -1}, "give a positive number of TFLOP"),
                       ({"base": 1e-9}, "less than one train step"),
                       (5.0, "give {stage: TFLOP per training run}")]:
    with pytest.raises(UserError, match=message):
      ablation_runner.plan(sweep, evaluator, bad)


def test_the_table_states_each_arms_model_flops():
  records = [_record("g1", 1.0, 0.5, 3.0), _record("g3", 3.0, 0.8, 4.0)]
  records[0]["train"]["base"]["train_tflop"] = 1.25
  header, rows = report.table_rows(records)
  assert header[2:5] == ["train_steps", "train_minutes", "train_tflop"]
  assert [r[4] for r in rows] == ["1.25", "-"]


def _sampler_record(sampler, steps, score):
  return {"name": f"{sampler}{steps}", "varying": ["sample.sampler", "sample.steps"],
          "overrides": [["sample.sampler", sampler], ["sample.steps", steps]],
          "train": {}, "metrics": {"colour_shape": {"value": score}}}


def test_cheapest_cost_within_the_reference():
  records = [_sampler_record("ddim", 250, 0.80),
             _sampler_record("ddim", 5, 0.50), _sampler_record("ddim", 10, 0.77),
             _sampler_record("ddim", 25, 0.74), _sampler_record("ddim", 50, 0.79),
             _sampler_record("euler", 5, 0.78), _sampler_record("euler", 10, 0.9),
             _sampler_record("heun", 5, 0.1), _sampler_record("heun", 10, 0.2)]
  lines = report.within_reference(records, "colour_shape",
                                  {"sample.sampler": "ddim", "sample.steps": 250},
                                  "sample.sampler", "sample.steps", 0.05)
  assert "Reference (sampler=ddim, steps=250): colour_shape = 0.8; bar 0.76." in lines
  rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in lines
          if line.startswith("| ") and "cheapest" not in line}
  # ddim at 10 passes (0.77) but 25 falls below the bar (0.74): the answer is 50, the
  # cheapest from which every larger step count stays within 5%.
  assert rows == {"ddim": "50", "euler": "5", "heun": "none tested"}
  # Without the reference arm there is nothing to compare with.
  assert report.within_reference(records[1:], "colour_shape",
                                 {"sample.sampler": "ddim", "sample.steps": 250},
                                 "sample.sampler", "sample.steps") == []
  # The table gets a sample_minutes column once records carry the evaluation's own time.
  records[0]["sample_minutes"] = 1.25
  header, rows = report.table_rows(records)
  assert header[5] == "sample_minutes" and rows[0][5] == "1.25" and rows[1][5] == "-"
