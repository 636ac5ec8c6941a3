"""Device mesh, logical-axis rules and sharded initialisation (jit + Mesh, no pmap).

Three layers, as in maxtext: physical mesh axes (``data``, ``model``); logical axis names
on every parameter and large activation (see ``diffusion_jax.models.layers``); and a
table of rules, a plain tuple of ``(logical_name, mesh_axis_or_None)`` pairs, that maps
one onto the other. Rules are tried in order; a rule is skipped when its mesh axis is
already used by another dimension of the same array or (for parameters) does not divide
the dimension, so a later rule can take over.

The default, ``FSDP_RULES``, is pure fully-sharded data parallelism (ZeRO-3, Rajbhandari
et al. 2020): the batch and one large dimension of every kernel are split over ``data``;
with a ``model`` axis larger than 1 the same table also splits channels and attention
heads over it (tensor parallelism, Shoeybi et al. 2019, "Megatron-LM").

Typical use::

  mesh = make_mesh({"data": -1, "model": 1})
  params, shardings = init_sharded(lambda k: model.init(k, **inputs)["params"], mesh,
                                   FSDP_RULES, jax.random.key(0))
  with sharding_context(mesh, FSDP_RULES):
    out = jax.jit(apply_fn)(params, host_local_to_global(batch, mesh, FSDP_RULES))
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, str | None], ...]

FSDP_RULES: LogicalRules = (
    ("batch", "data"),
    # FSDP: one dimension of each kernel over `data`, the input side first (for most
    # kernels the largest), then the output side when the input does not divide.
    ("conv_in", "data"),
    ("embed", "data"),
    ("conv_out", "data"),
    ("mlp", "data"),
    ("text_embed", "data"),
    # Tensor parallelism over `model` (a no-op while it has size 1).
    ("heads", "model"),
    ("conv_out", "model"),
    ("mlp", "model"),
)

# For functions that run once (init): skip XLA's backend optimisation passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# Pure data parallelism: every parameter replicated, only the batch split.
DATA_PARALLEL_RULES: LogicalRules = (("batch", "data"),)


def make_mesh(axis_sizes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the given axis sizes over all (or the given) devices.

  One size may be -1, meaning "all remaining devices". Axes are ``AxisType.Auto``:
  jax.make_mesh's default (Explicit) axes reject Flax's logical sharding constraints.
  Default: ``{"data": -1, "model": 1}``.
  """
  axis_sizes = dict(axis_sizes or {"data": -1, "model": 1})
  devices = list(devices if devices is not None else jax.devices())
  wildcard = [name for name, size in axis_sizes.items() if size == -1]
  if len(wildcard) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {wildcard}")
  fixed = int(np.prod([s for s in axis_sizes.values() if s != -1]))
  if wildcard:
    if len(devices) % fixed:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh {axis_sizes}")
    axis_sizes[wildcard[0]] = len(devices) // fixed
  if int(np.prod(list(axis_sizes.values()))) != len(devices):
    raise ValueError(f"mesh {axis_sizes} needs {int(np.prod(list(axis_sizes.values())))} "
                     f"devices, but {len(devices)} are available")
  return jax.make_mesh(tuple(axis_sizes.values()), tuple(axis_sizes),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axis_sizes),
                       devices=devices)


def logical_to_mesh_spec(names: Sequence[str | None], shape: Sequence[int],
                         rules: LogicalRules, mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for an array of ``shape`` with logical ``names``.

  Flax's priority rule (first matching rule whose mesh axis is still free wins), plus:
  a rule is skipped when the mesh axis is absent or its size does not divide the
  dimension (e.g. 3 RGB input channels over 8 devices), so the next rule can apply.
  """
  assigned: list[str | None] = [None] * len(names)
  for logical, mesh_axis in rules:
    if logical not in names or mesh_axis is None or mesh_axis in assigned:
      continue
    dim = list(names).index(logical)
    if assigned[dim] is not None or mesh_axis not in mesh.shape:
      continue
    if shape[dim] % mesh.shape[mesh_axis] == 0:
      assigned[dim] = mesh_axis
  return PartitionSpec(*assigned)


def shardings_from_abstract(abstract_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedShardings for the unboxed version of a tree of (possibly boxed) shapes.

  ``abstract_tree`` is e.g. ``jax.eval_shape(model.init, ...)``: its leaves are
  ``nn.LogicallyPartitioned`` boxes around ShapeDtypeStructs (unnamed leaves are
  replicated). The result has the structure of ``nn.unbox(abstract_tree)``.
  """
  logical_specs = nn.get_partition_spec(abstract_tree)
  shapes = nn.unbox(abstract_tree)
  return jax.tree.map(
      lambda spec, shape: NamedSharding(
          mesh, logical_to_mesh_spec(tuple(spec), shape.shape, rules, mesh)),
      logical_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
  """Makes ``mesh`` and ``rules`` current, so the model's logical constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules,
                 *args: Any) -> tuple[Any, Any]:
  """Runs ``init_fn(*args)`` with every output created directly in its shard.

  The shardings come from ``jax.eval_shape`` (nothing allocated) and the jitted init has
  them as ``out_shardings``, so no device or host ever holds the full model.
  Returns (unboxed outputs, their NamedShardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = shardings_from_abstract(abstract, mesh, rules)
  jitted = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)
  # No logical-rules context here: Flax would constrain each parameter with its own rule
  # lookup (which does not skip indivisible dimensions); out_shardings already place them.
  with jax.set_mesh(mesh):
    # Init runs once: XLA's backend optimisations would take most of its time (about 5x
    # longer to compile the many random-number kernels on CPU) and save nothing.
    compiled = jitted.lower(*args).compile(compiler_options=FAST_COMPILE)
    return compiled(*args), shardings


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
  """Sharding of an array whose leading axis is the batch (split as 'batch' says)."""
  names = ("batch",) + (None,) * (ndim - 1)
  spec = PartitionSpec(*[m for m in nn.logical_to_mesh_axes(names, rules)])
  return NamedSharding(mesh, spec)


def host_local_to_global(batch: Any, mesh: Mesh, rules: LogicalRules = FSDP_RULES) -> Any:
  """Assembles each process's slice of the batch into global arrays on ``mesh``.

  Every leaf is [B_local, ...] on this host; the result is [B_local * num_processes, ...]
  sharded along the batch (``jax.make_array_from_process_local_data``). With one process
  this is a sharded ``device_put``.
  """
  def to_global(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, rules, x.ndim)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree.map(to_global, batch)


shard_batch = host_local_to_global


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 cpu_collectives: str = "gloo") -> bool:
  """Calls ``jax.distributed.initialize`` when asked to; returns whether it did.

  Asked by arguments (GPU clusters and CPU tests pass all three) or by the environment:
  ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or
  ``DIFFUSION_JAX_DISTRIBUTED=1`` to let JAX auto-detect the cluster (TPU pods, SLURM).
  Otherwise a no-op, so single-host runs never wait for a coordinator. Must run before
  anything touches a JAX backend.
  """
  if jax.distributed.is_initialized():
    return False
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in env:
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in env:
    process_id = int(env["JAX_PROCESS_ID"])
  auto_detect = env.get("DIFFUSION_JAX_DISTRIBUTED", "0") == "1"
  if coordinator_address is None and not auto_detect:
    return False
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError("multi-host needs coordinator_address, num_processes and process_id "
                     "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID in the environment)")
  # Cross-process collectives on the CPU backend need an implementation (gloo ships with
  # jaxlib); it does not affect TPU/GPU backends.
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True
