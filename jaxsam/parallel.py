"""Devices, meshes and processes: the only module that knows how work is spread over hardware.

jaxsam is data-parallel over one mesh axis, `DATA_AXIS`, that spans every device of every process.
Parameters and optimizer state are replicated; batches are sharded along their first dimension.
"""

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsam import errors

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes) named `DATA_AXIS`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def per_process_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
  """Checks that the global batch splits evenly over devices; returns this process's share."""
  num_devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise errors.ConfigError(
        f"{what}={global_batch_size} must be a positive multiple of the device count "
        f"{num_devices} (e.g. {num_devices * max(1, global_batch_size // num_devices or 1)})")
  return global_batch_size // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree on every device of the mesh (replicated global arrays)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated(mesh))
  # Several processes: device_put would compare values across processes, and NaN leaves (SAM's
  # not-yet-measured diagnostics) never compare equal; every process holds the same tree anyway.
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's slice of a global batch into global arrays sharded over `DATA_AXIS`."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def fetch(tree: Any) -> Any:
  """Brings (replicated or fully addressable) arrays back to the host as numpy."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def is_main_process() -> bool:
  """Process 0 alone writes logs, metrics, plots and wandb."""
  return jax.process_index() == 0


# --- Multi-process helpers: host-level agreement between processes. -------------------------------


def global_any(flag: bool) -> bool:
  """True on every process when `flag` is True on any of them (a cross-process OR).

  A collective: every process must call it at the same point, e.g. so that all save the same step
  when only some of them received SIGTERM.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))


def barrier(name: str) -> None:
  """Blocks until every process reaches the barrier `name` (no-op for a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
  """Process 0 runs the body first (e.g. downloads and prepares data), then the others do."""
  if not is_main_process():
    barrier(name)
  try:
    yield
  finally:  # even when process 0 fails: the others then fail on their own, rather than hang
    if is_main_process():
      barrier(name)


def is_single_process() -> bool:
  return jax.process_count() == 1
