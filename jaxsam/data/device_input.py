"""On-device train input for in-memory data: the train split lives on the devices as uint8, and
each step's rows are gathered and augmented there (`device_augment`) from (index, seed).

The host still decides which examples each step takes and each one's seed (`rows.train_steps`,
the same arithmetic as the tf.data path), so both pipelines give the same batches for the same
(seed, step) and a run resumed on either continues the same stream. What travels per step is
B int32 indices, B labels and B x 4 seed words instead of B images. Imports no TensorFlow.
"""

import importlib.util
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxsam import errors, parallel
from jaxsam.data import device_augment, rows, sources

PIPELINES = ("tf", "device", "auto")


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
  every step: {"index": int32 [B/P], "label": int32 [B/P], "seed": uint32 [B/P, 4]}; the loop
  shards them over 'data' (`parallel.DevicePrefetch`) and `on_device` turns each sharded batch
  into {"image": uint8 [B, H, W, 3], "label"} by one jitted gather + augment, dispatched
  asynchronously, so the step before still runs while it is queued.
  """

  def __init__(self, split: sources.Split, augment_config, *, seed: int, global_batch: int, mesh):
    self._labels = np.asarray(split.labels).astype(np.int32)
    self._num = len(self._labels)
    self._seed = seed
    self._global_batch = global_batch
    self._mesh = mesh
    augment = device_augment.make_device_augment(augment_config, split.images.shape[1:])
    # The whole split on every device, once (replicated: any example may fall on any device).
    self.images = parallel.replicate(np.asarray(split.images, np.uint8), mesh)
    out = parallel.batch_sharded(mesh)

    def gather_augment(images, index, seeds):
      return augment(jnp.take(images, index, axis=0), seeds)

    self._program = jax.jit(gather_augment, out_shardings=out)

  def bytes_per_device(self) -> int:
    return int(self.images.nbytes)

  def describe(self) -> str:
    """The start-up line's account of what is where."""
    shape = "x".join(str(d) for d in self.images.shape)
    return (
      f"train split {shape} uint8 replicated on each of {self._mesh.devices.size} device(s) "
      f"({self.bytes_per_device() / 2**20:.1f} MiB per device); each step's indices, labels and "
      f"seeds sharded over '{parallel.DATA_AXIS}', gathered and augmented on device"
    )

  def __call__(self, start_step: int, process_index: int, process_count: int) -> Iterator[dict]:
    for index, seeds in rows.train_steps(
      self._num,
      seed=self._seed,
      start_step=start_step,
      global_batch=self._global_batch,
      process_index=process_index,
      process_count=process_count,
    ):
      yield {
        "index": index.astype(np.int32),
        "label": self._labels[index],
        "seed": device_augment.seed_words(seeds),
      }

  def on_device(self, batch: dict) -> dict:
    """A sharded host batch of indices and seeds -> the sharded uint8 train batch."""
    return {
      "image": self._program(self.images, batch["index"], batch["seed"]),
      "label": batch["label"],
    }
