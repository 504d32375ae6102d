"""Host input pipeline: seeded per-epoch shuffles, per-process slices, augmentation, eval padding.

The train stream is a pure function of (seed, step): epoch e is the permutation drawn from
(seed, e), global batch i is rows [i*B, (i+1)*B) of it, and each example's augmentation seed is
(seed, its position in the run). So the same seed gives the same batches run after run, a resumed
run continues the same stream by starting at its step, and P processes each take rows
[p*B/P, (p+1)*B/P) of every global batch: disjoint shards whose union is what one process sees.
Batches stay uint8 at native resolution; upscaling and normalisation happen on device.
"""

from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from jaxsam import errors
from jaxsam.data import sources

AugmentFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def hide_gpus_from_tf() -> None:
  """tf.data runs on the host only: TF must never claim GPU memory that JAX needs."""
  tf.config.set_visible_devices([], "GPU")


def steps_per_epoch(num_train: int, global_batch: int) -> int:
  """Full global batches per epoch (the last partial batch is dropped in training only)."""
  if num_train < global_batch:
    raise errors.ConfigError(
      f"batch_size={global_batch} exceeds the {num_train} training examples; use a batch size "
      f"<= {num_train}"
    )
  return num_train // global_batch


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of one epoch: a permutation determined by (seed, epoch) alone."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


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
  num_steps = steps_per_epoch(len(split.labels), global_batch)
  rows = _process_rows(global_batch, process_index, process_count)
  step = start_step
  while True:
    epoch, first = divmod(step, num_steps)
    order = epoch_order(seed, epoch, len(split.labels))[: num_steps * global_batch]
    for i in range(first, num_steps):
      index = order[i * global_batch : (i + 1) * global_batch][rows]
      # Global position of each example in the run, for its augmentation seed.
      position = (epoch * num_steps + i) * global_batch + np.arange(global_batch)[rows]
      yield {
        "image": split.images[index],
        "label": split.labels[index].astype(np.int32),
        "seed": np.stack([np.full_like(position, seed), position], -1).astype(np.int64),
      }
    step = (epoch + 1) * num_steps


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
  local = global_batch // process_count
  image_shape = split.images.shape[1:]
  rows = tf.data.Dataset.from_generator(
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

  ds = rows.map(apply_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def eval_batches(
  split: sources.Split, *, global_batch: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once: the last global batch is padded, with mask 0 on the padding."""
  n = len(split.labels)
  num_batches = -(-n // global_batch)
  rows = _process_rows(global_batch, process_index, process_count)
  for b in range(num_batches):
    index = np.arange(b * global_batch, (b + 1) * global_batch)[rows]
    mask = index < n
    index = np.where(mask, index, 0)
    yield {
      "image": split.images[index],
      "label": split.labels[index].astype(np.int32),
      "mask": mask.astype(np.float32),
    }
