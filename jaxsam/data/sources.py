"""Dataset sources: each turns `config.dataset` into uint8 images and int32 labels in memory.

Images stay at native resolution (CIFAR-sized datasets fit in host memory); upscaling to the
model's resolution happens on device. Which source runs is chosen by `dataset.name` ('digits')
or else by `dataset.source` ('tfds' | 'cifar_python'), through the explicit `SOURCES` registry.
"""

import dataclasses
import io
import os
import pickle
import tarfile
from typing import Callable

import numpy as np

from jaxsam.errors import DataError


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: uint8 images [N, H, W, 3] at native resolution and int32 labels [N]."""

  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class DatasetArrays:
  """A whole dataset in memory, with per-channel train-set mean/std on the 0-1 scale."""

  name: str
  train: Split
  test: Split
  num_classes: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 images [N, H, W, C] on the 0-1 scale (float64 sums)."""
  pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return tuple(float(m) for m in pixels.mean(0)), tuple(float(s) for s in pixels.std(0))


def _to_rgb(images: np.ndarray) -> np.ndarray:
  """Grey [N, H, W] or [N, H, W, 1] -> [N, H, W, 3]; RGB passes through."""
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def _make_dataset(name: str, train: Split, test: Split, num_classes: int) -> DatasetArrays:
  """Builds DatasetArrays with train-set channel statistics, checking dtypes and shapes."""
  for split in (train, test):
    if split.images.dtype != np.uint8 or split.images.ndim != 4 or split.images.shape[-1] != 3:
      raise DataError(f"dataset {name!r}: expected uint8 images [N, H, W, 3], got "
                      f"{split.images.dtype} {split.images.shape}")
    if len(split.images) != len(split.labels):
      raise DataError(f"dataset {name!r}: {len(split.images)} images but {len(split.labels)} labels")
  mean, std = channel_stats(train.images)
  return DatasetArrays(name=name, train=train, test=test, num_classes=num_classes, mean=mean,
                       std=std)


# ------------------------------------------------------------------------------------------ digits

DIGITS_SIZE = 32
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def _upscale_digits(grey: np.ndarray) -> np.ndarray:
  """8x8 values 0..16 -> 32x32 uint8 0..255 by 4x nearest (pixel replication).

  Why nearest: the bundled digits are 8x8 block averages of 32x32 binary bitmaps (sklearn's
  docs), so a 4x4 block per pixel is the image's own grid; it keeps every stored value exact
  and gives the 32 px crop/translate ops whole-pixel structure to move. The device-side resize
  to `model.image_size` (bilinear) then smooths it like any other dataset.
  """
  scaled = np.round(grey.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
  factor = DIGITS_SIZE // grey.shape[-1]
  return scaled.repeat(factor, axis=1).repeat(factor, axis=2)


def load_digits(dataset_config) -> DatasetArrays:
  """scikit-learn's bundled 8x8 digits (1,797 images) as 32x32 RGB, fixed stratified 80/20 split."""
  from sklearn import datasets as sk_datasets  # pylint: disable=import-outside-toplevel
  from sklearn import model_selection  # pylint: disable=import-outside-toplevel

  del dataset_config  # bundled with scikit-learn: nothing to locate
  bunch = sk_datasets.load_digits()
  images = _to_rgb(_upscale_digits(bunch.images))
  labels = bunch.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SEED,
      stratify=labels)
  # Sorted indices: a split's order does not depend on the splitter; the pipeline shuffles.
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  return _make_dataset("digits", Split(images[train_idx], labels[train_idx]),
                       Split(images[test_idx], labels[test_idx]), num_classes=10)


# -------------------------------------------------------------------------------------- registry

SOURCES: dict[str, Callable] = {
    "digits": load_digits,
}

# Names that select their own source whatever `dataset.source` says.
NAMED_SOURCES = ("digits",)


def _source_name(dataset_config) -> str:
  """Which SOURCES entry serves this config: the name itself for bundled sets, else `source`."""
  if dataset_config.name in NAMED_SOURCES:
    return dataset_config.name
  source = dataset_config.get("source", "tfds")
  if source not in SOURCES or source in NAMED_SOURCES:
    known = sorted(k for k in SOURCES if k not in NAMED_SOURCES)
    raise DataError(f"unknown dataset.source {source!r} for dataset {dataset_config.name!r}; "
                    f"known sources: {known}, or dataset.name in {list(NAMED_SOURCES)}")
  return source


def load_dataset(dataset_config) -> DatasetArrays:
  """Loads `config.dataset` fully into memory as uint8 numpy arrays.

  Args:
    dataset_config: `config.dataset` (keys name, source, path, data_dir, download, train_split,
      test_split; see configs/common.py).

  Returns:
    DatasetArrays with train/test Splits at native resolution and train-set channel stats.

  Raises:
    DataError: unknown name or source, data absent and not downloadable, malformed archive.
  """
  return SOURCES[_source_name(dataset_config)](dataset_config)
