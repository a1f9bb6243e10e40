"""Device mesh and shardings: the same code on 1 CPU, 8 simulated CPUs, GPUs and TPU pods.

The mesh comes from the config, e.g. `config.mesh = (("data", -1), ("fsdp", 1))` (-1: all
remaining devices). Batches are split over every mesh axis (data and fsdp both carry
examples). Parameters are replicated, except that leaves with at least
`config.fsdp_min_size` elements are split over "fsdp" along their largest dimension that
the axis size divides (ZeRO-3 style: XLA all-gathers them where they are used).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(enabled: bool) -> None:
  """Multi-host start-up (TPU pods, multi-node GPU); safe to call twice."""
  if not enabled:
    return
  try:
    jax.distributed.initialize()
  except RuntimeError as e:  # already initialised by an earlier call
    if "already" not in str(e).lower():
      raise


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Mesh with named axes; one size may be -1 to take the remaining devices.

  On a single process, a mesh smaller than the host uses its first devices.
  """
  devices = jax.devices() if devices is None else devices
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {axes}: at most one axis may be -1.")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {axes}: {len(devices)} devices are not divisible by {known}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) < len(devices) and jax.process_count() == 1:
    devices = devices[:int(np.prod(sizes))]  # e.g. a 1-device run on a multi-device host
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"found {len(devices)}; fix config.mesh (use -1 for 'the rest').")
  device_grid = np.asarray(devices).reshape(sizes)
  return Mesh(device_grid, names)


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
