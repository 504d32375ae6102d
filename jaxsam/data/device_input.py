"""On-device train input for in-memory data: the train split lives on the devices as uint8, and
each step's rows are gathered and augmented there (`device_augment`) from (index, seed).

The host still decides which examples each step takes and each one's seed (`rows.train_steps`,
the same arithmetic as the tf.data path), so both pipelines give the same batches for the same
(seed, step) and a run resumed on either continues the same stream. What travels per step is
B int32 indices, B labels and B x 4 seed words (one int32 array) instead of B images. Imports no
TensorFlow.
"""

import functools
import importlib.util
import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsam import errors, parallel
from jaxsam.data import device_augment, rows, sources

PIPELINES = ("tf", "device", "auto")
# Whether the loop compiles the gather + augmentation into the train step (one program per step)
# rather than dispatching it as a program of its own just before the step. bench/device_fusion.py
# measures both on the CPU backend (bench/README.md): fused 1.01x for ResNet-18, 0.84x at the
# quickstart's shapes. Separate also keeps the train step the very program tf.data batches run,
# so losses equal tf.data's bit for bit by construction; fused, XLA may fuse the label slice into
# the loss's reductions and change their order (it did: step 3's loss differed in the 7th digit).
FUSE_INTO_STEP = False
# The device pipeline's view of the data mesh: one row of devices per process.
PROCESS_AXIS, LOCAL_AXIS = "process", "local"


def tensorflow_importable() -> bool:
  """True when `import tensorflow` would find it (without importing it: that takes seconds)."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"] is not None  # None: blocked, as `import` then fails
  try:
    return importlib.util.find_spec("tensorflow") is not None
  except (ImportError, ValueError):
    return False


def resolve_pipeline(dataset_config, streamed: bool) -> tuple[str, str]:
  """(`tf` or `device`, why) for `dataset.pipeline`; a ConfigError for `device` with streamed
  data (it is decoded from files as it is trained on, so there is no split to hold on device)."""
  asked = str(dataset_config.get("pipeline", "tf")).lower()
  if asked not in PIPELINES:
    raise errors.ConfigError(
      f"dataset.pipeline={asked!r} is unknown; expected one of {', '.join(PIPELINES)}"
    )
  if asked == "device" and streamed:
    raise errors.ConfigError(
      "dataset.pipeline='device' needs the train split in memory, but this dataset streams; "
      "set dataset.in_memory='true' or dataset.pipeline='tf'"
    )
  if asked != "auto":
    return asked, f"dataset.pipeline={asked}"
  if streamed:
    return "tf", "dataset.pipeline=auto: streamed data is read by tf.data"
  if tensorflow_importable():
    return "tf", "dataset.pipeline=auto: TensorFlow is importable"
  return "device", "dataset.pipeline=auto: TensorFlow is not importable"


class DeviceTrainInput:
  """`DataSource.train_input` for the device pipeline.

  Called as `(start_step, process_index, process_count)` it yields this process's host rows of
  every step: {"rows": int32 [B/P, 6]}, each example's index, label and seed words (`pack_rows`:
  one transfer per step); the loop
  shards them over 'data' (`parallel.DevicePrefetch`), and `on_device` turns each sharded batch
  into {"image": uint8 [B, H, W, 3], "label"} by one jitted gather + augment, dispatched
  asynchronously, so the step before still runs while it is queued (the loop's default);
  `fuse(step)` compiles the same into the train step instead (`FUSE_INTO_STEP`).

  Where the split lives: every epoch is one permutation of the whole split (`rows.train_steps`),
  so any step may give any example to any process, and each process must hold every row. It holds
  them once: the rows are split over the process's own devices (`PROCESS_AXIS` x `LOCAL_AXIS`
  mesh, sharded over the second, replicated over the first), and each step every device takes the
  rows it holds of its process's batch, zeros elsewhere, and a reduce-scatter within the process
  hands each device its own share. On one device per process that is a plain gather.
  """

  def __init__(self, split: sources.Split, augment_config, *, seed: int, global_batch: int, mesh):
    self._labels = np.asarray(split.labels).astype(np.int32)
    self._num = len(self._labels)
    self._seed = seed
    self._global_batch = global_batch
    self._mesh = mesh
    self._grid = process_grid(mesh)
    self.fused = FUSE_INTO_STEP
    augment = device_augment.make_device_augment(augment_config, split.images.shape[1:])
    self.images = place_rows(np.asarray(split.images, np.uint8), self._grid)
    gather = jax.shard_map(
      functools.partial(_gather_within_process, local_rows=self.images.shape[0] // self.local),
      mesh=self._grid,
      in_specs=(PartitionSpec(LOCAL_AXIS), PartitionSpec((PROCESS_AXIS, LOCAL_AXIS))),
      out_specs=PartitionSpec((PROCESS_AXIS, LOCAL_AXIS)),
      check_vma=False,
    )

    def gather_augment(images, packed):
      index, label, seeds = unpack_rows(packed)
      return {"image": augment(gather(images, index), seeds), "label": label}

    self._gather_augment = gather_augment
    self._program = jax.jit(gather_augment, out_shardings=parallel.batch_sharded(mesh))

  @property
  def local(self) -> int:
    """Devices per process that share one copy of the split."""
    return self._grid.shape[LOCAL_AXIS]

  def bytes_per_device(self) -> int:
    return int(self.images.nbytes) // self.local

  def describe(self) -> str:
    """The start-up line's account of what is where, and the memory it takes."""
    shape = "x".join(str(d) for d in (self._num, *self.images.shape[1:]))
    copies = self._grid.shape[PROCESS_AXIS]
    copies = f"{copies} cop{'y' if copies == 1 else 'ies'}"
    return (
      f"train split {shape} uint8 ({self._num * self.row_bytes / 2**20:.1f} MiB) replicated "
      f"once per process ({copies}: any step may take any row), sharded over each process's "
      f"{self.local} device(s) ({self.bytes_per_device() / 2**20:.1f} MiB per device); "
      f"each step's indices, labels and seeds sharded over '{parallel.DATA_AXIS}', gathered and "
      "augmented on device"
    )

  @property
  def row_bytes(self) -> int:
    return int(np.prod(self.images.shape[1:]))

  def __call__(self, start_step: int, process_index: int, process_count: int) -> Iterator[dict]:
    for index, seeds in rows.train_steps(
      self._num,
      seed=self._seed,
      start_step=start_step,
      global_batch=self._global_batch,
      process_index=process_index,
      process_count=process_count,
    ):
      yield {"rows": pack_rows(index, self._labels[index], device_augment.seed_words(seeds))}

  def on_device(self, batch: dict) -> dict:
    """A sharded host batch of packed rows -> the sharded uint8 train batch and its labels."""
    return self._program(self.images, batch["rows"])

  def fuse(self, step: Callable) -> Callable:
    """`step(state, batch)` with the gather + augment compiled into the same program: a
    `(state, rows) -> step's outputs` taking `on_device`'s input, the state donated."""

    def fused(state, images, batch):
      return step(state, self._gather_augment(images, batch["rows"]))

    program = jax.jit(fused, donate_argnums=0)
    return lambda state, batch: program(state, self.images, batch)


# One int32 row per example: index, label, then the 4 seed words (uint32 bits as int32): one
# host-to-device transfer per step instead of three (each costs the host a placement call).
ROW_FIELDS = 6


def pack_rows(index: np.ndarray, labels: np.ndarray, seed_words: np.ndarray) -> np.ndarray:
  """int32 [B, ROW_FIELDS]: each example's index, label and seed words."""
  return np.concatenate(
    [index.astype(np.int32)[:, None], labels.astype(np.int32)[:, None], seed_words.view(np.int32)],
    axis=1,
  )


def unpack_rows(packed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`pack_rows` on the device: (index int32 [B], label int32 [B], seed words uint32 [B, 4])."""
  seeds = jax.lax.bitcast_convert_type(packed[:, 2:], jnp.uint32)
  return packed[:, 0], packed[:, 1], seeds


def loop_parts(train_input) -> tuple[Callable | None, Callable | None]:
  """(transform for `parallel.DevicePrefetch`, wrap for the compiled train step) that the loop
  uses for `train_input`: the device pipeline's gather + augment as a program of its own, or
  fused into the step (`FUSE_INTO_STEP`); (None, None) for host pipelines."""
  if not isinstance(train_input, DeviceTrainInput):
    return None, None
  return (None, train_input.fuse) if train_input.fused else (train_input.on_device, None)


def process_grid(mesh: Mesh) -> Mesh:
  """`mesh`'s devices as a (`PROCESS_AXIS`, `LOCAL_AXIS`) grid, each row one process's devices in
  the data axis's order (so a batch sharded over both is the batch sharded over 'data'); a mesh
  whose processes do not own contiguous runs of it gets one device per row."""
  devices = np.asarray(mesh.devices).reshape(-1)
  local = max(1, len(devices) // jax.process_count())
  grid = devices.reshape(-1, local)
  if any(len({d.process_index for d in row}) > 1 for row in grid):
    grid = devices.reshape(-1, 1)
  return Mesh(grid, (PROCESS_AXIS, LOCAL_AXIS))


def place_rows(images: np.ndarray, grid: Mesh) -> jax.Array:
  """The split on `grid`: rows padded to a multiple of the local device count and split over
  `LOCAL_AXIS`, replicated over `PROCESS_AXIS`; each process places only its own devices' rows."""
  local = grid.shape[LOCAL_AXIS]
  padded = -(-len(images) // local) * local
  shape = (padded, *images.shape[1:])
  sharding = NamedSharding(grid, PartitionSpec(LOCAL_AXIS))

  def rows_of(index):
    block = images[index[0]]
    missing = (index[0].stop or padded) - (index[0].start or 0) - len(block)
    return np.pad(block, [(0, missing)] + [(0, 0)] * 3) if missing > 0 else block

  return jax.make_array_from_callback(shape, sharding, rows_of)


def _gather_within_process(images, index, *, local_rows: int):
  """One device's part of a step's gather: its process's indices (gathered from the process's
  devices), the rows of them it holds, zeros for the rest, summed and scattered back over the
  process's devices so that each gets its own rows (exactly one device holds each row)."""
  wanted = jax.lax.all_gather(index, LOCAL_AXIS, tiled=True)
  at = wanted - jax.lax.axis_index(LOCAL_AXIS) * local_rows
  held = (at >= 0) & (at < local_rows)
  picked = jnp.take(images, jnp.clip(at, 0, local_rows - 1), axis=0)
  picked = jnp.where(held[:, None, None, None], picked, jnp.zeros_like(picked))
  return jax.lax.psum_scatter(picked, LOCAL_AXIS, scatter_dimension=0, tiled=True)
