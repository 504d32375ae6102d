"""Streamed batches: tfds record files and image folders read as they are trained on (tf.data).

Determinism: a seeded, skip-free design, not tf.data's iterator checkpointing. The stream is a
pure function of (seed, step), as the in-memory one, so a resumed run rebuilds it from its step
and nothing but the train state is saved. Why not checkpointing the iterator: its state holds the
shuffle buffer's records (gigabytes per process per checkpoint) and ties the checkpoint to one
process count and one pipeline graph; a pure stream resumes on any machine.
  * Image folders and .tar/.zip archives allow random access (one file per example): the rows of
    each step are `rows.train_steps`', exactly as in memory, and so are the augmentation seeds.
  * tfds record files are read in order only. Process p owns examples [p*n, (p+1)*n) of the
    split, n = N // P (tfds' even split, remainder dropped). Epoch e cuts that range at the
    record-file boundaries into pieces, permutes the pieces by (seed, e, p), groups consecutive
    pieces into windows of >= `dataset.shuffle_buffer` examples (`rows.epoch_windows`), reads
    each window whole (its files interleaved, parallel reads) and permutes it by (seed, e, p,
    window). A resumed run starts at the window holding its step: whole windows before it are
    never read, and the one it starts in is read once, as any window is (the window is the
    shuffle buffer). So resuming costs no more than the uninterrupted run spent on that window.
Decoding, crops and augmentation run in parallel tf.data maps with deterministic=True.
"""

import itertools
import threading
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from jaxsam import errors
from jaxsam.data import decode as decode_lib
from jaxsam.data import rows, transforms
from jaxsam.data.stream_sources import FolderSplit, Stream, TfdsSplit, tfds_read


def steps_per_epoch(stream: Stream, global_batch: int, process_count: int = 1) -> int:
  """Full global batches per streamed epoch (tfds: of each process's N // P examples)."""
  n = stream.train.num_examples
  if isinstance(stream.train, FolderSplit):
    return rows.steps_per_epoch(n, global_batch)
  return rows.shard_steps_per_epoch(n, global_batch, process_count)


def _read_window(split: TfdsSplit, ranges, permutation: np.ndarray) -> dict[str, np.ndarray]:
  """One window's encoded images and labels, read whole and permuted."""
  count = sum(b - a for a, b in ranges)
  ds = tfds_read(split.builder, split.split, split.image_key, ranges, split.num_examples)
  ds = ds.map(lambda ex: (ex[split.image_key], tf.cast(ex[split.label_key], tf.int32)))
  encoded, labels = ds.batch(count).get_single_element()
  encoded, labels = encoded.numpy(), labels.numpy()
  if len(labels) != count:
    raise errors.DataError(
      f"tfds dataset {split.builder.name!r} split {split.split!r}: read "
      f"{len(labels)} examples of ranges {ranges}, expected {count}"
    )
  return {"image": encoded[permutation], "label": labels[permutation]}


class _ReadAhead:
  """Reads the next window in a thread while the current one is consumed."""

  def __init__(self, read: Callable[[], dict]):
    self._result, self._error = None, None
    self._thread = threading.Thread(target=self._run, args=(read,), daemon=True)
    self._thread.start()

  def _run(self, read):
    try:
      self._result = read()
    except BaseException as e:  # noqa: BLE001 -- any failure is re-raised in the consumer
      self._error = e

  def get(self) -> dict:
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._result


def _tfds_rows(
  split: TfdsSplit,
  *,
  seed: int,
  start_step: int,
  global_batch: int,
  process_index: int,
  process_count: int,
  buffer: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's encoded rows of every step from `start_step` on, with their seeds."""
  local = global_batch // process_count
  spe = rows.shard_steps_per_epoch(split.num_examples, global_batch, process_count)
  own_rows = rows.process_rows(global_batch, process_index, process_count)
  step = start_step
  while True:
    epoch, first = divmod(step, spe)
    windows = rows.epoch_windows(
      split.num_examples,
      split.shard_lengths,
      seed=seed,
      epoch=epoch,
      process_index=process_index,
      process_count=process_count,
      buffer=buffer,
    )
    starts = np.cumsum([0] + [sum(b - a for a, b in w) for w in windows])
    begin = first * local  # this process's position in its epoch stream
    w = int(np.searchsorted(starts, begin, side="right")) - 1

    needed = spe * local  # the epoch's tail past the last full batch is never read

    def start(w, epoch=epoch, windows=windows, starts=starts, needed=needed):
      if w >= len(windows) or starts[w] >= needed:
        return None
      perm = rows.window_order(seed, epoch, process_index, w, int(starts[w + 1] - starts[w]))
      return _ReadAhead(lambda: _read_window(split, windows[w], perm))

    ahead = start(w)
    carry = {"image": np.zeros(0, object), "label": np.zeros(0, np.int32)}
    skip = begin - starts[w]
    i = first
    while i < spe:
      window = ahead.get()
      ahead = start(w + 1)
      carry = {k: np.concatenate([carry[k], window[k][skip:]]) for k in carry}
      skip = 0
      while len(carry["label"]) >= local and i < spe:
        yield {
          "image": carry["image"][:local],
          "label": carry["label"][:local],
          "seed": rows.positions(seed, epoch, i, spe, global_batch, own_rows),
        }
        carry = {k: v[local:] for k, v in carry.items()}
        i += 1
      w += 1
    step = (epoch + 1) * spe


def _folder_rows(
  split: FolderSplit,
  *,
  seed: int,
  start_step: int,
  global_batch: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's files of every step from `start_step` on, as the in-memory rows: paths, or
  an archive's member bytes (read here, at random by offset)."""
  for index, seeds in rows.train_steps(
    split.num_examples,
    seed=seed,
    start_step=start_step,
    global_batch=global_batch,
    process_index=process_index,
    process_count=process_count,
  ):
    names = split.paths[index]
    yield {
      "image": names if split.read is None else np.asarray([split.read(n) for n in names], object),
      "label": split.labels[index],
      "seed": seeds,
    }


# ------------------------------------------------------------------------------------- batches


def image_size(stream: Stream, model_size: int) -> int:
  """The side streamed batches have: `model.image_size`, else the dataset's one native side."""
  size = model_size or stream.native_size
  if not size:
    raise errors.ConfigError(
      f"dataset {stream.name!r} has images of varying size: streaming "
      "needs model.image_size=N (e.g. 224) to crop them to"
    )
  return size


def _encoded(stream_split, value) -> tf.Tensor:
  """A row's encoded image: the file it names (image folder), else the value itself (tfds
  records, archive members)."""
  if isinstance(stream_split, FolderSplit) and stream_split.read is None:
    return tf.io.read_file(value)
  return value


def train_batches(
  stream: Stream,
  augment_config,
  *,
  size: int,
  seed: int,
  global_batch: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  shuffle_buffer: int = 10_000,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless stream of this process's slices of the global train batches, from `start_step`:
  uint8 images [B/P, size, size, 3] and int32 labels.

  Each image: the random-resized crop when `augment.random_resized_crop` (scale, ratio keys),
  else the shorter side to `size` and the centre crop; then, batched, the augment ops of
  `augment.make_train_augment` (RandAugment/AutoAugment, pad-crop, flip, Cutout).
  """
  from jaxsam.data import augment as augment_lib  # pylint: disable=import-outside-toplevel

  split = stream.train
  local = global_batch // process_count
  if isinstance(split, FolderSplit):
    rows_fn = lambda: _folder_rows(
      split,
      seed=seed,
      start_step=start_step,
      global_batch=global_batch,
      process_index=process_index,
      process_count=process_count,
    )
  else:
    if shuffle_buffer < 1:
      raise errors.ConfigError(
        f"dataset.shuffle_buffer={shuffle_buffer}; expected >= 1 examples per shuffle window"
      )
    rows_fn = lambda: _tfds_rows(
      split,
      seed=seed,
      start_step=start_step,
      global_batch=global_batch,
      process_index=process_index,
      process_count=process_count,
      buffer=shuffle_buffer,
    )
  rrc = bool(augment_config.get("random_resized_crop", False))
  scale, ratio = transforms.check_crop(
    augment_config.get("crop_scale", transforms.DEFAULT_SCALE),
    augment_config.get("crop_ratio", transforms.DEFAULT_RATIO),
  )
  augment = augment_lib.make_train_augment(augment_config, image_shape=(size, size, 3))
  parallel = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True}
  rows_ds = tf.data.Dataset.from_generator(
    rows_fn,
    output_signature={
      "image": tf.TensorSpec((local,), tf.string),
      "label": tf.TensorSpec((local,), tf.int32),
      "seed": tf.TensorSpec((local, 2), tf.int64),
    },
  )

  def read(row):  # per example: the bytes and, for the crop, the side lengths in the header
    encoded = _encoded(split, row["image"])
    shape = transforms.encoded_shape(encoded) if rrc else tf.zeros([2], tf.int32)
    return {**row, "image": encoded, "shape": shape}

  def boxes(batch):  # per batch: every example's crop box in one vectorised computation
    uniforms = transforms.crop_uniforms(batch["seed"])
    box = transforms.random_resized_box(
      batch["shape"][:, 0], batch["shape"][:, 1], uniforms, scale, ratio
    )
    return {**batch, "box": box}

  def decode(row):  # per example: decode (the crop's blocks only, for JPEG) and resize
    if rrc:
      image = transforms.crop_resized(row["image"], row["box"], size)
    else:
      image = transforms.eval_crop(row["image"], size, 1.0)
    return {"image": image, "label": row["label"], "seed": row["seed"]}

  ds = rows_ds.unbatch().map(read, **parallel)
  if rrc:
    ds = ds.batch(local).map(boxes).unbatch()
  ds = ds.map(decode, **parallel).batch(local, drop_remainder=True)
  ds = ds.map(lambda b: {"image": augment(b["image"], b["seed"]), "label": b["label"]}, **parallel)
  batches = ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
  if not isinstance(split, FolderSplit):
    return batches

  def files_of_batch(k):  # step start_step + k's files, to name one that fails to decode
    steps = rows.train_steps(
      split.num_examples,
      seed=seed,
      start_step=start_step,
      global_batch=global_batch,
      process_index=process_index,
      process_count=process_count,
    )
    index, _ = next(itertools.islice(steps, k, None))
    return split.paths[index]

  return decode_lib.name_failures(batches, files_of_batch, split.read)


def eval_batches(
  stream: Stream,
  *,
  size: int,
  global_batch: int,
  crop_fraction: float = 0.875,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every test example exactly once, resized and centre-cropped to `size`; the last batches
  padded with mask 0 (pipeline.eval_batches' convention), the same count on every process."""
  split = stream.test
  crop_fraction = transforms.check_crop_fraction(crop_fraction)
  lo, hi, padded = rows.eval_ranges(split.num_examples, global_batch, process_index, process_count)
  local = global_batch // process_count
  if isinstance(split, FolderSplit) and split.read is None:
    ds = tf.data.Dataset.from_tensor_slices((split.paths[lo:hi], split.labels[lo:hi]))
  elif isinstance(split, FolderSplit):
    ds = tf.data.Dataset.from_generator(
      lambda: ((split.read(n), y) for n, y in zip(split.paths[lo:hi], split.labels[lo:hi])),
      output_signature=(tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int32)),
    )
  else:
    ds = (
      tfds_read(
        split.builder,
        split.split,
        split.image_key,
        [(lo, hi)] if hi > lo else [],
        split.num_examples,
      )
      if hi > lo
      else None
    )
    if ds is not None:
      ds = ds.map(lambda ex: (ex[split.image_key], tf.cast(ex[split.label_key], tf.int32)))

  def decode(value, label):
    image = transforms.eval_crop(_encoded(split, value), size, crop_fraction)
    return {"image": image, "label": label, "mask": tf.constant(1.0, tf.float32)}

  pad = tf.data.Dataset.from_tensors(
    {
      "image": tf.zeros([size, size, 3], tf.uint8),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0, tf.float32),
    }
  )
  pad = pad.repeat(padded - (hi - lo))
  if ds is None:
    ds = pad
  else:
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).concatenate(pad)
  batches = ds.batch(local).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
  if not isinstance(split, FolderSplit):
    return batches
  part = split.paths[lo:hi]  # a file that fails mid-run: one line naming it
  return decode_lib.name_failures(batches, lambda k: part[k * local : (k + 1) * local], split.read)


def decode_examples(
  split: TfdsSplit | FolderSplit, index: np.ndarray, *, size: int, crop_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [n, size, size, 3], int32 labels [n]) of examples `index` of a split, each
  resized and centre-cropped as the test split is (no augmentation): what analysis measures on."""
  index = np.asarray(index, np.int64)
  if isinstance(split, FolderSplit):
    names = split.paths[index]
    if split.read is None:
      encoded = tf.data.Dataset.from_tensor_slices(names).map(tf.io.read_file)
    else:
      encoded = tf.data.Dataset.from_tensor_slices(np.asarray([split.read(n) for n in names]))
    ds = tf.data.Dataset.zip((encoded, tf.data.Dataset.from_tensor_slices(split.labels[index])))
    order = np.arange(len(index))
  else:
    # Record files are read in order: the sorted examples in runs of consecutive ones.
    wanted = np.unique(index)
    breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
    ranges = [(int(r[0]), int(r[-1]) + 1) for r in np.split(wanted, breaks)]
    ds = tfds_read(split.builder, split.split, split.image_key, ranges, split.num_examples)
    ds = ds.map(lambda ex: (ex[split.image_key], tf.cast(ex[split.label_key], tf.int32)))
    order = np.searchsorted(wanted, index)
  ds = ds.map(
    lambda value, label: (transforms.eval_crop(value, size, crop_fraction), label),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  images, labels = ds.batch(max(1, len(index))).get_single_element()
  return images.numpy()[order], labels.numpy()[order]
