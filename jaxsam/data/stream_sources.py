"""Opening a dataset to stream: its splits listed (tfds record files, image-folder files or
archive members), nothing decoded.

tfds splits are read in order from their record files (`streaming` reads windows of them);
image folders and `.tar`/`.zip` archives allow random access, one file per example; a compressed
tar is unpacked once first (`archives`).
"""

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from jaxsam import errors
from jaxsam.data import archives, decode, image_folder, sources

if TYPE_CHECKING:
  import tensorflow as tf

STREAMABLE_SOURCES = ("tfds", "image_folder")


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
  """One image-folder split: a name and a class index per example (sorted order). `read` is
  None when the names are files (read inside the tf.data graph), else it reads an archive
  member's bytes by name."""

  paths: np.ndarray  # str
  labels: np.ndarray  # int32
  read: Callable[[str], bytes] | None = None

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
  mean: tuple[float, float, float] = sources.IMAGENET_MEAN
  std: tuple[float, float, float] = sources.IMAGENET_STD
  eval_crop_fraction: float = 0.875
  skipped_images: int = 0  # bad files left out (dataset.skip_bad_images)
  note: str = ""  # the source's start-up line ('' = none)


# -------------------------------------------------------------------------------------- tfds


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


def tfds_read(
  builder, split: str, image_key: str, ranges: Sequence[tuple[int, int]], num_examples: int
) -> "tf.data.Dataset":
  """Examples [a, b) of each range, in that order, as tfds examples with the image left encoded
  (decoded later, cropped first where the format allows); files interleaved in parallel."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
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
  return builder.as_dataset(
    split=spec,
    shuffle_files=False,
    read_config=read_config,
    decoders={image_key: tfds.decode.SkipDecoding()},
  )


def tfds_count(builder, split: str, image_key: str) -> int:
  """Examples in a split: from its metadata, else (unprepared metadata, as mock data) by reading."""
  try:
    return int(builder.info.splits[split].num_examples)
  except KeyError:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _open_tfds_split(builder, split: str, image_key: str, label_key: str, name: str) -> TfdsSplit:
  count = tfds_count(builder, split, image_key)
  if not count:
    raise errors.DataError(f"tfds dataset {name!r} split {split!r} has no images")
  try:
    shard_lengths = tuple(int(n) for n in builder.info.splits[split].shard_lengths)
  except KeyError:
    shard_lengths = (count,)
  if sum(shard_lengths) != count:
    shard_lengths = (count,)
  return TfdsSplit(builder, split, image_key, label_key, count, shard_lengths)


def open_tfds(dataset_config, builder=None) -> Stream:
  """A prepared tfds dataset as a Stream; `builder`: what `sources.prepare` returned."""
  builder = builder or sources.prepare(dataset_config)
  image_key, label_key = tfds_keys(builder, dataset_config.name)
  shape = builder.info.features[image_key].shape
  native = shape[0] if shape[0] is not None and shape[0] == shape[1] else 0
  splits = [
    _open_tfds_split(builder, s, image_key, label_key, dataset_config.name)
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


# ------------------------------------------------------------------------------ image folder


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """An image folder or archive opened for random access: its splits' files, and their bytes."""

  tree: image_folder.Tree
  path: str
  archive: bool  # members are read by `read`, not as files

  def names(self, split: str) -> list[str]:
    """One split's image names, listed only (no header read): what the size estimate samples."""
    _, members, _ = image_folder.list_split(self.tree, self.path, split)
    return [n for images in members for n in images]

  def read(self, name: str) -> bytes:
    return self.tree.read(name)

  def where(self, name: str) -> str:
    return self.tree.where(name)

  def scan(self, dataset_config, splits) -> image_folder.Scan:
    """`splits` listed and every header checked (`image_folder.scan`: bad files, pixel limit)."""
    return image_folder.scan(
      self.path,
      splits,
      max_pixels=decode.check_max_pixels(
        dataset_config.get("max_image_pixels", decode.DEFAULT_MAX_PIXELS)
      ),
      skip_bad=bool(dataset_config.get("skip_bad_images", False)),
      tree=self.tree,
    )

  def split(self, names, labels) -> FolderSplit:
    """A FolderSplit of these names: member names read by the tree, or file paths as bytes (any
    file name reaches TF intact)."""
    if self.archive:
      return FolderSplit(np.asarray(names), labels, self.tree.read)
    paths = np.asarray([os.fsencode(self.tree.where(n)) for n in names], dtype=object)
    return FolderSplit(paths, labels)


# A compressed tar up to this size is read through into memory to list it when it may not be
# streamed (`unpack=False`); a larger one is unpacked, as streaming it would need anyway.
READ_THROUGH_BYTES = 1 << 30


def folder_listing(dataset_config, unpack: bool = True) -> FolderListing:
  """`dataset.path` opened for random access: a compressed tar is unpacked once into the cache,
  or with `unpack=False` (to look, not to stream) read through into memory when it is small."""
  path = os.path.expanduser(dataset_config.path)
  if not unpack and (
    not archives.is_compressed_tar(path) or os.path.getsize(path) <= READ_THROUGH_BYTES
  ):
    return FolderListing(image_folder.open_tree(path), path, image_folder.kind(path) != "folder")
  root = archives.random_access_path(path, dataset_config.get("cache_dir", ""))
  return FolderListing(image_folder.open_tree(root), path, image_folder.kind(root) != "folder")


def open_folder(dataset_config) -> Stream:
  """An image folder or archive as a Stream: files listed and their headers checked
  (image_folder.scan), nothing decoded."""
  listing = folder_listing(dataset_config)
  splits = (dataset_config.train_split, dataset_config.test_split)
  found = listing.scan(dataset_config, splits)
  train, test = (listing.split(names, labels) for names, labels in found.splits)
  skipped = {listing.where(n): why for n, why in found.skipped.items()}
  counts = [(s, len(labels)) for s, (_, labels) in zip(splits, found.splits, strict=True)]
  return Stream(
    dataset_config.name,
    train,
    test,
    len(found.classes),
    tuple(found.classes),
    native_size=dataset_config.image_size,
    skipped_images=len(skipped),
    note=image_folder.describe(listing.path, found.ignored, skipped, counts),
  )


def open_stream(dataset_config, builder=None) -> Stream:
  """The Stream for `config.dataset` (tfds or an image folder); DataError for other sources."""
  source = sources.source_name(dataset_config)
  from jaxsam.data import transforms  # pylint: disable=import-outside-toplevel  (TensorFlow)

  fraction = transforms.check_crop_fraction(dataset_config.get("eval_crop_fraction", 0.875))
  if source == "tfds":
    return dataclasses.replace(open_tfds(dataset_config, builder), eval_crop_fraction=fraction)
  if source == "image_folder":
    return dataclasses.replace(open_folder(dataset_config), eval_crop_fraction=fraction)
  raise errors.DataError(
    f"dataset.source={source!r} cannot be streamed; streamable: {list(STREAMABLE_SOURCES)}"
  )
