"""What SAM experiments do to the train split: class-balanced subsets and symmetric label noise.

Both are pure functions of (labels, seed), applied after a source has loaded the data, so every
optimizer of a study sees the same subset and the same corrupted labels at a given `seed`, and
the test split is never touched.
"""

import dataclasses

import numpy as np

from jaxsam.data import sources
from jaxsam.errors import DataError

# Distinct streams of randomness for the two edits, so changing one leaves the other as it was.
_SUBSET_STREAM = 1
_NOISE_STREAM = 2


def balanced_subset(
  labels: np.ndarray, num_examples: int, num_classes: int, seed: int
) -> np.ndarray:
  """Sorted indices of `num_examples` examples, as equal a number per class as it divides.

  Each class gives num_examples // num_classes examples (the first num_examples % num_classes
  classes of a seeded class order give one more), drawn without replacement.
  """
  counts = np.bincount(labels, minlength=num_classes)
  rng = np.random.default_rng([seed, _SUBSET_STREAM])
  want = np.full(num_classes, num_examples // num_classes)
  want[rng.permutation(num_classes)[: num_examples % num_classes]] += 1
  short = np.flatnonzero(counts < want)
  if len(short):
    c = int(short[0])
    raise DataError(
      f"dataset.train_examples={num_examples} needs {int(want[c])} examples of "
      f"class {c}, which has {int(counts[c])}; use at most "
      f"{int(counts.min()) * num_classes} for a balanced subset (0 = all)"
    )
  chosen = [
    rng.choice(np.flatnonzero(labels == c), size=int(want[c]), replace=False)
    for c in range(num_classes)
  ]
  return np.sort(np.concatenate(chosen))


def noisy_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
  """A copy of `labels` with round(fraction * N) of them, chosen at random, replaced by a
  uniformly drawn other class (never the true one): the symmetric noise of SAM's noisy-label runs.
  """
  if not 0.0 <= fraction <= 1.0:
    raise DataError(f"dataset.label_noise={fraction} must be a fraction in [0, 1]")
  if fraction and num_classes < 2:
    raise DataError(f"dataset.label_noise={fraction} needs at least 2 classes, not {num_classes}")
  rng, flipped = _flips(len(labels), fraction, seed)
  out = labels.copy()
  # An offset in [1, C) added modulo C: uniform over the C - 1 other classes.
  out[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=len(flipped))) % num_classes
  return out.astype(labels.dtype)


def _flips(n: int, fraction: float, seed: int) -> tuple[np.random.Generator, np.ndarray]:
  rng = np.random.default_rng([seed, _NOISE_STREAM])
  return rng, rng.permutation(n)[: round(fraction * n)]


def flipped_mask(n: int, fraction: float, seed: int) -> np.ndarray:
  """Which of the n (subset) train examples `noisy_labels` relabelled: the draw depends on n,
  fraction and seed only, so a run can tell its noisy examples apart without the clean labels."""
  mask = np.zeros(n, bool)
  mask[_flips(n, fraction, seed)[1]] = True
  return mask


def select(
  labels: np.ndarray, num_classes: int, dataset_config, seed: int
) -> tuple[np.ndarray | None, np.ndarray]:
  """(indices of the kept train examples, or None for all; their labels, noise applied) for
  `dataset.train_examples` and `dataset.label_noise` (subset first, noise on the subset)."""
  # .get: configs saved before these keys existed mean "no subset, no noise".
  num_examples = dataset_config.get("train_examples", 0)
  noise = dataset_config.get("label_noise", 0.0)
  if num_examples < 0:
    raise DataError(f"dataset.train_examples={num_examples} must be >= 0 (0 = all)")
  index = balanced_subset(labels, num_examples, num_classes, seed) if num_examples else None
  if index is not None:
    labels = labels[index]
  if noise:
    labels = noisy_labels(labels, noise, num_classes, seed)
  return index, labels


def apply(data: sources.DatasetArrays, dataset_config, seed: int) -> sources.DatasetArrays:
  """The dataset with `dataset.train_examples` and `dataset.label_noise` applied to its train
  split (subset first, noise on the subset); unchanged when both are 0."""
  train = data.train
  index, labels = select(train.labels, data.num_classes, dataset_config, seed)
  if index is None and labels is train.labels:
    return data
  images = train.images if index is None else train.images[index]
  return dataclasses.replace(data, train=sources.Split(images, labels))
