"""Tests for jaxsam.data.sources: digits, tfds (mock data) and torchvision's CIFAR archives."""

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from configs import common
from jaxsam.data import sources
from jaxsam.errors import DataError


def _dataset_config(**overrides):
  config = common.get_base_config().dataset
  for key, value in overrides.items():
    config[key] = value
  return config


def test_digits_shapes_split_and_stats():
  data = sources.load_dataset(_dataset_config(name="digits"))
  assert data.name == "digits" and data.num_classes == 10
  assert data.train.images.shape == (1437, 32, 32, 3) and data.test.images.shape == (360, 32, 32, 3)
  assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int32
  # Stratified: every class in the test split with 35..37 examples (~20 % of ~180).
  counts = np.bincount(data.test.labels, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37
  # Stats recomputed independently on the 0-1 scale.
  pixels = data.train.images.astype(np.float64) / 255.0
  np.testing.assert_allclose(data.mean, pixels.mean((0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(data.std, pixels.std((0, 1, 2)), rtol=1e-9)


def test_digits_pixels_are_the_bundled_images_upscaled():
  data = sources.load_dataset(_dataset_config(name="digits"))
  bunch = sk_datasets.load_digits()
  all_images = np.concatenate([data.train.images, data.test.images])
  all_labels = np.concatenate([data.train.labels, data.test.labels])
  assert len(all_images) == len(bunch.images) == 1797
  # Every 4x4 block is one original pixel scaled 0..16 -> 0..255; channels equal.
  blocks = all_images[..., 0].reshape(-1, 8, 4, 8, 4)
  assert (blocks == blocks[:, :, :1, :, :1]).all()
  assert (all_images == all_images[..., :1]).all()
  small = blocks[:, :, 0, :, 0].astype(np.float64) * 16.0 / 255.0
  # Splits are a partition: match each image back to its bundled original by pixels + label.
  originals = {(img.astype(np.int64).tobytes(), int(t)) for img, t in zip(bunch.images, bunch.target)}
  recovered = {(np.round(img).astype(np.int64).tobytes(), int(t))
               for img, t in zip(small, all_labels)}
  assert recovered == originals


def test_digits_split_is_fixed():
  first = sources.load_dataset(_dataset_config(name="digits"))
  second = sources.load_dataset(_dataset_config(name="digits"))
  np.testing.assert_array_equal(first.test.labels, second.test.labels)
  np.testing.assert_array_equal(first.train.images, second.train.images)


def test_unknown_source_lists_known_ones():
  with pytest.raises(DataError, match=r"unknown dataset.source 'nope'.*known sources") as info:
    sources.load_dataset(_dataset_config(name="cifar10", source="nope"))
  assert "\n" not in str(info.value)
