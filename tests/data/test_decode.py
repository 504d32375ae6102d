"""Tests for the one decoder and the image-folder listing: a folder of awkward files gives the same
pixels in memory and streamed (through the real loaders), the rules hold (16-bit high byte, alpha
dropped, EXIF ignored), folders as users have them list as expected, and bad files are named."""

import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import jaxsam.data
from configs import common
from jaxsam.data import choice, datasource, decode, image_folder, sources, stream_sources, streaming
from jaxsam.errors import DataError
from support import devices
from support.paths import ROOT
from support.runs import failure

SIDE = 32


def png(array: np.ndarray, bit_depth: int, color_type: int, claim=None) -> bytes:
  """A PNG written by hand (PIL writes no 16-bit RGB): rows unfiltered, one IDAT; `claim`
  (width, height) makes the header lie about the size."""
  h, w = array.shape[:2]
  dtype = ">u2" if bit_depth == 16 else "u1"
  rows = array.reshape(h, -1).astype(dtype)
  raw = b"".join(b"\x00" + row.tobytes() for row in rows)

  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  w, h = claim or (w, h)
  header = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", header)
    + chunk(b"IDAT", zlib.compress(raw))
    + chunk(b"IEND", b"")
  )


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def natural(seed: int, side: int = SIDE) -> np.ndarray:
  """Smooth gradients plus noise: JPEG-friendly, every channel different."""
  y, x = np.mgrid[0:side, 0:side]
  base = np.stack([x * 255 / side, y * 255 / side, (x + y) * 127 / side], -1)
  noise = np.random.default_rng(seed).normal(0, 12, base.shape)
  return np.clip(base + noise, 0, 255).astype(np.uint8)


GREY16 = np.random.default_rng(1).integers(0, 65536, (SIDE, SIDE)).astype(np.uint16)
GREY16[0, :4] = (30000, 65535, 255, 256)
RGB16 = np.random.default_rng(2).integers(0, 65536, (SIDE, SIDE, 3)).astype(np.uint16)
RGB = natural(0)
ALPHA = np.random.default_rng(3).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
PALETTE = np.random.default_rng(4).integers(0, 256, (16, 3), dtype=np.uint8)
INDICES = np.random.default_rng(5).integers(0, 16, (SIDE, SIDE), dtype=np.uint8)


def _palette_png() -> bytes:
  image = Image.fromarray(INDICES, "P")
  image.putpalette(PALETTE.ravel().tolist())
  return _save(image, "PNG", transparency=3)  # a tRNS entry: the colour stays, not composited


def _exif_jpeg() -> bytes:
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees to display
  return _save(Image.fromarray(RGB), "JPEG", quality=90, exif=exif.tobytes())


def awkward_files() -> dict[str, bytes]:
  """One of each kind users' folders hold; every file SIDE x SIDE."""
  grey = Image.fromarray(RGB).convert("L")
  return {
    "grey16.png": png(GREY16, 16, 0),
    "rgb16.png": png(RGB16, 16, 2),
    "rgba.png": _save(Image.fromarray(np.dstack([RGB, ALPHA])), "PNG"),
    "grey_alpha.png": _save(Image.merge("LA", [grey, Image.fromarray(ALPHA)]), "PNG"),
    "palette.png": _palette_png(),
    "bilevel.png": _save(grey.convert("1"), "PNG"),
    "cmyk.jpg": _save(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=90),
    "grey.jpg": _save(grey, "JPEG", quality=90),
    "exif_rotated.jpg": _exif_jpeg(),
    "plain.jpg": _save(Image.fromarray(RGB), "JPEG", quality=90),
    "plain.bmp": _save(Image.fromarray(RGB), "BMP"),
    "palette.bmp": _save(Image.fromarray(RGB).convert("P"), "BMP"),
    "grey16.tif": _save(Image.fromarray(GREY16), "TIFF"),
    "lossless.webp": _save(Image.fromarray(RGB), "WEBP", lossless=True),
    "plain.ppm": _save(Image.fromarray(RGB), "PPM"),
  }


def write_tree(root, files: dict[str, bytes]) -> str:
  for name, raw in files.items():
    path = os.path.join(root, *name.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(raw)
  return str(root)


def folder_config(path, tmp_path, **dataset):
  config = common.get_base_config()
  config.dataset.name, config.dataset.source = "files", "image_folder"
  config.dataset.path, config.dataset.cache_dir = str(path), str(tmp_path / "cache")
  for key, value in dataset.items():
    config.dataset[key] = value
  return config


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
  root = tmp_path_factory.mktemp("awkward")
  files = awkward_files()
  tree = {f"{split}/a/{n}": raw for split in ("train", "test") for n, raw in files.items()}
  tree["train/b/x.png"] = tree["test/b/x.png"] = files["rgba.png"]
  return write_tree(root / "set", tree), sorted(files), root


def _both_paths(path, tmp_path):
  """(in-memory test images, streamed test images) through the loaders the train loop uses."""
  memory = jaxsam.data.load(folder_config(path, tmp_path, in_memory="true"))
  streamed = jaxsam.data.load(folder_config(path, tmp_path, in_memory="false"))
  assert isinstance(memory, datasource.InMemory) and isinstance(streamed, datasource.Streamed)
  stream = streamed.stream
  batches = streaming.eval_batches(stream, size=SIDE, global_batch=4, crop_fraction=1.0)
  pixels = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  return memory.arrays.test.images, pixels, [os.fsdecode(p) for p in stream.test.paths]


def test_every_kind_of_file_decodes_to_the_same_pixels_in_memory_and_streamed(awkward, tmp_path):
  path, names, _ = awkward
  memory, streamed, paths = _both_paths(path, tmp_path)
  assert [os.path.basename(p) for p in paths[: len(names)]] == names
  for i, name in enumerate(names):
    np.testing.assert_array_equal(memory[i], streamed[i], err_msg=name)
  got = dict(zip(names, memory, strict=False))
  # 16-bit: the high byte, never clipped (30000 -> 117, 65535 -> 255), grey and RGB alike.
  np.testing.assert_array_equal(got["grey16.png"][0, :4, 0], [117, 255, 0, 1])
  np.testing.assert_array_equal(got["grey16.png"][..., 1], GREY16 >> 8)
  np.testing.assert_array_equal(got["rgb16.png"], RGB16 >> 8)
  np.testing.assert_array_equal(got["grey16.tif"], got["grey16.png"])
  # Alpha dropped, not composited; palette colours as stored, tRNS entry included.
  np.testing.assert_array_equal(got["rgba.png"], RGB)
  np.testing.assert_array_equal(got["palette.png"], PALETTE[INDICES])
  np.testing.assert_array_equal(got["plain.bmp"], RGB)
  np.testing.assert_array_equal(got["lossless.webp"], RGB)
  assert set(np.unique(got["bilevel.png"])) <= {0, 255}
  # EXIF orientation ignored: the stored pixels, bit for bit those of the same JPEG without it.
  np.testing.assert_array_equal(got["exif_rotated.jpg"], got["plain.jpg"])
  assert np.abs(got["cmyk.jpg"].astype(int) - RGB).mean() < 6  # CMYK converted, not inverted
  assert (got["grey.jpg"][..., 0] == got["grey.jpg"][..., 2]).all()


def test_streamed_decoder_crops_and_runs_inside_dataset_map(awkward):
  """The crop decode (JPEG: only the crop's blocks) equals the full decode's slice, eagerly and in
  a tf.data map (graph mode), for every kind of file."""
  path, names, _ = awkward
  raws = [pathlib.Path(path, "test", "a", n).read_bytes() for n in names]
  box = tf.constant([3, 5, 17, 20], tf.int32)

  def crop(encoded):
    return decode.tf_decode(encoded, lambda h, w: box)

  mapped = list(tf.data.Dataset.from_tensor_slices(raws).map(crop).as_numpy_iterator())
  for name, raw, in_graph in zip(names, raws, mapped, strict=True):
    full = decode.decode_pil(raw)
    np.testing.assert_array_equal(crop(tf.constant(raw)).numpy(), full[3:20, 5:25], err_msg=name)
    np.testing.assert_array_equal(in_graph, full[3:20, 5:25], err_msg=name)


# ------------------------------------------------------------------------------------ listing


def test_folder_as_users_have_it_lists_images_only_and_counts_the_rest(tmp_path):
  raw = _save(Image.fromarray(RGB), "PNG")
  latin1 = os.fsdecode(b"caf\xe9.png")  # a latin-1 name: not UTF-8
  root = write_tree(
    tmp_path / "set",
    {
      "train/cat/1.png": raw,
      f"train/cat/{latin1}": raw,
      "train/cat/._1.png": b"\x00\x05\x16\x07AppleDouble",
      "train/cat/.DS_Store": b"junk",
      "train/cat/Thumbs.db": b"junk",
      "train/cat/README.txt": b"notes",
      "train/.ipynb_checkpoints/x.png": raw,
      "test/cat/1.png": raw,
      "test/dog/1.png": raw,
      "__MACOSX/train/cat/._1.png": b"junk",
    },
  )
  real_dog = write_tree(tmp_path / "elsewhere", {"dog/2.png": raw, "dog/3.png": raw})
  os.symlink(os.path.join(real_dog, "dog"), os.path.join(root, "train", "dog"))
  os.symlink("..", os.path.join(real_dog, "dog", "loop"))  # back up into the folder it is in
  os.symlink("nowhere", os.path.join(root, "train", "cat", "notes.txt"))  # dangling, not an image
  found = image_folder.scan(root, ("train", "test"))
  names, labels = found.splits[0]
  assert found.classes == ("cat", "dog")
  assert names == ("train/cat/1.png", f"train/cat/{latin1}", "train/dog/2.png", "train/dog/3.png")
  assert labels.tolist() == [0, 0, 1, 1]
  assert found.ignored == {"__MACOSX": 1, "hidden": 3, "not an image": 3, "symlink loop": 1}
  assert not found.skipped
  line = image_folder.describe(root, found.ignored, {}, [("train", 4), ("test", 2)])
  assert "ignored 8 entries (1 __MACOSX, 3 hidden, 3 not an image, 1 symlink loop)" in line
  # Both paths take the latin-1 name: the in-memory loader and TF (paths as bytes).
  config = folder_config(root, tmp_path)
  memory = sources.load_dataset(config.dataset)
  stream = stream_sources.open_stream(config.dataset)
  assert b"caf\xe9.png" in stream.train.paths[1]
  assert len(memory.train.labels) == stream.train.num_examples == 4
  batches = streaming.eval_batches(stream, size=SIDE, global_batch=2, crop_fraction=1.0)
  streamed = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(streamed, memory.test.images)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_macos_finder_archive_trains_like_the_folder(tmp_path, kind, write_archive):
  raw = _save(Image.fromarray(RGB), "PNG")
  members = {}
  for split in ("train", "test"):
    for c in ("cat", "dog"):
      members[f"photos/{split}/{c}/1.png"] = raw
      members[f"__MACOSX/photos/{split}/{c}/._1.png"] = b"\x00\x05\x16\x07"
      members[f"photos/{split}/{c}/.DS_Store"] = b"junk"
  members["photos/train/cat/notes.txt"] = b"not an image"
  archive = write_archive(tmp_path / f"photos.{kind}", members)
  data = sources.load_dataset(folder_config(archive, tmp_path).dataset)
  assert data.class_names == ("cat", "dog") and data.train.labels.tolist() == [0, 1]
  np.testing.assert_array_equal(data.train.images[0], RGB)
  assert "ignored 6 entries (1 __MACOSX, 4 hidden, 1 not an image)" in data.note


# ------------------------------------------------------------------------------------ bad files


def _bad_folder(tmp_path, count_bad: int = 7):
  raw = _save(Image.fromarray(RGB), "PNG")
  files = {"train/a/good.png": raw, "test/a/good.png": raw, "train/a/zero.jpg": b""}
  files.update({f"train/a/text{i}.png": b"hello, not an image" for i in range(count_bad - 3)})
  root = write_tree(tmp_path / "bad", files)
  os.symlink("gone.jpg", os.path.join(root, "train", "a", "dangling.jpg"))
  big = png(np.zeros((1, 1), np.uint8), 8, 0, claim=(20000, 20000))  # 400 Mpixel by its header
  with open(os.path.join(root, "train", "a", "huge.png"), "wb") as f:
    f.write(big)
  return root


def test_bad_files_are_named_with_their_count_in_one_line(tmp_path):
  root = _bad_folder(tmp_path)
  for in_memory in ("true", "false"):
    config = folder_config(root, tmp_path, in_memory=in_memory)
    with pytest.raises(DataError) as info:
      jaxsam.data.load(config)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"7 bad image file(s) in {root!r}: ")
    assert "dangling.jpg (dangling symlink)" in message
    assert "huge.png (20000x20000 = 400000000 pixels, above dataset.max_image_pixels" in message
    assert "text0.png (not an image (unknown header))" in message
    assert message.count(os.path.join(root, "train")) == 5 and "; and 2 more;" in message
    assert "dataset.skip_bad_images=true" in message
    assert not os.path.exists(config.dataset.cache_dir)


def test_skip_bad_images_leaves_them_out_and_says_how_many(tmp_path, capsys):
  root = _bad_folder(tmp_path, count_bad=4)
  for in_memory in ("true", "false"):
    config = folder_config(root, tmp_path, in_memory=in_memory, skip_bad_images=True)
    data = jaxsam.data.load(config)
    assert data.skipped_images == 4 and data.num_train == 1
    assert "left out 4 bad image(s) (dataset.skip_bad_images)" in capsys.readouterr().out
  again = jaxsam.data.load(folder_config(root, tmp_path, in_memory="true", skip_bad_images=True))
  assert again.skipped_images == 4  # from the cache: the count survives


def test_pixel_limit_is_one_key_for_both_paths(tmp_path):
  root = write_tree(tmp_path / "set", {f"{s}/a/x.png": png(RGB, 8, 2) for s in ("train", "test")})
  for in_memory in ("true", "false"):
    config = folder_config(root, tmp_path, in_memory=in_memory, max_image_pixels=SIDE * SIDE - 1)
    with pytest.raises(
      DataError, match=r"32x32 = 1024 pixels, above dataset.max_image_pixels=1023"
    ):
      jaxsam.data.load(config)
    config.dataset.max_image_pixels = SIDE * SIDE
    assert jaxsam.data.load(config).num_train == 1
  config.dataset.max_image_pixels = -1
  with pytest.raises(DataError, match=r"dataset.max_image_pixels=-1; expected a pixel count"):
    jaxsam.data.load(config)
  # PIL's Image.MAX_IMAGE_PIXELS default (decode switches PIL's own check off for its own).
  assert common.get_base_config().dataset.max_image_pixels == (1024 * 1024 * 1024 // 4 // 3)


def test_a_file_that_fails_mid_stream_is_named_in_one_line(tmp_path):
  """A file damaged after the listing checked it: the iterator raises one DataError naming it."""
  root = write_tree(
    tmp_path / "set",
    {
      f"{s}/a/{i}.jpg": _save(Image.fromarray(natural(i)), "JPEG")
      for s in ("train", "test")
      for i in range(4)
    },
  )
  config = folder_config(root, tmp_path, in_memory="false")
  stream = stream_sources.open_stream(config.dataset)
  with open(os.path.join(root, "test", "a", "2.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff" + b"garbage" * 10)  # still a JPEG signature: TF's decoder fails
  with pytest.raises(DataError) as info:
    list(streaming.eval_batches(stream, size=SIDE, global_batch=2, crop_fraction=1.0))
  assert "\n" not in str(info.value)
  assert "test/a/2.jpg (cannot decode (InvalidArgumentError" in str(info.value)
  with open(os.path.join(root, "train", "a", "1.jpg"), "wb") as f:
    f.write(b"not an image at all")  # the PIL fallback fails inside tf.numpy_function
  batches = streaming.train_batches(stream, config.augment, size=SIDE, seed=0, global_batch=4)
  with pytest.raises(DataError, match=r"train/a/1\.jpg \(cannot decode \("):
    next(batches)


# -------------------------------------------------------------------------------- source / path


def test_the_source_the_user_named_is_the_one_used(tmp_path):
  root = write_tree(tmp_path / "set", {f"{s}/a/x.png": png(RGB, 8, 2) for s in ("train", "test")})
  config = folder_config(root, tmp_path)
  config.dataset.name = "digits"  # the quickstart's name: the named source and path still win
  data = sources.load_dataset(config.dataset)
  assert data.train.images.shape == (1, SIDE, SIDE, 3)
  config.dataset.path = str(tmp_path / "absent")
  with pytest.raises(DataError, match=r"dataset.path .*absent' does not exist; dataset.source="):
    choice.choose(config.dataset)
  digits = common.get_base_config().dataset
  digits.path = str(root)
  with pytest.raises(DataError, match=r"dataset.path=.* is ignored by dataset 'digits' \(bundled"):
    choice.choose(digits)
  tfds = common.get_base_config().dataset
  tfds.name, tfds.path = "cifar10", str(root)
  with pytest.raises(DataError, match=r"is ignored by dataset.source='tfds'.*'image_folder'"):
    sources.prepare(tfds)


# ------------------------------------------------------------------------------ through launch.py


def _launch_args(path, workdir, *extra):
  return [
    sys.executable,
    os.path.join(ROOT, "launch.py"),
    "--config=configs/quickstart.py",
    f"--workdir={workdir}",
    "--config.dataset.source=image_folder",  # the README's "your own images" command
    f"--config.dataset.path={path}",
    f"--config.dataset.cache_dir={os.path.join(os.path.dirname(workdir), 'cache')}",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.progress_bar=False",
    *extra,
  ]


def _env():
  return dict(os.environ, XLA_FLAGS=devices.xla_flags(1))


def _launch(path, workdir, *extra):
  args = _launch_args(path, workdir, *extra)
  return subprocess.run(
    args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(), check=False
  )


def _user_folder(root) -> str:
  """16 good train images (one with a latin-1 name), 4 test, junk to ignore and 4 bad files."""
  files = {}
  for split, count in (("train", 8), ("test", 2)):
    for c in ("cat", "dog"):
      for i in range(count):
        image = Image.fromarray(natural(i + 10 * (c == "dog")))
        files[f"{split}/{c}/{i}.jpg"] = _save(image, "JPEG")
  files["train/cat/" + os.fsdecode(b"\xe9t\xe9.jpg")] = files.pop("train/cat/0.jpg")
  files.update({"train/cat/._1.jpg": b"\x00\x05\x16\x07", "train/.DS_Store": b"x"})
  files.update({"train/dog/Thumbs.db": b"x", "__MACOSX/train/cat/._1.jpg": b"x"})
  files.update({"train/cat/empty.jpg": b"", "train/dog/notes.png": b"plain text"})
  files["train/dog/huge.png"] = png(np.zeros((1, 1), np.uint8), 8, 0, claim=(20000, 20000))
  path = write_tree(root, files)
  os.symlink("moved.jpg", os.path.join(path, "train", "cat", "dangling.jpg"))
  return path


def _one_error_line(result) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


@pytest.mark.slow
def test_launch_names_bad_files_on_both_paths_then_trains_without_them(tmp_path):
  path = _user_folder(tmp_path / "photos")
  for in_memory in ("false", "true"):
    workdir = str(tmp_path / f"refused-{in_memory}")
    line = _one_error_line(_launch(path, workdir, f"--config.dataset.in_memory={in_memory}"))
    assert line.startswith(f"error: 4 bad image file(s) in {path!r}: "), line
    for name in ("empty.jpg (empty file", "dangling.jpg (dangling symlink", "notes.png (not an"):
      assert name in line
    assert "huge.png (20000x20000 = 400000000 pixels, above dataset.max_image_pixels" in line
    assert not os.path.exists(workdir)  # refused before the run folder is written
  workdir = str(tmp_path / "skipped")
  result = _launch(
    path, workdir, "--config.dataset.in_memory=false", "--config.dataset.skip_bad_images=true"
  )
  assert result.returncode == 0, failure(result)
  assert "left out 4 bad image(s) (dataset.skip_bad_images)" in result.stdout
  assert "16 train images, 4 test images; ignored 4 entries" in result.stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  # The folder, not the quickstart's digits (1,437 train images): the named source is used.
  assert summary["train_examples"] == 16 and summary["skipped_bad_images"] == 4
  missing = str(tmp_path / "nowhere")
  line = _one_error_line(_launch(tmp_path / "nowhere", str(tmp_path / "missing")))
  assert f"dataset.path {missing!r} does not exist" in line
  assert not os.path.exists(tmp_path / "missing")


@pytest.mark.slow
def test_file_damaged_mid_run_stops_with_one_line_and_the_rerun_resumes(tmp_path):
  path = _user_folder(tmp_path / "photos")
  workdir = str(tmp_path / "run")
  extra = ("--config.dataset.in_memory=false", "--config.dataset.skip_bad_images=true")
  args = _launch_args(path, workdir, *extra, "--config.num_epochs=40")
  with subprocess.Popen(
    args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  ) as proc:
    deadline = time.monotonic() + 500
    checkpoints = os.path.join(workdir, "checkpoints")
    while not (os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))):
      assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
      time.sleep(0.5)
    victim = os.path.join(path, "train", "dog", "3.jpg")
    original = pathlib.Path(victim).read_bytes()
    pathlib.Path(victim).write_bytes(b"\xff\xd8\xff" + b"damaged" * 50)
    _, stderr = proc.communicate(timeout=500)
  result = subprocess.CompletedProcess(args, proc.returncode, "", stderr)
  line = _one_error_line(result)
  assert line.startswith("error: cannot decode 1 streamed image file(s): ") and victim in line
  assert "rerun the same command to resume" in line
  assert os.listdir(checkpoints)  # the last checkpoint is kept
  pathlib.Path(victim).write_bytes(original)
  rerun = _launch(path, workdir, *extra, "--config.num_epochs=40")
  assert rerun.returncode == 0, failure(rerun)
  assert "resuming at step" in rerun.stdout
