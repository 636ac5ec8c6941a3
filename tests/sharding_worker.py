"""Run by test_sharding.py in a subprocess with 8 host devices (the XLA flag must be set
before JAX starts): sharded init, forward and gradients versus one device.

Usage: python tests/sharding_worker.py data=8,model=1 [data=4,model=2 ...]
Prints one line per check and exits non-zero on failure.
"""

import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import sharding_helpers as helpers
from jax.sharding import PartitionSpec

from diffusion_jax import sharding


def out_loss_grads(params, batch):
  def loss_with_output(p):
    out = helpers.forward(p, batch)
    return ((out - batch["x_t"]) ** 2).mean(), out
  (loss, out), grads = jax.value_and_grad(loss_with_output, has_aux=True)(params)
  return out, loss, grads


def check_mesh(axes, key, batch, reference):
  start = time.perf_counter()
  mesh = sharding.make_mesh(axes)
  rules = sharding.FSDP_RULES
  params, _ = sharding.init_sharded(helpers.init_fn, mesh, rules, key)
  fractions = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if leaf.ndim >= 2 and leaf.size >= 256:
      sizes = {shard.data.size for shard in leaf.addressable_shards}
      assert len(sizes) == 1, (path, sizes)
      fractions[jax.tree_util.keystr(path)] = sizes.pop() / leaf.size
  worst = max(fractions.items(), key=lambda kv: kv[1])
  print(f"mesh {axes}: {len(fractions)} large kernels, the largest share one device holds "
        f"is {worst[1]:.4f} ({worst[0]})")
  if axes.get("model", 1) == 1:
    bad = {k: v for k, v in fractions.items() if not math.isclose(v, 1 / jax.device_count())}
    assert not bad, f"kernels not split {jax.device_count()} ways under FSDP: {bad}"
  else:
    # Tensor parallelism: FSDP still splits every kernel over `data`, and the model axis
    # must split every convolution kernel (its output channels) and every attention
    # projection (its heads) on top, so those hold 1/(data*model) per device. (The stem
    # and output convolutions have 3 image channels on one side, which cannot split.)
    assert worst[1] <= 1 / axes["data"], worst
    leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    split_both = {k for k, v in fractions.items() if math.isclose(v, 1 / jax.device_count())}
    must_split = {jax.tree_util.keystr(path) for path, leaf in leaves.items()
                  if jax.tree_util.keystr(path) in fractions and (
                      (leaf.ndim == 4 and leaf.shape[-2] % axes["data"] == 0
                       and leaf.shape[-1] % axes["model"] == 0)
                      or "query" in jax.tree_util.keystr(path))}
    missing = sorted(must_split - split_both)
    assert must_split and not missing, f"not split over data and model: {missing}"
    print(f"mesh {axes}: {len(split_both)} of {len(fractions)} large kernels split "
          f"{jax.device_count()} ways, all {len(must_split)} conv / query kernels among them")

  params = helpers.perturb(params)
  params_ref, out_ref, loss_ref, grads_ref = reference
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), params_ref)
  global_batch = sharding.host_local_to_global(jax.device_get(batch), mesh, rules)
  assert global_batch["x_t"].sharding.spec[0] == "data"
  with sharding.sharding_context(mesh, rules):
    out, loss, grads = helpers.fast_jit(out_loss_grads, params, global_batch)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               grads, grads_ref)
  print(f"mesh {axes}: forward and gradients equal single-device within 1e-5 "
        f"(max |out| {float(abs(out_ref).max()):.3f}, loss {float(loss_ref):.5f}); "
        f"{time.perf_counter() - start:.1f} s")


def check_pairwise_attention(axes):
  """Long-sequence attention maps (image, head) pairs inside shard_map on a mesh: same
  values and gradients as dense attention on one device, batch and heads kept sharded."""
  from diffusion_jax.models import layers
  mesh = sharding.make_mesh(axes)
  ks = jax.random.split(jax.random.key(1), 4)
  q, k, v = (jax.random.normal(key, (8, 4, 32, 8)) for key in ks[:3])
  mask = jax.random.bernoulli(ks[3], 0.7, (8, 32)).at[:, 0].set(True)

  def loss(q, k, v, mask, pairwise):
    out = layers.attention(q, k, v, mask, pairwise=pairwise)
    return jnp.sum(jnp.sin(out)), out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                 static_argnums=4)
  (_, ref), ref_grads = grad(q, k, v, mask, False)
  spec = sharding.logical_to_mesh_spec(("batch", "heads", None, None), q.shape,
                                       sharding.FSDP_RULES, mesh)
  placed = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v)]
  placed.append(jax.device_put(mask, jax.sharding.NamedSharding(mesh, PartitionSpec(spec[0]))))
  with sharding.sharding_context(mesh, sharding.FSDP_RULES):
    assert "shard_map" in str(jax.make_jaxpr(grad, static_argnums=4)(*placed, True))
    (_, out), grads = grad(*placed, True)
  assert out.sharding.spec[:2] == spec[:2], (out.sharding.spec, spec)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)
  print(f"mesh {axes}: pairwise attention in shard_map ({spec}) equals dense within 1e-5")


def main(mesh_args):
  helpers.enable_compilation_cache()
  assert jax.device_count() == 8, jax.devices()
  key = jax.random.key(0)
  batch = helpers.inputs()
  start = time.perf_counter()
  # Reference: the same initial parameters gathered to the host, then one device.
  params, _ = sharding.init_sharded(helpers.init_fn, sharding.make_mesh({"data": 1}, [
      jax.devices()[0]]), sharding.FSDP_RULES, key)
  params_ref = helpers.perturb(jax.device_get(params))
  reference = (params_ref, *helpers.fast_jit(out_loss_grads, params_ref, batch))
  print(f"single-device reference: {time.perf_counter() - start:.1f} s")
  for arg in mesh_args:
    axes = {k: int(v) for k, v in (kv.split("=") for kv in arg.split(","))}
    check_mesh(axes, key, batch, reference)
    check_pairwise_attention(axes)


if __name__ == "__main__":
  main(sys.argv[1:] or ["data=8,model=1"])
