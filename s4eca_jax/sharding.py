"""Device mesh and shardings: the same code on 1 CPU, 8 simulated CPUs, GPUs and TPU pods.

The mesh comes from the config, e.g. `config.mesh = (("data", -1), ("fsdp", 1))` (-1: all
remaining devices; a third number per axis spreads it over TPU slices, see make_mesh).
Multi-host runs start with `initialize_distributed`. Batches are split over every mesh
axis (data and fsdp both carry examples). Parameters are replicated, except that leaves
with at least `config.fsdp_min_size` elements are split over "fsdp" along their largest
dimension that the axis size divides (ZeRO-3 style: XLA all-gathers them where they are used).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint import multihost


def initialize_distributed(config) -> None:
  """Multi-host start-up behind `config.distributed`; safe to call twice.

  With only `distributed=True`, JAX detects the cluster (TPU pod metadata, SLURM's
  environment, Open MPI). A hand-made cluster (several processes on one machine, or hosts
  without a scheduler) names the coordinator "host:port", the process count and this
  process's id in config.coordinator_address / num_processes / process_id.
  """
  if not config.get("distributed", False) or jax.distributed.is_initialized():
    return
  # CPU processes exchange collectives over gloo (no-op for the GPU and TPU clients).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = {"coordinator_address": config.get("coordinator_address") or None,
              "num_processes": config.get("num_processes") or None,
              "process_id": config.get("process_id")}
  if explicit["process_id"] is not None and explicit["process_id"] < 0:
    explicit["process_id"] = None
  jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})


BARRIER_TIMEOUT_S = 3600  # a large step compiling (or weights loading) on a slow host
_barriers = itertools.count()


def compile_together(jitted, args: Sequence[Any], name: str) -> Callable[..., Any]:
  """jitted.lower(*args).compile(), then, with several processes, a barrier on the
  coordination service before anyone runs it.

  The first run of a step sets up its cross-process collectives (on CPU, a gloo context
  that waits 30 s for its peers). A process whose compile is a persistent-cache hit
  would otherwise reach it long before one that compiles (JAX writes the cache from
  process 0 only), and the collective's set-up times out.
  """
  compiled = jitted.lower(*args).compile()
  sync_processes(f"compiled_{name}")
  return compiled


def sync_processes(name: str) -> None:
  """With several processes, waits until all reach this point (a barrier on the
  coordination service, up to BARRIER_TIMEOUT_S; no device collective)."""
  if jax.process_count() > 1:
    key = f"s4eca_{next(_barriers)}_{name}"  # the same sequence on every process
    multihost.get_barrier_sync_fn()(key=key, timeout_ms=BARRIER_TIMEOUT_S * 1000)


def _axis_sizes(sizes, num_devices, what):
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {what}: at most one axis may be -1.")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {what}: {num_devices} devices are not divisible by {known}.")
    sizes[sizes.index(-1)] = num_devices // known
  return sizes


def make_mesh(axes: Sequence[tuple], devices=None) -> Mesh:
  """Mesh with named axes from `config.mesh`; one size may be -1 for the remaining devices.

  Entries are (name, size), or (name, size, dcn_size) for multi-slice TPU (or several GPU
  hosts) where an axis spans slices: `size` counts devices within a slice (ICI), dcn_size
  the slices along that axis (data-center network), so the axis has size * dcn_size
  devices. Device order comes from jax.make_mesh / mesh_utils, which follow the physical
  topology (torus neighbours on TPU). On a single process, a mesh smaller than the host
  uses its first devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = [axis[0] for axis in axes]
  dcn = [int(axis[2]) if len(axis) > 2 else 1 for axis in axes]
  num_slices = int(np.prod(dcn))
  if len(devices) % num_slices:
    raise ValueError(f"mesh {axes}: {len(devices)} devices cannot form {num_slices} slices.")
  sizes = _axis_sizes([int(axis[1]) for axis in axes], len(devices) // num_slices, axes)
  total = int(np.prod(sizes)) * num_slices
  if total < len(devices) and jax.process_count() == 1:
    devices = devices[:total]  # e.g. a 1-device run on a multi-device host
  if total != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} x dcn {dcn} needs {total} devices, "
                     f"found {len(devices)}; fix config.mesh (use -1 for 'the rest').")
  # Auto axes: shardings are the jit's in/out and param specs (jax.make_mesh's default,
  # Explicit, would type every array's sharding).
  axis_types = (AxisType.Auto,) * len(names)
  if num_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices,
                                                process_is_granule=devices[0].platform != "tpu")
    return Mesh(grid, names, axis_types=axis_types)
  return jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """PartitionSpec of one parameter: fsdp over its largest divisible axis, if big enough."""
  if fsdp_size <= 1 or int(np.prod(shape)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(abstract_tree: Any, mesh: Mesh, min_size: int = 2**18) -> Any:
  """NamedShardings for a tree of arrays or ShapeDtypeStructs."""
  fsdp_size = mesh.shape.get("fsdp", 1)
  return jax.tree.map(
      lambda leaf: NamedSharding(mesh, param_spec(leaf.shape, fsdp_size, min_size)),
      abstract_tree)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global jax.Arrays split along the batch axis.

  Each process passes its own slice (process_count slices make the global batch).
  """
  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return {k: put(v) for k, v in batch.items()}
