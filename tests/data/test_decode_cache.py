"""The image-folder decode cache never serves stale pixels and heals a damaged entry; a constant
channel is normalised with a floored std (real files, real launches)."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import common
from jaxsam.data import image_folder, sources
from support import devices
from support.paths import ROOT
from support.runs import failure

COLOURS = {"red": (200, 30, 0), "green": (30, 200, 0)}  # blue is 0 everywhere


def bmp(array: np.ndarray) -> bytes:
  """Uncompressed BMP: its size depends on the image's shape only, so a replacement keeps it."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="BMP")
  return buffer.getvalue()


def solid_folder(root, per_class=(24, 8), side=8) -> str:
  """Two classes of solid-colour 8x8 BMPs whose blue channel is 0 in every image."""
  for split, count in zip(("train", "test"), per_class, strict=True):
    for name, colour in COLOURS.items():
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        with open(os.path.join(root, split, name, f"{i:02d}.bmp"), "wb") as f:
          f.write(bmp(np.full((side, side, 3), colour, np.uint8)))
  return str(root)


def replace_keeping_size_and_mtime(path: str, new: bytes) -> None:
  """What `cp -p` / `rsync -a` / `tar x` of a re-exported folder do to a changed file."""
  before = os.stat(path)
  assert len(new) == before.st_size
  with open(path, "wb") as f:
    f.write(new)
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
  after = os.stat(path)
  assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def dataset_config(folder, cache):
  config = common.get_base_config().dataset
  config.name, config.source, config.path, config.cache_dir = "f", "image_folder", folder, cache
  return config


def test_the_default_cache_folder_follows_jaxsam_cache(tmp_path, monkeypatch):
  """dataset.cache_dir='' keeps decoded arrays under $JAXSAM_CACHE/image_folder, so one variable
  moves every jaxsam cache (weights, compiled programs, decoded images) off a small home folder."""
  monkeypatch.setenv("JAXSAM_CACHE", str(tmp_path / "scratch"))
  sources.load_dataset(dataset_config(solid_folder(tmp_path / "d"), ""))
  entries = os.listdir(tmp_path / "scratch" / "image_folder")
  assert len([e for e in entries if e.endswith(".npz")]) == 1


def test_a_same_size_replacement_with_its_mtime_restored_is_decoded_again(tmp_path):
  folder = solid_folder(tmp_path / "d")
  config = dataset_config(folder, str(tmp_path / "cache"))
  first = sources.load_dataset(config)
  assert first.train.images[0].max() == 200
  new = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  replace_keeping_size_and_mtime(os.path.join(folder, "train", "green", "00.bmp"), bmp(new))
  again = sources.load_dataset(config)
  np.testing.assert_array_equal(again.train.images[0], new)  # green sorts first: index 0
  assert len(os.listdir(tmp_path / "cache")) == 2  # a new entry; the old one is not served


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_an_unreadable_entry_is_removed_and_rebuilt_with_one_line(tmp_path, capsys, damage):
  folder = solid_folder(tmp_path / "d", per_class=(4, 2))
  config = dataset_config(folder, str(tmp_path / "cache"))
  first = sources.load_dataset(config)
  (entry,) = os.listdir(tmp_path / "cache")
  path = tmp_path / "cache" / entry
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"")
  capsys.readouterr()
  again = sources.load_dataset(config)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and f"decode cache entry {path} is unreadable" in lines[0]
  assert "removed, decoding again" in lines[0]
  np.testing.assert_array_equal(first.train.images, again.train.images)
  assert os.listdir(tmp_path / "cache") == [entry] and path.read_bytes() == raw  # rebuilt whole
  capsys.readouterr()
  sources.load_dataset(config)
  assert capsys.readouterr().out == ""  # and read back quietly


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(tmp_path):
  cache = tmp_path / "cache"

  class Unsavable:
    def __array__(self, *args, **kwargs):
      raise RuntimeError("cannot be saved")

  with pytest.raises(RuntimeError):
    image_folder._write_cache(str(cache / "x.npz"), {"a": np.zeros(2), "b": Unsavable()})
  assert os.listdir(cache) == []


def test_a_constant_channel_gets_the_floor_and_the_others_their_std():
  images = np.zeros((4, 2, 2, 3), np.uint8)
  images[:2, ..., 0], images[2:, ..., 0] = 0, 255  # red: half 0, half 1 -> std 0.5
  images[..., 1] = 7  # green: constant
  mean, std = sources.channel_stats(images)
  assert std == (0.5, sources.STD_FLOOR, sources.STD_FLOOR)
  assert mean == pytest.approx((0.5, 7 / 255, 0.0))
  assert sources.floored_channels(std) == [1, 2]


def launch(workdir, folder, cache):
  return subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "launch.py"),
      "--config=configs/quickstart.py",
      f"--workdir={workdir}",
      "--config.dataset.name=solid",
      "--config.dataset.source=image_folder",
      f"--config.dataset.path={folder}",
      f"--config.dataset.cache_dir={cache}",
      "--config.dataset.in_memory=true",
      "--config.model.image_size=8",
      "--config.batch_size=16",
      "--config.eval_batch_size=16",
      "--config.num_epochs=3",
      "--config.augment.randaugment.num_ops=0",
      "--config.augment.crop_padding=0",
      "--config.progress_bar=False",
      "--config.wandb.mode=disabled",
    ],
    cwd=ROOT,
    check=False,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, XLA_FLAGS=devices.xla_flags(2)),
  )


FLOOR_LINE = "jaxsam: channel B of the train split is (nearly) constant"


@pytest.mark.slow
def test_a_solid_colour_folder_trains_and_the_next_launch_sees_replaced_pixels(tmp_path):
  """Launch 1 trains on a folder whose blue channel is 0 everywhere (std floored, said at
  start-up, finite loss). One image is then replaced by a same-size BMP with blue in it and its
  mtime restored: launch 2 must see the new blue channel (no floor line) rather than the cache."""
  folder, cache = solid_folder(tmp_path / "d"), str(tmp_path / "cache")
  first = launch(tmp_path / "run1", folder, cache)
  assert first.returncode == 0, failure(first)
  assert FLOOR_LINE in first.stdout
  summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
  assert summary["completed"] and summary["final_test_accuracy"] == 1.0  # red vs green: easy
  records = (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()
  assert all(json.loads(r).get("train/loss", 0.0) is not None for r in records)  # all finite

  blue = np.full((8, 8, 3), (30, 200, 0), np.uint8)
  blue[..., 2] = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
  replace_keeping_size_and_mtime(os.path.join(folder, "train", "green", "00.bmp"), bmp(blue))
  second = launch(tmp_path / "run2", folder, cache)
  assert second.returncode == 0, failure(second)
  assert "(nearly) constant" not in second.stdout  # the new blue pixels were decoded
  assert len(os.listdir(cache)) == 2
