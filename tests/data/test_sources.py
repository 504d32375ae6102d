"""Tests for jaxsam.data.sources: digits, tfds (mock data) and torchvision's CIFAR archives."""

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from configs import common
from jaxsam.data import sources
from jaxsam.errors import DataError
from support.cifar_files import write_cifar
from support.runs import failure


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
  originals = {
    (img.astype(np.int64).tobytes(), int(t)) for img, t in zip(bunch.images, bunch.target)
  }
  recovered = {
    (np.round(img).astype(np.int64).tobytes(), int(t)) for img, t in zip(small, all_labels)
  }
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


# ------------------------------------------------------------------------------------------ tfds


def _write_tfds_metadata(name, data_dir):
  """Writes a dataset's real metadata (dataset_info.json, features.json) as `tfds build` would."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("mnist", 10)])
def test_tfds_loads_mock_data_into_memory(tmp_path, name, num_classes):
  import tensorflow_datasets as tfds

  _write_tfds_metadata(name, tmp_path)
  with tfds.testing.mock_data(num_examples=23, data_dir=str(tmp_path)):
    config = _dataset_config(name=name, source="tfds", data_dir=str(tmp_path), download=False)
    sources.prepare(config)  # prepared: returns without touching the network
    data = sources.load_dataset(config)
    builder = tfds.builder(name, data_dir=str(tmp_path))
    expected = list(tfds.as_numpy(builder.as_dataset(split="train", as_supervised=True)))
  assert data.name == name and data.num_classes == num_classes
  assert data.train.images.shape[0] == 23 and data.train.images.shape[-1] == 3
  assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int32
  # Same pixels and labels as tfds yields, in order; grey (mnist) is repeated over 3 channels.
  np.testing.assert_array_equal(
    data.train.images, np.broadcast_to(np.stack([x for x, _ in expected]), data.train.images.shape)
  )
  np.testing.assert_array_equal(data.train.labels, [y for _, y in expected])
  np.testing.assert_allclose(data.mean, (data.train.images / 255.0).mean((0, 1, 2)), rtol=1e-9)


def test_tfds_absent_without_download_fails_fast_saying_where(tmp_path):
  config = _dataset_config(name="cifar10", source="tfds", data_dir=str(tmp_path), download=False)
  with pytest.raises(DataError, match=r"not prepared and dataset.download is False") as info:
    sources.load_dataset(config)
  message = str(info.value)
  assert "\n" not in message and str(tmp_path / "cifar10") in message


def test_tfds_absent_without_network_fails_fast(tmp_path, monkeypatch):
  import socket
  import time

  def unreachable(*args, **kwargs):
    raise OSError("network is unreachable")

  # Whatever the machine's network, the test must not download: cut it at the socket level.
  monkeypatch.setattr(socket, "create_connection", unreachable)
  config = _dataset_config(name="cifar10", source="tfds", data_dir=str(tmp_path), download=True)
  start = time.monotonic()
  with pytest.raises(DataError, match=r"network is unreachable.*put the prepared") as info:
    sources.prepare(config)
  assert time.monotonic() - start < 10 and "\n" not in str(info.value)


def test_tfds_unknown_name_is_one_line(tmp_path):
  config = _dataset_config(name="no_such_dataset", source="tfds", data_dir=str(tmp_path))
  with pytest.raises(DataError, match=r"unknown tfds dataset 'no_such_dataset'.*cifar10") as info:
    sources.load_dataset(config)
  assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------- cifar_python


def _expected(batches, field):
  images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
  return images.transpose(0, 2, 3, 1), np.concatenate([b[field] for b in batches])


@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tar.gz"])
@pytest.mark.parametrize(
  "layout, name, classes",
  [("cifar-10-batches-py", "cifar10", 10), ("cifar-100-python", "cifar100", 100)],
)
def test_cifar_python_reads_torchvision_layouts(tmp_path, layout, name, classes, as_tar):
  path, train, test, field = write_cifar(tmp_path, layout, as_tar, np.random.default_rng(0))
  data = sources.load_dataset(_dataset_config(name=name, source="cifar_python", path=str(path)))
  assert data.name == name and data.num_classes == classes
  for split, batches in ((data.train, train), (data.test, test)):
    images, labels = _expected(batches, field)
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
  assert len(data.train.labels) == 4 * len(train)


@pytest.mark.slow
def test_cifar_python_pixel_layout_matches_torchvision(tmp_path):
  import subprocess
  import sys

  path, _, _, _ = write_cifar(tmp_path, "cifar-100-python", False, np.random.default_rng(1))
  data = sources.load_dataset(
    _dataset_config(name="cifar100", source="cifar_python", path=str(path))
  )
  # torchvision in a child process: importing torch next to TensorFlow can crash the process.
  # Its md5 check is for the real files; ours are synthetic, so that check is bypassed.
  script = (
    "import sys, numpy as np\n"
    "try:\n  import torchvision\nexcept ImportError:\n  sys.exit(3)\n"
    "torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True\n"
    "peer = torchvision.datasets.CIFAR100(sys.argv[1], train=False, download=False)\n"
    "np.savez(sys.argv[2], images=peer.data, labels=np.asarray(peer.targets))\n"
  )
  out = tmp_path / "peer.npz"
  result = subprocess.run(
    [sys.executable, "-c", script, str(tmp_path), str(out)],
    check=False,
    capture_output=True,
    text=True,
    timeout=120,
    env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
  )
  if result.returncode == 3:
    pytest.skip("torchvision is not installed")
  assert result.returncode == 0, failure(result)
  peer = np.load(out)
  np.testing.assert_array_equal(data.test.images, peer["images"])
  np.testing.assert_array_equal(data.test.labels, peer["labels"])


def test_cifar_python_accepts_torchvision_root(tmp_path):
  write_cifar(tmp_path, "cifar-10-batches-py", False, np.random.default_rng(2))
  data = sources.load_dataset(
    _dataset_config(name="cifar10", source="cifar_python", path=str(tmp_path))
  )
  assert data.train.images.shape == (20, 32, 32, 3)


def _one_line_error(config, pattern):
  with pytest.raises(DataError, match=pattern) as info:
    sources.load_dataset(config)
  assert "\n" not in str(info.value)


def test_cifar_python_bad_paths(tmp_path):
  config = _dataset_config(name="cifar10", source="cifar_python")
  _one_line_error(config, r"needs dataset.path")
  config.path = str(tmp_path / "absent")
  _one_line_error(config, r"does not exist")
  config.path = str(tmp_path)
  _one_line_error(config, r"is not a CIFAR python archive; expected the cifar-10-batches-py")
  (tmp_path / "notes.txt").write_text("hello")
  config.path = str(tmp_path / "notes.txt")
  _one_line_error(config, r"is not a CIFAR python archive")


def test_cifar_python_wrong_name_or_split(tmp_path):
  path, _, _, _ = write_cifar(tmp_path, "cifar-10-batches-py", True, np.random.default_rng(3))
  _one_line_error(
    _dataset_config(name="cifar100", source="cifar_python", path=str(path)),
    r"holds cifar10 .* set dataset.name='cifar10'",
  )
  _one_line_error(
    _dataset_config(name="cifar10", source="cifar_python", path=str(path), test_split="validation"),
    r"splits \['train', 'test'\]",
  )


def test_cifar_python_malformed_batches(tmp_path):
  import pickle

  path, _, _, _ = write_cifar(tmp_path, "cifar-10-batches-py", False, np.random.default_rng(4))
  config = _dataset_config(name="cifar10", source="cifar_python", path=str(path))
  batch = path / "data_batch_3"
  good = batch.read_bytes()
  batch.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, 2))
  _one_line_error(config, r"data_batch_3 is not a CIFAR python batch: 'data' must be uint8")
  batch.write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}, 2))
  _one_line_error(config, r"'labels' must be a list of 4 labels")
  batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, 2))
  _one_line_error(config, r"integers in \[0, 10\)")
  batch.write_bytes(b"not a pickle at all")
  _one_line_error(config, r"data_batch_3 is not a CIFAR python batch \(")
  batch.write_bytes(good)
  (path / "data_batch_5").unlink()
  _one_line_error(config, r"data_batch_5 is missing")


def test_cifar_python_refuses_pickles_that_name_other_globals(tmp_path):
  import os
  import pickle

  class Exploit:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  path, _, _, _ = write_cifar(tmp_path, "cifar-10-batches-py", False, np.random.default_rng(5))
  (path / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
  _one_line_error(
    _dataset_config(name="cifar10", source="cifar_python", path=str(path)),
    r"test_batch is not a CIFAR python batch \(UnpicklingError: global .*system "
    r"is not allowed",
  )
