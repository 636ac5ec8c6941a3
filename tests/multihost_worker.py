"""One of the two processes test_sharding.py starts to check multi-host sharding on CPU.

Usage: python tests/multihost_worker.py PORT PROCESS_ID OUT_DIR
Joins a 2-process JAX cluster on 127.0.0.1:PORT (gloo collectives), initialises the tiny
U-Net sharded over both processes' devices, feeds each process's half of the batch, runs
one sharded forward and saves the gathered output, plus a single-device recomputation
from gathered parameters, to OUT_DIR/out_{PROCESS_ID}.npz.
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
  gathered = multihost_utils.process_allgather(out, tiled=True)
  log("sharded forward done")

  full_params = multihost_utils.process_allgather(params, tiled=True)
  on_one_device = jax.device_put((full_params, batch), jax.local_devices()[0])
  single = helpers.fast_jit(helpers.forward, *on_one_device)
  np.savez(f"{out_dir}/out_{process_id}.npz", sharded=gathered, single=np.asarray(single))
  print(f"process {process_id}: output {gathered.shape}, max |sharded - single| "
        f"{float(np.abs(gathered - np.asarray(single)).max()):.2e}")


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
