"""Row arithmetic: which examples each process takes at each step, and each row's seed.

The train stream is a pure function of (seed, step): epoch e is the permutation drawn from
(seed, e), global batch i is rows [i*B, (i+1)*B) of it, process p of P takes rows
[p*B/P, (p+1)*B/P) of every global batch, and each example's augmentation seed is (seed, its
position in the run). Every path uses these functions: the in-memory and streamed train batches,
the eval batches, the analysis batches, and the windows of streamed tfds record files.
"""

from collections.abc import Iterator, Sequence

import numpy as np

from jaxsam import errors


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


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that process `process_index` of `process_count` takes."""
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


def local_rows(global_rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous share of a global batch's rows."""
  return global_rows[process_rows(len(global_rows), process_index, process_count)]


def positions(
  seed: int, epoch: int, step: int, spe: int, global_batch: int, rows: slice
) -> np.ndarray:
  """Each row's augmentation seed int64 [B/P, 2]: (seed, its position in the run)."""
  position = (epoch * spe + step) * global_batch + np.arange(global_batch)[rows]
  return np.stack([np.full_like(position, seed), position], -1).astype(np.int64)


def train_steps(
  num_examples: int,
  *,
  seed: int,
  start_step: int,
  global_batch: int,
  process_index: int,
  process_count: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(example indices, their seeds) this process takes at every step from `start_step` on."""
  spe = steps_per_epoch(num_examples, global_batch)
  rows = process_rows(global_batch, process_index, process_count)
  step = start_step
  while True:
    epoch, first = divmod(step, spe)
    order = epoch_order(seed, epoch, num_examples)
    for i in range(first, spe):
      index = order[i * global_batch : (i + 1) * global_batch][rows]
      yield index, positions(seed, epoch, i, spe, global_batch, rows)
    step = (epoch + 1) * spe


def padded_batches(
  num_examples: int, global_batch: int, process_index: int, process_count: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(example indices, mask) of this process's rows of every global batch covering the examples
  once in order; rows past the end point at example 0 with mask False."""
  for start in range(0, num_examples, global_batch):
    index = local_rows(np.arange(start, start + global_batch), process_index, process_count)
    mask = index < num_examples
    yield np.where(mask, index, 0), mask


def eval_ranges(
  num_examples: int, global_batch: int, process_index: int, process_count: int
) -> tuple[int, int, int]:
  """(first, end, padded length) of this process's contiguous part of a streamed eval split:
  every process gets ceil(N / P) examples or what is left, padded to the same number of batches."""
  share = -(-num_examples // process_count)
  local = global_batch // process_count
  lo = min(process_index * share, num_examples)
  hi = min(lo + share, num_examples)
  return lo, hi, -(-share // local) * local


# ------------------------------------------------------------- tfds record files (read in order)


def shard_steps_per_epoch(num_examples: int, global_batch: int, process_count: int) -> int:
  """Full global batches per epoch when process p owns examples [p*n, (p+1)*n), n = N // P."""
  local = global_batch // process_count
  steps = (num_examples // process_count) // local
  if not steps:
    raise errors.ConfigError(
      f"batch_size={global_batch} exceeds the {num_examples // process_count} "
      f"training examples of each of {process_count} process(es); use a "
      f"batch size <= {(num_examples // process_count) * process_count}"
    )
  return steps


def file_pieces(shard_lengths: Sequence[int], lo: int, hi: int) -> list[tuple[int, int]]:
  """Example ranges [a, b) of [lo, hi) cut at the record-file boundaries."""
  pieces, start = [], 0
  for length in shard_lengths:
    a, b = max(lo, start), min(hi, start + length)
    if a < b:
      pieces.append((a, b))
    start += length
  return pieces


def epoch_windows(
  num_examples: int,
  shard_lengths: Sequence[int],
  *,
  seed: int,
  epoch: int,
  process_index: int,
  process_count: int,
  buffer: int,
) -> list[list[tuple[int, int]]]:
  """Process `process_index`'s windows of epoch `epoch`: each a list of example ranges, the
  pieces of its shard permuted by (seed, epoch, process) and grouped to >= `buffer` examples."""
  n = num_examples // process_count
  pieces = file_pieces(shard_lengths, process_index * n, (process_index + 1) * n)
  order = np.random.default_rng([seed, epoch, process_index]).permutation(len(pieces))
  windows, current, count = [], [], 0
  for i in order:
    current.append(pieces[i])
    count += pieces[i][1] - pieces[i][0]
    if count >= buffer:
      windows.append(current)
      current, count = [], 0
  if current:
    windows.append(current)
  return windows


def window_order(seed: int, epoch: int, process_index: int, window: int, size: int) -> np.ndarray:
  """The permutation of one window's examples: (seed, epoch, process, window) alone."""
  return np.random.default_rng([seed, epoch, process_index, window]).permutation(size)
