"""benchmarks/convergence.py: two tiny arms trained with ShapesEval inside training (the tiny
test probe) -> table, CSV and plot; a rerun only re-plots; changed settings and bad input are
refused in one line; the training-time accounting and the budget stop on fabricated logs."""

import csv
import json
import pathlib
import re
import subprocess
import sys

import probe_helpers
import pytest
from cli_helpers import one_error_line
from local_cluster import env as subprocess_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "convergence.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "experiments"))

import convergence  # noqa: E402
from cli import UserError  # noqa: E402

from diffusion_jax.training import workdir_lock  # noqa: E402

# demo_base:smoke at 8 px with the offline T5 (test_ablation's tiny stage: its compiled
# train step is in the compilation cache).
TINY = {"data.resolution": "8", "diffusion.schedule_kwargs.shifted_cosine.resolution": "8",
        "diffusion.schedule_kwargs.shifted_cosine.base_resolution": "8",
        "text.encoder": "t5-offline", "text.max_length": "32", "text.cache_dir": "",
        "train.batch_size": "4"}


def _overrides(label, data_dir, **extra):
  fields = {**TINY, "data.data_dir": str(data_dir), **extra}
  return [f"{label}.{k}={v}" for k, v in fields.items()]


def _run(out, data_dir, images_per_prompt=1, log=None):
  _, probe_path = probe_helpers.tiny_probe()
  arms = convergence.parse_arms(
      ["a=configs/demo_base.py:smoke", "b=configs/demo_base.py:smoke"],
      # b: its own override beats the benchmark's --steps.
      _overrides("a", data_dir) + _overrides("b", data_dir, **{"train.num_steps": "1"}))
  return convergence.run(arms=arms, out=out, minutes=None, steps=2, eval_every=1,
                         images_per_prompt=images_per_prompt, eval_steps=2,
                         probe_path=probe_path, runs=out.parent / "runs",
                         log=(log if log is not None else []).append)


def test_two_arms_table_plot_rerun_and_changed_settings(tmp_path):
  out, logs = tmp_path / "conv", []
  records = _run(out, tmp_path / "data", log=logs)
  assert [r["label"] for r in records] == ["a", "b"]
  for r, steps in zip(records, ([1, 2], [1]), strict=True):
    assert r["stopped_by"] == "train.num_steps"
    assert r["first_interval"]["steps"] == 1  # log_every: gcd(1, eval_every)
    points = r["points"]
    assert [p["step"] for p in points] == steps
    minutes = [p["train_minutes"] for p in points]
    assert 0 < minutes[0] <= minutes[-1] < r["wall_minutes"]
    for p in points:
      assert (p["n"], p["held_out_n"]) == (48, 6)
      assert p["ci_low"] <= p["accuracy"] <= p["ci_high"]
      assert p["accuracy"] == p["correct"] / 48
    # The loop logged the same scores (its evaluator's scalars) at the same steps.
    lines = [json.loads(s) for s in
             (tmp_path / "runs" / r["label"] / "metrics.jsonl").read_text().splitlines()]
    logged = [(x["step"], x["eval/colour_shape/all"]) for x in lines
              if "eval/colour_shape/all" in x]
    assert logged == [(p["step"], p["accuracy"]) for p in points]
  table = (out / "convergence.md").read_text().splitlines()
  body = [line for line in table if line.startswith("| a |") or line.startswith("| b |")]
  assert [line.split(" | ")[:2] for line in body] == [["| a", "1"], ["| a", "2"], ["| b", "1"]]
  with open(out / "convergence.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["arm"], int(r["step"])) for r in rows] == [("a", 1), ("a", 2), ("b", 1)]
  assert float(rows[1]["train_minutes"]) == pytest.approx(records[0]["points"][1]
                                                          ["train_minutes"])
  png = (out / "convergence.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

  # A rerun trains nothing and writes the same table.
  done = out / "arms" / "a.json"
  stamp = done.stat().st_mtime_ns
  logs.clear()
  again = _run(out, tmp_path / "data", log=logs)
  assert again == records and done.stat().st_mtime_ns == stamp
  assert sum("not rerun" in m for m in logs) == 2 and not any(": training " in m for m in logs)

  # Other settings for a finished arm: refused, nothing lost.
  with pytest.raises(UserError, match=r"arm a: .* other settings \(config\.eval\."
                     r"images_per_prompt: 1 then, 2 now\)"):
    _run(out, tmp_path / "data", images_per_prompt=2)
  assert done.stat().st_mtime_ns == stamp


def test_a_config_field_added_later_at_its_default_leaves_finished_settings_equal():
  """An arm finished before a config field existed matches a rerun where the field is unset
  (None) or at the configs' default; set to anything else, the settings differ."""
  then = {"spec": "c.py", "config": {"data": {"resolution": 32}, "eval": {"every": 10}}}
  now = {"spec": "c.py", "config": {"data": {"resolution": 32, "shapes_single_size": None},
                                    "autoencoder": {"latent_cache_mb": 2048},
                                    "eval": {"every": 10}}}
  default = convergence._default_settings()
  assert default["config"]["autoencoder"]["latent_cache_mb"] == 2048
  assert convergence._without_added(then, now, default) == then
  now["config"]["data"]["shapes_single_size"] = "large"
  now["config"]["autoencoder"]["latent_cache_mb"] = 0
  compared = convergence._without_added(then, now, default)
  assert compared != then
  assert compared["config"]["autoencoder"] == {"latent_cache_mb": 0}
  assert compared["config"]["data"]["shapes_single_size"] == "large"
  assert convergence._first_difference(then, compared) == (
      "config.autoencoder: None then, {'latent_cache_mb': 0} now")
  # A field the stored arm had is always compared, whatever its value now.
  then["config"]["data"]["resolution"] = 16
  assert convergence._without_added(then, now, default)["config"]["data"]["resolution"] == 32


@pytest.mark.slow
def test_the_minutes_budget_stops_a_real_run_at_an_evaluation(tmp_path):
  _, probe_path = probe_helpers.tiny_probe()
  arms = convergence.parse_arms(["a=configs/demo_base.py:smoke"],
                                _overrides("a", tmp_path / "data"))
  # Any first step takes longer than 0.01 s: the evaluation at step 2 ends the arm.
  [record] = convergence.run(arms=arms, out=tmp_path / "conv", minutes=1e-4 / 6, steps=50,
                             eval_every=2, images_per_prompt=1, eval_steps=2,
                             probe_path=probe_path, runs=tmp_path / "runs",
                             log=lambda m: None)
  assert record["stopped_by"] == "--minutes"
  assert [p["step"] for p in record["points"]] == [2]
  run = tmp_path / "runs" / "a"
  assert (run / "checkpoints" / "2").is_dir()  # saved before the evaluation stopped it
  assert not (run / workdir_lock.LOCK_NAME).exists()  # the lock was released


def _log_lines(path, lines):
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_training_seconds_and_the_budget_stop(tmp_path):
  # 4 images per step; intervals of 2 steps at 8 img/s (1 s) and 2 steps at 2 img/s (4 s).
  _log_lines(tmp_path / "metrics.jsonl", [
      {"step": 2, "images_per_s": 8.0}, {"step": 2, "eval/colour_shape/all": 0.5},
      {"step": 4, "images_per_s": 2.0}])
  assert convergence.training_seconds(tmp_path / "metrics.jsonl", 4, 2) == 1.0
  assert convergence.training_seconds(tmp_path / "metrics.jsonl", 4, 4) == 5.0
  assert convergence.first_interval(tmp_path / "metrics.jsonl", 4) == {"steps": 2,
                                                                       "seconds": 1.0}
  with pytest.raises(RuntimeError, match="no log line at step 3"):
    convergence.training_seconds(tmp_path / "metrics.jsonl", 4, 3)

  calls, points = [], []

  def inner(state, step):
    calls.append(step)
    return {"eval/colour_shape/all": 36 / 96, "eval/colour_shape/held_out": 3 / 12}

  evaluate = convergence.recording_evaluator(inner, tmp_path, points, budget_s=3.0,
                                             batch_size=4, layout=("colour_shape", 96, 12),
                                             log=lambda m: None)
  assert evaluate(None, 2) == inner(None, 2)  # 1 s < 3 s: training goes on
  with pytest.raises(convergence.BudgetReached):
    evaluate(None, 4)  # 5 s >= 3 s: the point is recorded, then the arm stops
  assert [(p["step"], p["train_minutes"] * 60, p["correct"], p["n"], p["held_out_correct"],
           p["held_out_n"]) for p in points] == [(2, 1.0, 36, 96, 3, 12), (4, 5.0, 36, 96, 3, 12)]
  low, high = points[0]["ci_low"], points[0]["ci_high"]
  assert 0.28 < low < 0.375 < high < 0.48  # Wilson 95% of 36/96: [0.283, 0.477]


@pytest.mark.parametrize("args,message", [
    (["--arm=configs/demo_base.py"], "write --arm=<label>=<config.py[:arg]>"),
    (["--arm=x=configs/nonexistent.py"], "--arm x 'configs/nonexistent.py': no such config"),
    (["--arm=x=configs/demo_base.py", "--override=y.train.seed=1"], "no arm is labelled 'y'"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
  r = subprocess.run([sys.executable, str(SCRIPT), *args, "--minutes=1",
                      f"--out={tmp_path / 'out'}"], capture_output=True, text=True,
                     timeout=300, env=subprocess_env())
  assert message in one_error_line(r)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(overrides=["x.train.batchsize=3"]), "--override 'x.train.batchsize': the config "
     "has no field 'train.batchsize'"),
    (dict(overrides=["x.train.batch_size=abc"]), "--override 'x.train.batch_size': value "
     "'abc' does not fit"),
    (dict(spec="configs/demo_sr.py"), "is a super-resolution stage"),
    (dict(minutes=0), "--minutes=0; it must be positive"),
    (dict(minutes=None), "give --minutes"),
    (dict(probe_path="/nonexistent.msgpack"), "--probe_path /nonexistent.msgpack does not"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, kwargs, message):
  arms = convergence.parse_arms([f"x={kwargs.pop('spec', 'configs/demo_base.py')}"],
                                kwargs.pop("overrides", []))
  settings = {"minutes": 1.0, "eval_every": 10, "images_per_prompt": 1, **kwargs}
  with pytest.raises(UserError, match=re.escape(message)):
    convergence.run(arms=arms, out=tmp_path / "out", **settings)
  assert not (tmp_path / "out").exists()
