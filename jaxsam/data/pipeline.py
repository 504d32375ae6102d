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
        f"<= {num_train}")
  return num_train // global_batch


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of one epoch: a permutation determined by (seed, epoch) alone."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _epoch_dataset(split: sources.Split, augment: AugmentFn | None, *, seed: int, epoch: int,
                   first_step: int, num_steps: int, global_batch: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
  """This process's batches of steps [first_step, num_steps) of one epoch, as a tf.data pipeline."""
  order = epoch_order(seed, epoch, len(split.labels))[:num_steps * global_batch]
  order = order.reshape(num_steps, global_batch)[first_step:]
  rows = _process_rows(global_batch, process_index, process_count)
  # Global position of each example in the run, for its augmentation seed.
  positions = (epoch * num_steps + np.arange(first_step, num_steps))[:, None] * global_batch
  positions = positions + np.arange(global_batch)[None, :]
  index = order[:, rows].reshape(-1)
  position = positions[:, rows].reshape(-1)
  seeds = np.stack([np.full_like(position, seed), position], axis=-1).astype(np.int64)
  local_batch = global_batch // process_count
  ds = tf.data.Dataset.from_tensor_slices(
      {"image": split.images[index], "label": split.labels[index].astype(np.int32),
       "seed": seeds})
  ds = ds.batch(local_batch, drop_remainder=True)

  def apply_augment(batch):
    image = batch["image"] if augment is None else augment(batch["image"], batch["seed"])
    return {"image": image, "label": batch["label"]}

  return ds.map(apply_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_batches(split: sources.Split, augment: AugmentFn | None, *, seed: int,
                  global_batch: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless stream of this process's slices of the global train batches, from `start_step`."""
  num_steps = steps_per_epoch(len(split.labels), global_batch)
  epoch, first = divmod(start_step, num_steps)
  while True:
    ds = _epoch_dataset(split, augment, seed=seed, epoch=epoch, first_step=first,
                        num_steps=num_steps, global_batch=global_batch,
                        process_index=process_index, process_count=process_count)
    yield from ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    epoch, first = epoch + 1, 0


def eval_batches(split: sources.Split, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once: the last global batch is padded, with mask 0 on the padding."""
  n = len(split.labels)
  num_batches = -(-n // global_batch)
  rows = _process_rows(global_batch, process_index, process_count)
  for b in range(num_batches):
    index = np.arange(b * global_batch, (b + 1) * global_batch)[rows]
    mask = index < n
    index = np.where(mask, index, 0)
    yield {"image": split.images[index], "label": split.labels[index].astype(np.int32),
           "mask": mask.astype(np.float32)}
