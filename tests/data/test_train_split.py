"""Tests for jaxsam.data.train_split: class-balanced subsets and symmetric label noise."""

import numpy as np
import pytest

from configs import common
from jaxsam.data import sources, train_split
from jaxsam.errors import DataError


def _labels(per_class=(50, 40, 60, 30), seed=0):
  labels = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(per_class)])
  return np.random.default_rng(seed).permutation(labels)


def _data(labels, num_classes=4):
  images = np.arange(len(labels), dtype=np.int64)[:, None, None, None] % 256
  images = np.broadcast_to(images, (len(labels), 2, 2, 3)).astype(np.uint8)
  split = sources.Split(images, labels)
  test = sources.Split(images[:10].copy(), labels[:10].copy())
  return sources.DatasetArrays("toy", split, test, num_classes, (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("num_examples", [40, 43, 120])
def test_subset_is_class_balanced_sorted_and_seeded(num_examples):
  labels = _labels()
  index = train_split.balanced_subset(labels, num_examples, 4, seed=3)
  assert len(index) == num_examples == len(set(index.tolist()))
  assert (np.diff(index) > 0).all()
  counts = np.bincount(labels[index], minlength=4)
  assert counts.max() - counts.min() <= 1 and counts.sum() == num_examples
  np.testing.assert_array_equal(index, train_split.balanced_subset(labels, num_examples, 4, 3))
  assert not np.array_equal(index, train_split.balanced_subset(labels, num_examples, 4, 4))


def test_subset_larger_than_the_smallest_class_allows_is_refused():
  with pytest.raises(
    DataError,
    match=r"train_examples=200 needs 50 examples of class 1, which "
    r"has 40; use at most 120",
  ) as info:
    train_split.balanced_subset(_labels(), 200, 4, seed=0)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4, 1.0])
def test_noise_flips_the_exact_fraction_never_to_the_true_class(fraction):
  labels = _labels()
  noisy = train_split.noisy_labels(labels, fraction, 4, seed=1)
  flipped = noisy != labels
  assert flipped.sum() == round(fraction * len(labels))  # never the true class: all count
  assert noisy.dtype == labels.dtype and noisy.min() >= 0 and noisy.max() < 4
  np.testing.assert_array_equal(noisy, train_split.noisy_labels(labels, fraction, 4, seed=1))
  if 0 < fraction < 1:
    assert not np.array_equal(noisy, train_split.noisy_labels(labels, fraction, 4, seed=2))


def test_noise_is_uniform_over_the_other_classes():
  labels = np.zeros(30_000, np.int32)
  noisy = train_split.noisy_labels(labels, 1.0, 4, seed=0)
  counts = np.bincount(noisy, minlength=4)
  assert counts[0] == 0
  # Each of the 3 other classes gets 1/3: binomial std ~82 of 10,000, so 400 is ~5 sigma.
  assert np.abs(counts[1:] - 10_000).max() < 400


def test_bad_noise_fraction_is_refused():
  with pytest.raises(DataError, match=r"label_noise=1.5 must be a fraction in \[0, 1\]"):
    train_split.noisy_labels(_labels(), 1.5, 4, seed=0)


def test_apply_subsets_then_corrupts_only_the_train_split():
  labels = _labels()
  data = _data(labels)
  config = common.get_base_config().dataset
  config.train_examples, config.label_noise = 40, 0.25
  out = train_split.apply(data, config, seed=5)
  assert len(out.train.labels) == 40
  index = train_split.balanced_subset(labels, 40, 4, seed=5)
  np.testing.assert_array_equal(out.train.images, data.train.images[index])
  assert (out.train.labels != labels[index]).sum() == 10
  assert out.test is data.test  # test labels stay clean
  np.testing.assert_array_equal(out.test.labels, labels[:10])
  # Both 0: the data itself, untouched.
  config.train_examples, config.label_noise = 0, 0.0
  assert train_split.apply(data, config, seed=5) is data


def test_apply_refuses_a_negative_subset():
  config = common.get_base_config().dataset
  config.train_examples = -1
  with pytest.raises(DataError, match=r"train_examples=-1 must be >= 0"):
    train_split.apply(_data(_labels()), config, seed=0)


def test_flipped_mask_names_exactly_the_relabelled_examples():
  labels = _labels()
  for fraction, seed in ((0.4, 0), (0.25, 3), (1.0, 1)):
    noisy = train_split.noisy_labels(labels, fraction, 4, seed=seed)
    mask = train_split.flipped_mask(len(labels), fraction, seed)
    np.testing.assert_array_equal(mask, noisy != labels)  # noise never keeps the true class
