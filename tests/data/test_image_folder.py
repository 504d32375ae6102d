"""Tests for the image-folder source: generated folders and archives, every bad input, the cache,
mixed sizes, and the real CIFAR-10 JPEG archive where it is present."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from configs import common
from jaxsam.data import image_folder, sources
from jaxsam.errors import DataError
from support.paths import CIFAR10_JPEG

CIFAR10_CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)


def _config(path, tmp_path, **overrides):
  config = common.get_base_config().dataset
  config.name, config.source, config.path = "folder", "image_folder", str(path)
  config.cache_dir = str(tmp_path / "cache")
  for key, value in overrides.items():
    config[key] = value
  return config


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _images(seed: int, count: int, shape=(8, 8, 3)) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def write_folder(root, layout: dict[str, dict[str, list[tuple[str, bytes]]]]) -> str:
  """layout: {split: {class: [(file name, bytes)]}} -> files under `root`."""
  for split, classes in layout.items():
    for name, files in classes.items():
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for file_name, raw in files:
        with open(os.path.join(root, split, name, file_name), "wb") as f:
          f.write(raw)
  return str(root)


def png_layout(classes=("cat", "ant", "bee"), per_class=(3, 2), shape=(8, 8, 3)):
  """Lossless PNGs, so decoded pixels can be compared exactly; returns (layout, arrays)."""
  layout, arrays = {}, {}
  for s, (split, count) in enumerate(zip(("train", "test"), per_class, strict=True)):
    layout[split], arrays[split] = {}, {}
    for c, name in enumerate(classes):
      images = _images(100 * s + c, count, shape)
      layout[split][name] = [(f"{i:02d}.png", _encode(img, "PNG")) for i, img in enumerate(images)]
      arrays[split][name] = images
  return layout, arrays


def test_folder_class_index_is_sorted_names_and_pixels_are_exact(tmp_path):
  layout, arrays = png_layout()
  data = sources.load_dataset(_config(write_folder(tmp_path / "data", layout), tmp_path))
  assert data.class_names == ("ant", "bee", "cat") and data.num_classes == 3
  assert data.train.images.shape == (9, 8, 8, 3) and data.test.images.shape == (6, 8, 8, 3)
  assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int32
  for split, loaded in (("train", data.train), ("test", data.test)):
    for label, name in enumerate(data.class_names):
      np.testing.assert_array_equal(
        loaded.images[loaded.labels == label], np.stack(arrays[split][name])
      )


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_archives_with_a_wrapping_folder_match_the_folder(tmp_path, kind, write_archive):
  layout, _ = png_layout()
  folder = write_folder(tmp_path / "data", layout)
  archive = write_archive(tmp_path / f"data.{kind}", folder, "wrapped")
  from_folder = sources.load_dataset(_config(folder, tmp_path))
  from_archive = sources.load_dataset(_config(archive, tmp_path))
  assert from_archive.class_names == from_folder.class_names
  np.testing.assert_array_equal(from_archive.train.images, from_folder.train.images)
  np.testing.assert_array_equal(from_archive.test.labels, from_folder.test.labels)


def test_jpeg_bmp_and_grey_images_decode_like_pil(tmp_path):
  rgb, grey = _images(0, 1)[0], _images(1, 1, (8, 8))[0]
  layout = {
    split: {
      "a": [
        ("x.jpg", _encode(rgb, "JPEG")),
        ("y.bmp", _encode(rgb, "BMP")),
        ("z.png", _encode(grey, "PNG")),
        ("notes.txt", b"not an image"),
      ]
    }
    for split in ("train", "test")
  }
  data = sources.load_dataset(_config(write_folder(tmp_path / "d", layout), tmp_path))
  assert len(data.train.labels) == 3  # notes.txt is not an image file: ignored as torchvision
  expected_jpeg = np.asarray(Image.open(io.BytesIO(_encode(rgb, "JPEG"))).convert("RGB"))
  np.testing.assert_array_equal(data.train.images[0], expected_jpeg)
  np.testing.assert_array_equal(data.train.images[1], rgb)  # BMP is lossless
  np.testing.assert_array_equal(data.train.images[2], np.repeat(grey[..., None], 3, axis=-1))


def test_mixed_sizes_need_image_size_and_resize_like_torchvision(tmp_path):
  import torch
  from torchvision.transforms import v2

  wide, tall = _images(0, 1, (12, 20, 3))[0], _images(1, 1, (18, 10, 3))[0]
  layout = {
    split: {"a": [("0.png", _encode(wide, "PNG"))], "b": [("0.png", _encode(tall, "PNG"))]}
    for split in ("train", "test")
  }
  folder = write_folder(tmp_path / "d", layout)
  with pytest.raises(DataError, match=r"several sizes.*dataset.image_size") as info:
    sources.load_dataset(_config(folder, tmp_path))
  assert "\n" not in str(info.value)
  data = sources.load_dataset(_config(folder, tmp_path, image_size=8))
  assert data.train.images.shape == (2, 8, 8, 3)
  # Shorter side to 8 then the centre 8x8: torchvision's Resize(8) + CenterCrop(8) box arithmetic.
  # PIL does the resampling in both, so pixels may differ only by rounding.
  transform = v2.Compose([v2.Resize(8), v2.CenterCrop(8)])
  for i, image in enumerate((wide, tall)):
    reference = np.asarray(transform(Image.fromarray(image)))
    assert np.abs(data.train.images[i].astype(int) - reference.astype(int)).max() <= 1
  del torch


def test_cache_is_reused_and_keyed_by_content(tmp_path):
  layout, _ = png_layout()
  folder = write_folder(tmp_path / "d", layout)
  config = _config(folder, tmp_path)
  first = sources.load_dataset(config)
  cached = os.listdir(config.cache_dir)
  assert len(cached) == 1 and cached[0].endswith(".npz")
  again = sources.load_dataset(config)
  np.testing.assert_array_equal(first.train.images, again.train.images)
  assert os.listdir(config.cache_dir) == cached  # read back, not rebuilt under another key
  # A changed file is a new key: the new pixels are loaded, not the stale cache.
  new = _images(7, 1)[0]
  with open(os.path.join(folder, "train", "ant", "00.png"), "wb") as f:
    f.write(_encode(new, "PNG"))
  changed = sources.load_dataset(config)
  np.testing.assert_array_equal(changed.train.images[0], new)
  assert len(os.listdir(config.cache_dir)) == 2
  # Another image_size is another entry too.
  sources.load_dataset(_config(folder, tmp_path, image_size=4))
  assert len(os.listdir(config.cache_dir)) == 3


def _bad_tar(tmp_path, member_name, write_archive):
  raw = _encode(_images(0, 1)[0], "PNG")
  names = ("train/a/0.png", "test/a/0.png", member_name)
  return write_archive(tmp_path / "evil.tar", dict.fromkeys(names, raw))


@pytest.mark.parametrize(
  "case",
  [
    "not_archive",
    "missing",
    "missing_split",
    "empty_class",
    "class_mismatch",
    "truncated",
    "escape",
    "absolute",
  ],
)
def test_bad_input_is_one_line_naming_it_and_writes_nothing(tmp_path, case, write_archive):
  layout, _ = png_layout()
  path, match = None, None
  if case == "not_archive":
    path = tmp_path / "file.txt"
    path.write_text("hello")
    match = r"neither a folder nor an archive"
  elif case == "missing":
    path, match = tmp_path / "nowhere", r"does not exist"
  elif case == "missing_split":
    del layout["test"]
    path, match = write_folder(tmp_path / "d", layout), r"no split folder 'test'"
  elif case == "empty_class":
    path = write_folder(tmp_path / "d", layout)
    os.makedirs(os.path.join(path, "train", "empty"))
    os.makedirs(os.path.join(path, "test", "empty"))
    match = r"class folder .*empty.* holds no images"
  elif case == "class_mismatch":
    layout["test"]["dog"] = layout["test"].pop("cat")
    path, match = write_folder(tmp_path / "d", layout), r"different classes.*'cat'.*'dog'"
  elif case == "truncated":
    raw = layout["train"]["bee"][1][1]
    layout["train"]["bee"][1] = ("01.png", raw[: len(raw) // 2])
    path, match = write_folder(tmp_path / "d", layout), r"1 bad image.*bee.01\.png \(cannot"
  elif case == "escape":
    path, match = (
      _bad_tar(tmp_path, "../outside.png", write_archive),
      r"'\.\./outside\.png', which escapes",
    )
  elif case == "absolute":
    path, match = _bad_tar(tmp_path, "/etc/x.png", write_archive), r"'/etc/x\.png', which escapes"
  config = _config(path, tmp_path)
  with pytest.raises(DataError, match=match) as info:
    sources.load_dataset(config)
  assert "\n" not in str(info.value)
  assert not os.path.exists(config.cache_dir)  # nothing cached from a failed load


def test_damaged_cache_entry_is_rebuilt(tmp_path):
  layout, _ = png_layout()
  config = _config(write_folder(tmp_path / "d", layout), tmp_path)
  first = sources.load_dataset(config)
  (entry,) = os.listdir(config.cache_dir)
  with open(os.path.join(config.cache_dir, entry), "wb") as f:
    f.write(b"garbage")
  again = sources.load_dataset(config)
  np.testing.assert_array_equal(first.train.images, again.train.images)


def test_cache_key_depends_on_every_setting():
  base = image_folder.cache_key("abc", ["train", "test"], 0)
  assert base != image_folder.cache_key("abd", ["train", "test"], 0)
  assert base != image_folder.cache_key("abc", ["train", "val"], 0)
  assert base != image_folder.cache_key("abc", ["train", "test"], 32)


@pytest.mark.skipif(
  not os.path.isfile(CIFAR10_JPEG),
  reason=f"the CIFAR-10 JPEG archive is absent ({CIFAR10_JPEG}; set "
  "JAXSAM_CIFAR10_JPEG to its path)",
)
@pytest.mark.slow
def test_real_cifar10_jpeg_archive(tmp_path):
  data = sources.load_dataset(_config(CIFAR10_JPEG, tmp_path, name="cifar10"))
  assert data.class_names == CIFAR10_CLASSES
  assert data.train.images.shape == (50_000, 32, 32, 3)
  assert data.test.images.shape == (10_000, 32, 32, 3)
  assert (np.bincount(data.train.labels) == 5000).all()
  assert (np.bincount(data.test.labels) == 1000).all()
  # CIFAR-10's published train mean; JPEG re-encoding moves it by well under 0.002.
  np.testing.assert_allclose(data.mean, (0.491, 0.482, 0.446), atol=0.002)
