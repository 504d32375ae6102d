"""In-memory batches: the decoded split's rows of each step (`rows`), augmented in tf.data.

The rows of a step are `rows.train_steps`' (a pure function of seed and step), so the same seed
gives the same batches run after run, a resumed run continues the same stream by starting at its
step, and P processes take disjoint shards whose union is what one process sees. Batches stay
uint8 at native resolution; upscaling and normalisation happen on device.
"""

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from jaxsam.data import device_input, rows, sources

if TYPE_CHECKING:
  import tensorflow as tf

AugmentFn = Callable[["tf.Tensor", "tf.Tensor"], "tf.Tensor"]


def hide_gpus_from_tf() -> None:
  """tf.data runs on the host only: TF must never claim GPU memory that JAX needs (nothing to
  do where TensorFlow is not installed)."""
  if not device_input.tensorflow_importable():
    return
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (the tf pipeline only)

  tf.config.set_visible_devices([], "GPU")


def _step_rows(
  split: sources.Split,
  *,
  seed: int,
  start_step: int,
  global_batch: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's unaugmented rows of every step from `start_step` on, with their seeds."""
  for index, seeds in rows.train_steps(
    len(split.labels),
    seed=seed,
    start_step=start_step,
    global_batch=global_batch,
    process_index=process_index,
    process_count=process_count,
  ):
    yield {
      "image": split.images[index],
      "label": split.labels[index].astype(np.int32),
      "seed": seeds,
    }


def train_batches(
  split: sources.Split,
  augment: AugmentFn | None,
  *,
  seed: int,
  global_batch: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless stream of this process's slices of the global train batches, from `start_step`.

  One tf.data pipeline for the whole run: the augmentation is traced once, and prefetching runs
  across epoch ends (a pipeline per epoch re-traced it and stalled each epoch's first step).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (the tf pipeline only)

  local = global_batch // process_count
  image_shape = split.images.shape[1:]
  ds = tf.data.Dataset.from_generator(
    lambda: _step_rows(
      split,
      seed=seed,
      start_step=start_step,
      global_batch=global_batch,
      process_index=process_index,
      process_count=process_count,
    ),
    output_signature={
      "image": tf.TensorSpec((local, *image_shape), tf.as_dtype(split.images.dtype)),
      "label": tf.TensorSpec((local,), tf.int32),
      "seed": tf.TensorSpec((local, 2), tf.int64),
    },
  )

  def apply_augment(batch):
    image = batch["image"] if augment is None else augment(batch["image"], batch["seed"])
    return {"image": image, "label": batch["label"]}

  ds = ds.map(apply_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def eval_batches(
  split: sources.Split, *, global_batch: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once: the last global batch is padded, with mask 0 on the padding."""
  for index, mask in rows.padded_batches(
    len(split.labels), global_batch, process_index, process_count
  ):
    yield {
      "image": split.images[index],
      "label": split.labels[index].astype(np.int32),
      "mask": mask.astype(np.float32),
    }
