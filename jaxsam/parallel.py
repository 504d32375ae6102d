"""Devices, meshes and processes: the only module that knows how work is spread over hardware.

jaxsam is data-parallel over one mesh axis, `DATA_AXIS`, that spans every device of every process.
Parameters and optimizer state are replicated; batches are sharded along their first dimension.
"""

import collections
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Self

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
      f"{num_devices} (e.g. {num_devices * max(1, global_batch_size // num_devices or 1)})"
    )
  return global_batch_size // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree on every device of the mesh (replicated global arrays)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated(mesh))
  # Several processes: device_put would compare values across processes, and NaN leaves (SAM's
  # not-yet-measured diagnostics) never compare equal; every process holds the same tree anyway.
  sharding = replicated(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
  )


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's slice of a global batch into global arrays sharded over `DATA_AXIS`."""
  sharding = batch_sharded(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


class DevicePrefetch:
  """Iterates over `shard_batch`ed host batches, the next one already on its way to the devices.

  flax's `prefetch_to_device` for sharded global arrays: each `next()` places one more host batch
  (placement is asynchronous) before handing out the oldest, so that the batch of step k+1 travels
  while step k runs, and the loop never blocks on the devices for its input. `mean_wait_ms` says
  how long the caller waited per batch (the host iterator's `next()` plus placement): the sign of
  a training loop starved by its input. `transform`, when given, is applied to each batch once
  placed (e.g. the device pipeline's gather + augment: dispatched now, run on device in order).
  """

  def __init__(
    self,
    local_batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh,
    size: int = 2,
    transform: Callable[[dict], dict] | None = None,
  ):
    if size < 1:
      raise ValueError(f"prefetch size={size} must be at least 1")
    self._source = iter(local_batches)
    self._mesh = mesh
    self._size = size
    self._transform = transform
    self._queue = collections.deque()
    self._wait = 0.0
    self._taken = 0

  def __iter__(self) -> Self:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    start = time.perf_counter()
    try:
      while len(self._queue) < self._size:
        batch = shard_batch(next(self._source), self._mesh)
        self._queue.append(batch if self._transform is None else self._transform(batch))
    except StopIteration:  # the source is done: hand out what is still queued
      if not self._queue:
        raise
    finally:
      self._wait += time.perf_counter() - start
    self._taken += 1
    return self._queue.popleft()

  def mean_wait_ms(self) -> float:
    """Milliseconds waited per batch handed out since the previous call (NaN when none was)."""
    wait, taken = self._wait, self._taken
    self._wait, self._taken = 0.0, 0
    return 1000.0 * wait / taken if taken else float("nan")


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
