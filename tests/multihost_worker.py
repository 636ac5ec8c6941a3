"""One of the two processes test_sharding.py starts to check multi-host sharding on CPU.

Usage: python tests/multihost_worker.py PORT PROCESS_ID OUT_DIR
Joins a 2-process JAX cluster on 127.0.0.1:PORT (gloo collectives), initialises the tiny
U-Net sharded over both processes' devices, feeds each process's half of the batch, runs
one sharded forward and saves this process's own rows of it (taken before any collective),
the gathered output and the gathered parameters to OUT_DIR/out_{PROCESS_ID}.npz; the test
compares them with its own unsharded computation.
"""

import sys
import time

import jax
import numpy as np
import sharding_helpers as helpers
from jax.experimental import multihost_utils

from diffusion_jax import sharding


def main(port: int, process_id: int, out_dir: str):
  start = time.perf_counter()
  log = lambda what: print(f"process {process_id}: {what} at {time.perf_counter() - start:.1f} s",
                           flush=True)
  assert sharding.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  helpers.enable_compilation_cache()
  assert jax.process_count() == 2 and jax.process_index() == process_id
  log("cluster joined")

  mesh = sharding.make_mesh({"data": -1, "model": 1})
  rules = sharding.FSDP_RULES
  params, _ = sharding.init_sharded(helpers.init_fn, mesh, rules, jax.random.key(0))
  params = helpers.perturb(params)
  log("sharded init done")
  assert not any(p.is_fully_addressable for p in jax.tree.leaves(params) if p.size >= 256)

  batch = jax.device_get(helpers.inputs())
  per_process = helpers.BATCH // 2
  local = jax.tree.map(lambda x: x[process_id * per_process:(process_id + 1) * per_process],
                       batch)
  global_batch = sharding.host_local_to_global(local, mesh, rules)
  with sharding.sharding_context(mesh, rules):
    out = helpers.fast_jit(helpers.forward, params, global_batch)
  # This process's own rows of the output, before any collective, and which rows they are.
  (shard,) = out.addressable_shards
  rows = np.arange(helpers.BATCH)[shard.index[0]]
  gathered = multihost_utils.process_allgather(out, tiled=True)
  full_params = multihost_utils.process_allgather(params, tiled=True)
  log("sharded forward done")
  np.savez(f"{out_dir}/out_{process_id}.npz", local=np.asarray(shard.data), rows=rows,
           gathered=gathered, **{f"param_{i}": np.asarray(p)
                                 for i, p in enumerate(jax.tree.leaves(full_params))})
  print(f"process {process_id}: output {gathered.shape}, own rows {rows.tolist()}")

if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
