"""Data larger than memory: tfds record files and image folders read as they are trained on.

`dataset.in_memory` picks the path: 'true' (sources.load_dataset, every image decoded in host
memory), 'false' (this module), 'auto' (stream when the decoded train split would exceed
AUTO_MEMORY_FRACTION of host memory, or when its images have no single size).

Determinism: a seeded, skip-free design, not tf.data's iterator checkpointing. The stream is a
pure function of (seed, step), as the in-memory one, so a resumed run rebuilds it from its step
and nothing but the train state is saved. Why not checkpointing the iterator: its state holds the
shuffle buffer's records (gigabytes per process per checkpoint) and ties the checkpoint to one
process count and one pipeline graph; a pure stream resumes on any machine.
  * Image folders allow random access (one file per example): epoch e is the permutation of
    (seed, e) over all files, process p takes rows [p*B/P, (p+1)*B/P) of every global batch, and
    each example's augmentation seed is its position in the run, exactly as in memory.
  * tfds record files are read in order only. Process p owns examples [p*n, (p+1)*n) of the
    split, n = N // P (tfds' even split, remainder dropped). Epoch e cuts that range at the
    record-file boundaries into pieces, permutes the pieces by (seed, e, p), groups consecutive
    pieces into windows of >= `dataset.shuffle_buffer` examples, reads each window whole (its files
    interleaved, parallel reads) and permutes it by (seed, e, p, window). A resumed run starts at
    the window holding its step: whole windows before it are never read, and the one it starts in
    is read once, as any window is (the window is the shuffle buffer). So resuming costs no more
    than the uninterrupted run spent on that window: skip-free.
Decoding, crops and augmentation run in parallel tf.data maps with deterministic=True.
"""

import dataclasses
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from jaxsam import errors
from jaxsam.data import decode as decode_lib
from jaxsam.data import image_folder, pipeline, sources, train_split, transforms

IN_MEMORY_CHOICES = ("auto", "true", "false")
# The in-memory path holds the decoded split plus an epoch's gathered copy and tf.data's buffers:
# streaming starts well before the split itself would fill the host.
AUTO_MEMORY_FRACTION = 0.25
STREAMABLE_SOURCES = ("tfds", "image_folder")
# Streamed sets are not scanned for channel statistics: ImageNet's, as pretrained weights use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------- choice


def host_memory_bytes() -> int:
  """Physical memory of this host."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _in_memory_setting(dataset_config) -> str:
  value = str(dataset_config.get("in_memory", "true")).lower()  # older configs: in memory
  if value not in IN_MEMORY_CHOICES:
    raise errors.ConfigError(
      f"dataset.in_memory={dataset_config.in_memory!r}; expected one of {list(IN_MEMORY_CHOICES)}"
    )
  return value


def _source(dataset_config) -> str:
  return sources._source_name(dataset_config)  # pylint: disable=protected-access


def decoded_estimate(dataset_config) -> tuple[int | None, str]:
  """(bytes of the decoded train split, or None when its images have no single size; what it
  was estimated from), read from the dataset's metadata without decoding it."""
  source = _source(dataset_config)
  if source == "tfds":
    sources.prepare(dataset_config)  # split sizes are known once prepared
    builder = sources._tfds_builder(dataset_config)  # pylint: disable=protected-access
    image_key, _ = tfds_keys(builder, dataset_config.name)
    shape = builder.info.features[image_key].shape
    count = _tfds_count(builder, dataset_config.train_split, image_key)
    if None in shape[:2]:
      return None, f"{count} images of varying size"
    return count * shape[0] * shape[1] * 3, f"{count} images of {shape[1]}x{shape[0]}"
  path = os.path.expanduser(dataset_config.path)
  listed = image_folder.scan(path, (dataset_config.train_split,), check=False)  # names only
  names = [listed.tree.where(n) for n in listed.splits[0][0]]
  if dataset_config.image_size:
    side = dataset_config.image_size
    return len(names) * side * side * 3, f"{len(names)} images at {side}x{side}"
  sizes = _header_sizes(names[:: max(1, len(names) // 64)])
  if not sizes:  # every sampled file is bad: open_folder names them
    return None, f"{len(names)} images in {path}"
  if len(set(sizes)) > 1:
    return None, f"{len(names)} images of varying size in {path}"
  w, h = sizes[0]
  return len(names) * w * h * 3, f"{len(names)} images of {w}x{h}"


def _header_sizes(paths: Sequence[str]) -> list[tuple[int, int]]:
  """Image sizes read from the files' headers (PIL reads no pixels until asked)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  sizes = []
  for path in paths:
    try:
      with Image.open(path) as image:
        sizes.append(image.size)
    except (OSError, SyntaxError, ValueError):  # PIL's errors for a bad file
      continue  # the listing's header check names it
  return sizes


def choose(dataset_config, memory_bytes: int | None = None) -> tuple[bool, str]:
  """(stream?, one line saying which path and why) for `config.dataset`.

  Raises:
    ConfigError: an unknown `dataset.in_memory`, or 'false' for a source that cannot stream.
  """
  setting = _in_memory_setting(dataset_config)
  source = _source(dataset_config)
  name = dataset_config.name
  streamable = source in STREAMABLE_SOURCES and not (
    source == "image_folder" and not os.path.isdir(os.path.expanduser(dataset_config.path))
  )
  if setting == "true" or (setting == "auto" and not streamable):
    why = "dataset.in_memory='true'" if setting == "true" else f"source {source!r} is in memory"
    return False, f"jaxsam: dataset {name!r} decoded in memory ({why})"
  if not streamable:
    raise errors.ConfigError(
      f"dataset.in_memory='false' streams tfds datasets and image folders (a folder, not an "
      f"archive: extract it first); {name!r} is source {source!r} at "
      f"{dataset_config.path or dataset_config.data_dir or 'its default place'!r}; use "
      "dataset.in_memory='true' or 'auto'"
    )
  if setting == "false":
    return True, f"jaxsam: dataset {name!r} streamed from files (dataset.in_memory='false')"
  size, what = decoded_estimate(dataset_config)
  memory = host_memory_bytes() if memory_bytes is None else memory_bytes
  limit = AUTO_MEMORY_FRACTION * memory
  if size is None:
    return True, (
      f"jaxsam: dataset {name!r} streamed from files: {what} (in memory needs one "
      "size; dataset.in_memory='auto')"
    )
  stream = size > limit
  verdict = "streamed from files" if stream else "decoded in memory"
  sign = ">" if stream else "<="
  return stream, (
    f"jaxsam: dataset {name!r} {verdict}: {what} decode to {size / 2**30:.1f} GiB "
    f"{sign} {AUTO_MEMORY_FRACTION:.0%} of host memory {memory / 2**30:.1f} GiB "
    "(dataset.in_memory='auto')"
  )


# -------------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
  """One tfds split read from its record files: `num_examples` in `shard_lengths` per file."""

  builder: object
  split: str
  image_key: str
  label_key: str
  num_examples: int
  shard_lengths: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """One image-folder split: a file path and a class index per example (sorted order)."""

  paths: np.ndarray  # str
  labels: np.ndarray  # int32

  @property
  def num_examples(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Stream:
  """A dataset to stream: its splits, class count and (where fixed) native image side."""

  name: str
  train: TfdsSplit | FolderSplit
  test: TfdsSplit | FolderSplit
  num_classes: int
  class_names: tuple[str, ...] = ()
  native_size: int = 0  # 0 = images of varying size
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  eval_crop_fraction: float = 0.875
  skipped_images: int = 0  # bad files left out (dataset.skip_bad_images)
  note: str = ""  # the source's start-up line ('' = none)


def tfds_keys(builder, name: str) -> tuple[str, str]:
  """(image key, label key) of a tfds image-classification dataset; DataError otherwise."""
  keys = builder.info.supervised_keys
  if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
    raise errors.DataError(
      f"tfds dataset {name!r} has no (image, label) supervised keys (got "
      f"{keys!r}); only image-classification datasets are supported"
    )
  if not hasattr(builder.info.features[keys[1]], "num_classes"):
    raise errors.DataError(
      f"tfds dataset {name!r}: label {keys[1]!r} is not a ClassLabel; only "
      "image-classification datasets are supported"
    )
  return keys


def _tfds_read(
  builder, split: str, image_key: str, ranges: Sequence[tuple[int, int]], num_examples: int
) -> tf.data.Dataset:
  """Examples [a, b) of each range, in that order, as (encoded image, label); files interleaved
  in parallel, images left encoded (decoded later, cropped first where the format allows)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  if list(ranges) == [(0, num_examples)]:
    spec = split  # the whole split (also what tfds.testing.mock_data serves)
  else:
    instructions = [tfds.core.ReadInstruction(split, from_=a, to=b, unit="abs") for a, b in ranges]
    spec = instructions[0]
    for instruction in instructions[1:]:
      spec = spec + instruction
  read_config = tfds.ReadConfig(
    interleave_cycle_length=16,
    skip_prefetch=True,
    num_parallel_calls_for_interleave_files=tf.data.AUTOTUNE,
  )
  ds = builder.as_dataset(
    split=spec,
    shuffle_files=False,
    read_config=read_config,
    decoders={image_key: tfds.decode.SkipDecoding()},
  )
  return ds


def _tfds_count(builder, split: str, image_key: str) -> int:
  """Examples in a split: from its metadata, else (unprepared metadata, as mock data) by reading."""
  try:
    return int(builder.info.splits[split].num_examples)
  except KeyError:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _tfds_split(builder, split: str, image_key: str, label_key: str, name: str) -> TfdsSplit:
  count = _tfds_count(builder, split, image_key)
  if not count:
    raise errors.DataError(f"tfds dataset {name!r} split {split!r} has no images")
  try:
    shard_lengths = tuple(int(n) for n in builder.info.splits[split].shard_lengths)
  except KeyError:
    shard_lengths = (count,)
  if sum(shard_lengths) != count:
    shard_lengths = (count,)
  return TfdsSplit(builder, split, image_key, label_key, count, shard_lengths)


def open_tfds(dataset_config) -> Stream:
  """A prepared tfds dataset (`sources.prepare` first on process 0) as a Stream."""
  sources.prepare(dataset_config)
  builder = sources._tfds_builder(dataset_config)  # pylint: disable=protected-access
  image_key, label_key = tfds_keys(builder, dataset_config.name)
  shape = builder.info.features[image_key].shape
  native = shape[0] if shape[0] is not None and shape[0] == shape[1] else 0
  splits = [
    _tfds_split(builder, s, image_key, label_key, dataset_config.name)
    for s in (dataset_config.train_split, dataset_config.test_split)
  ]
  label = builder.info.features[label_key]
  return Stream(
    dataset_config.name,
    splits[0],
    splits[1],
    int(label.num_classes),
    tuple(getattr(label, "names", ()) or ()),
    native_size=native,
  )


def open_folder(dataset_config) -> Stream:
  """An extracted image folder as a Stream: files listed and their headers checked
  (image_folder.scan), nothing decoded. Paths are bytes, so any file name reaches TF intact."""
  path = os.path.expanduser(dataset_config.path)
  splits = (dataset_config.train_split, dataset_config.test_split)
  found = image_folder.scan(
    path,
    splits,
    max_pixels=decode_lib.check_max_pixels(
      dataset_config.get("max_image_pixels", decode_lib.DEFAULT_MAX_PIXELS)
    ),
    skip_bad=bool(dataset_config.get("skip_bad_images", False)),
  )
  where = found.tree.where
  folder_splits = [
    FolderSplit(np.asarray([os.fsencode(where(n)) for n in names], dtype=object), labels)
    for names, labels in found.splits
  ]
  skipped = {where(n): why for n, why in found.skipped.items()}
  counts = [(s, len(labels)) for s, (_, labels) in zip(splits, found.splits, strict=True)]
  return Stream(
    dataset_config.name,
    folder_splits[0],
    folder_splits[1],
    len(found.classes),
    found.classes,
    native_size=dataset_config.image_size,
    skipped_images=len(skipped),
    note=image_folder.describe(path, found.ignored, skipped, counts),
  )


def open_stream(dataset_config) -> Stream:
  """The Stream for `config.dataset` (tfds or an image folder); DataError for other sources."""
  source = _source(dataset_config)
  fraction = transforms.check_crop_fraction(dataset_config.get("eval_crop_fraction", 0.875))
  if source == "tfds":
    return dataclasses.replace(open_tfds(dataset_config), eval_crop_fraction=fraction)
  if source == "image_folder":
    return dataclasses.replace(open_folder(dataset_config), eval_crop_fraction=fraction)
  raise errors.DataError(
    f"dataset.source={source!r} cannot be streamed; streamable: {list(STREAMABLE_SOURCES)}"
  )


# ----------------------------------------------------------------------------------- batch rows


def steps_per_epoch(stream: Stream, global_batch: int, process_count: int = 1) -> int:
  """Full global batches per streamed epoch (tfds: of each process's N // P examples)."""
  n = stream.train.num_examples
  if isinstance(stream.train, FolderSplit):
    return pipeline.steps_per_epoch(n, global_batch)
  local = global_batch // process_count
  steps = (n // process_count) // local
  if not steps:
    raise errors.ConfigError(
      f"batch_size={global_batch} exceeds the {n // process_count} "
      f"training examples of each of {process_count} process(es); use a "
      f"batch size <= {(n // process_count) * process_count}"
    )
  return steps


def file_pieces(shard_lengths: Sequence[int], lo: int, hi: int) -> list[tuple[int, int]]:
  """[lo, hi) cut at the record-file boundaries: ranges that each read from one file."""
  pieces, start = [], 0
  for length in shard_lengths:
    a, b = max(lo, start), min(hi, start + length)
    if a < b:
      pieces.append((a, b))
    start += length
  return pieces


def epoch_windows(
  split: TfdsSplit, *, seed: int, epoch: int, process_index: int, process_count: int, buffer: int
) -> list[list[tuple[int, int]]]:
  """Process `process_index`'s windows of epoch `epoch`: each a list of example ranges, the
  pieces of its shard permuted by (seed, epoch, process) and grouped to >= `buffer` examples."""
  n = split.num_examples // process_count
  pieces = file_pieces(split.shard_lengths, process_index * n, (process_index + 1) * n)
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


def _read_window(split: TfdsSplit, ranges, permutation: np.ndarray) -> dict[str, np.ndarray]:
  """One window's encoded images and labels, read whole and permuted."""
  count = sum(b - a for a, b in ranges)
  ds = _tfds_read(split.builder, split.split, split.image_key, ranges, split.num_examples)
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


def _positions(
  seed: int, epoch: int, step: int, spe: int, global_batch: int, rows: slice
) -> np.ndarray:
  """Each row's augmentation seed (seed, its position in the run), as in memory."""
  position = (epoch * spe + step) * global_batch + np.arange(global_batch)[rows]
  return np.stack([np.full_like(position, seed), position], -1).astype(np.int64)


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
  n = split.num_examples // process_count
  spe = n // local
  rows = pipeline._process_rows(global_batch, process_index, process_count)  # pylint: disable=protected-access
  step = start_step
  while True:
    epoch, first = divmod(step, spe)
    windows = epoch_windows(
      split,
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
      perm = np.random.default_rng([seed, epoch, process_index, w]).permutation(
        int(starts[w + 1] - starts[w])
      )
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
          "seed": _positions(seed, epoch, i, spe, global_batch, rows),
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
  """This process's file paths of every step from `start_step` on, as the in-memory rows."""
  n = split.num_examples
  spe = pipeline.steps_per_epoch(n, global_batch)
  rows = pipeline._process_rows(global_batch, process_index, process_count)  # pylint: disable=protected-access
  step = start_step
  while True:
    epoch, first = divmod(step, spe)
    order = pipeline.epoch_order(seed, epoch, n)
    for i in range(first, spe):
      index = order[i * global_batch : (i + 1) * global_batch][rows]
      yield {
        "image": split.paths[index],
        "label": split.labels[index],
        "seed": _positions(seed, epoch, i, spe, global_batch, rows),
      }
    step = (epoch + 1) * spe


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
  """A row's encoded image: the value itself (tfds) or the file it names (image folder)."""
  return tf.io.read_file(value) if isinstance(stream_split, FolderSplit) else value


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

  def decode(row):
    encoded = _encoded(split, row["image"])
    if rrc:
      image = transforms.train_crop(encoded, row["seed"], size, scale, ratio)
    else:
      image = transforms.eval_crop(encoded, size, 1.0)
    return {"image": image, "label": row["label"], "seed": row["seed"]}

  rows = tf.data.Dataset.from_generator(
    rows_fn,
    output_signature={
      "image": tf.TensorSpec((local,), tf.string),
      "label": tf.TensorSpec((local,), tf.int32),
      "seed": tf.TensorSpec((local, 2), tf.int64),
    },
  )
  ds = rows.unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.map(
    lambda b: {"image": augment(b["image"], b["seed"]), "label": b["label"]},
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  batches = ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
  if isinstance(split, FolderSplit):  # a file that fails mid-run: one line naming it
    return decode_lib.name_failures(
      batches, lambda k: next(itertools.islice(rows_fn(), k, None))["image"]
    )
  return batches


def eval_ranges(
  num_examples: int, global_batch: int, process_index: int, process_count: int
) -> tuple[int, int, int]:
  """(first, end, padded length) of this process's contiguous part of an eval split: every
  process gets ceil(N / P) examples or what is left, padded to the same number of batches."""
  share = -(-num_examples // process_count)
  local = global_batch // process_count
  lo = min(process_index * share, num_examples)
  hi = min(lo + share, num_examples)
  return lo, hi, -(-share // local) * local


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
  lo, hi, padded = eval_ranges(split.num_examples, global_batch, process_index, process_count)
  local = global_batch // process_count
  if isinstance(split, FolderSplit):
    ds = tf.data.Dataset.from_tensor_slices((split.paths[lo:hi], split.labels[lo:hi]))
  else:
    ds = (
      _tfds_read(
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
  if isinstance(split, FolderSplit):  # a file that fails mid-run: one line naming it
    part = split.paths[lo:hi]
    return decode_lib.name_failures(batches, lambda k: part[k * local : (k + 1) * local])
  return batches


# ----------------------------------------------------------------- what the train loop calls
# One call per concern, each serving the in-memory path (sources + pipeline) or the streamed one.

Data = sources.DatasetArrays | Stream


def load(config, main: bool = True) -> Data:
  """`config.dataset` in memory or as a Stream, as `dataset.in_memory` picks (one line on main)."""
  stream, line = choose(config.dataset)
  if main:
    print(line, flush=True)
  data = sources.load_dataset(config.dataset) if not stream else open_stream(config.dataset)
  if main and data.note:
    print(data.note, flush=True)
  return data


def apply_train_split(data: Data, config) -> Data:
  """train_split's subset and label noise in memory; ConfigError when streaming asks for them."""
  if isinstance(data, sources.DatasetArrays):
    return train_split.apply(data, config.dataset, config.seed)
  for key, off in (("train_examples", 0), ("label_noise", 0.0)):
    if config.dataset.get(key, off) != off:
      raise errors.ConfigError(
        f"dataset.{key}={config.dataset[key]!r} needs the train split in "
        f"memory; set dataset.in_memory='true' or dataset.{key}={off}"
      )
  return data


def native_size(data: Data, model_size: int) -> int:
  """The side of the images a batch holds before the device resizes them to the model's."""
  if isinstance(data, sources.DatasetArrays):
    return data.train.images.shape[1]
  return image_size(data, model_size)


def num_train(data: Data) -> int:
  return (
    len(data.train.labels) if isinstance(data, sources.DatasetArrays) else data.train.num_examples
  )


def train_steps_per_epoch(data: Data, global_batch: int, process_count: int) -> int:
  if isinstance(data, sources.DatasetArrays):
    return pipeline.steps_per_epoch(len(data.train.labels), global_batch)
  return steps_per_epoch(data, global_batch, process_count)


def train_input(config, data: Data, *, size: int) -> Callable[..., Iterator[dict]]:
  """`batches(start_step, process_index, process_count)`, the augmentation built (and its config
  checked) now, before anything is written."""
  from jaxsam.data import augment as augment_lib  # pylint: disable=import-outside-toplevel

  if isinstance(data, sources.DatasetArrays):
    augment = augment_lib.make_train_augment(
      config.augment, image_shape=data.train.images.shape[1:]
    )
    return lambda start_step, process_index, process_count: pipeline.train_batches(
      data.train,
      augment,
      seed=config.seed,
      global_batch=config.batch_size,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
    )
  augment_lib.make_train_augment(config.augment, image_shape=(size, size, 3))  # checks the keys
  transforms.check_crop(config.augment.crop_scale, config.augment.crop_ratio)
  transforms.check_crop_fraction(config.dataset.eval_crop_fraction)
  return lambda start_step, process_index, process_count: train_batches(
    data,
    config.augment,
    size=size,
    seed=config.seed,
    global_batch=config.batch_size,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
    shuffle_buffer=config.dataset.shuffle_buffer,
  )


def test_batches(
  data: Data, *, global_batch: int, size: int, process_index: int, process_count: int
) -> Iterator[dict]:
  """The test split once, padded with mask 0, in memory or streamed."""
  if isinstance(data, sources.DatasetArrays):
    return pipeline.eval_batches(
      data.test, global_batch=global_batch, process_index=process_index, process_count=process_count
    )
  return eval_batches(
    data,
    size=size,
    global_batch=global_batch,
    crop_fraction=data.eval_crop_fraction,
    process_index=process_index,
    process_count=process_count,
  )
