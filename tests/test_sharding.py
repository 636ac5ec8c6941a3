"""Sharding: mesh construction, logical rules, and (in subprocesses) 8 host devices and a
two-process jax.distributed cluster, each checked against one device."""

import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import local_cluster
import numpy as np
import pytest
import sharding_helpers as helpers  # tests/ is on sys.path under pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import sharding

TESTS = pathlib.Path(__file__).resolve().parent


def test_make_mesh_fills_the_wildcard_axis():
  mesh = sharding.make_mesh({"data": -1, "model": 1})
  assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh({"data": jax.device_count() + 1})
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh({"data": -1, "model": -1})


def test_rules_skip_indivisible_and_taken_axes():
  devices = np.array(jax.devices() * 8)[:8]  # a fake 8-"device" mesh for spec arithmetic
  mesh = jax.sharding.Mesh(devices.reshape(4, 2), ("data", "model"))
  rules = sharding.FSDP_RULES
  spec = sharding.logical_to_mesh_spec
  # FSDP on the input channels, tensor parallelism on the output channels.
  assert spec((None, None, "conv_in", "conv_out"), (3, 3, 64, 128), rules, mesh) == P(
      None, None, "data", "model")
  # 3 RGB channels do not split 4 ways: the output channels take `data` instead.
  assert spec((None, None, "conv_in", "conv_out"), (3, 3, 3, 64), rules, mesh) == P(
      None, None, None, "data")
  assert spec(("embed", "heads", "kv"), (64, 8, 32), rules, mesh) == P("data", "model", None)
  assert spec(("norm",), (64,), rules, mesh) == P(None)


def test_host_local_to_global_on_one_process():
  mesh = sharding.make_mesh({"data": -1})
  batch = {"x": np.arange(4 * 3, dtype=np.float32).reshape(4, 3)}
  global_batch = sharding.host_local_to_global(batch, mesh, sharding.FSDP_RULES)
  assert global_batch["x"].sharding.spec == P("data", None)
  np.testing.assert_array_equal(global_batch["x"], batch["x"])


def test_shardings_from_abstract_match_the_unboxed_params():
  mesh = sharding.make_mesh({"data": -1, "model": 1})
  abstract = jax.eval_shape(helpers.init_fn, jax.random.key(0))
  shardings = sharding.shardings_from_abstract(abstract, mesh, sharding.FSDP_RULES)
  assert all(isinstance(s, jax.sharding.NamedSharding) for s in jax.tree.leaves(shardings))
  assert jax.tree.structure(shardings) == jax.tree.structure(nn.unbox(abstract))


def test_initialize_distributed_is_a_no_op_by_default(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "DIFFUSION_JAX_DISTRIBUTED"):
    monkeypatch.delenv(var, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  with pytest.raises(ValueError, match="num_processes"):
    sharding.maybe_initialize_distributed()


def test_eight_devices_fsdp_and_tensor_parallel_match_one_device():
  """Under FSDP every large kernel is split 8 ways; forward and gradients on a (data=8)
  and a (data=4, model=2) mesh equal one device's within 1e-5 (checked in the worker)."""
  result = subprocess.run(
      [sys.executable, str(TESTS / "sharding_worker.py"), "data=8,model=1", "data=4,model=2"],
      env=local_cluster.env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
      capture_output=True, text=True, timeout=600)
  print(result.stdout)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert result.stdout.count("equal single-device within 1e-5") == 2
  assert result.stdout.count("pairwise attention in shard_map") == 2


def test_two_processes_agree_on_a_sharded_forward(tmp_path):
  port = local_cluster.free_port()
  env = local_cluster.env(XLA_FLAGS="--xla_force_host_platform_device_count=1")
  local_cluster.run_together(
      [[sys.executable, str(TESTS / "multihost_worker.py"), str(port), str(i), str(tmp_path)]
       for i in range(2)], env, timeout=400)
  outs = [np.load(tmp_path / f"out_{i}.npz") for i in range(2)]
  # The reference, computed here without the cluster: the same key's unsharded init on one
  # device and the forward of the whole batch.
  params = helpers.perturb(nn.unbox(jax.jit(helpers.init_fn)(jax.random.key(0))))
  reference = np.asarray(helpers.fast_jit(helpers.forward, params, helpers.inputs()))
  assert reference.shape == (8, 8, 8, 3) and float(np.abs(reference).max()) > 0.1
  # Each process computed its own half of the batch (together all of it) from the same
  # parameters as here, and its rows equal the unsharded computation's.
  assert sorted(np.concatenate([o["rows"] for o in outs]).tolist()) == list(range(8))
  for out in outs:
    assert len(out["rows"]) == 4
    for i, leaf in enumerate(jax.tree.leaves(params)):
      np.testing.assert_allclose(out[f"param_{i}"], leaf, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["local"], reference[out["rows"]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["gathered"], reference, rtol=1e-5, atol=1e-5)
