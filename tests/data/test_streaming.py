"""Streaming data path and ImageNet-style transforms.

Datasets are built so that every image's colour is its identity: constant-colour images of
varying size keep their colour through any crop and resize, so a streamed batch says which
examples it holds. A tiny tfds dataset is prepared on disk in 4 record files (the real read path);
tfds.testing.mock_data serves variable-size images without files; a folder of 300 JPEGs of mixed
sizes is the image-folder path.
"""

import io
import os
import sys

import numpy as np
import pytest

sys.modules.setdefault("triton", None)  # torchvision after TF: see conftest

import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import common
from jaxsam import errors
from jaxsam import workdir as workdir_lib
from jaxsam.data import (
  choice,
  datasource,
  decode,
  pipeline,
  rows,
  sources,
  stream_sources,
  streaming,
  transforms,
)
from support.paths import ROOT

NUM_TRAIN, NUM_TEST = 96, 37


class TinyShapes(tfds.core.GeneratorBasedBuilder):
  """Constant-colour images of 12-29 px sides: red = index, green = split, blue = label."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      "train": self._generate_examples(NUM_TRAIN, 0),
      "test": self._generate_examples(NUM_TEST, 1),
    }

  def _generate_examples(self, n, salt):
    rng = np.random.default_rng(salt)
    for i in range(n):
      h, w = rng.integers(12, 30, size=2)
      image = np.zeros((h, w, 3), np.uint8)
      image[..., 0], image[..., 1], image[..., 2] = i, salt, i % 3
      yield i, {"image": image, "label": i % 3}


def prepare_tiny_shapes(data_dir: str) -> None:
  """Writes the tiny dataset's train and test splits in 4 record files each."""
  TinyShapes(data_dir=data_dir).download_and_prepare(
    download_config=tfds.download.DownloadConfig(num_shards=4)
  )


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  prepare_tiny_shapes(data_dir)
  return data_dir


def _config(data_dir):
  config = common.get_base_config()
  config.dataset.name = "tiny_shapes"
  config.dataset.data_dir = data_dir
  config.augment.crop_padding = 0
  config.augment.flip = False
  return config


@pytest.fixture(scope="module")
def stream(tfds_dir):
  return stream_sources.open_stream(_config(tfds_dir).dataset)


def _ids(batch) -> np.ndarray:
  return batch["image"][:, 0, 0, 0].astype(int)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ------------------------------------------------------------------------------------ tfds path


def test_tfds_split_read_from_four_record_files(stream):
  assert stream.train.num_examples == NUM_TRAIN and stream.test.num_examples == NUM_TEST
  assert stream.train.shard_lengths == (24, 24, 24, 24) and stream.num_classes == 3
  windows = rows.epoch_windows(
    stream.train.num_examples,
    stream.train.shard_lengths,
    seed=0,
    epoch=0,
    process_index=0,
    process_count=1,
    buffer=30,
  )
  # Whole files, two per window (24 < 30 <= 48), each file once.
  assert sorted(r for w in windows for r in w) == [(0, 24), (24, 48), (48, 72), (72, 96)]
  assert [len(w) for w in windows] == [2, 2]


def test_tfds_epoch_yields_every_example_once_and_epochs_differ(stream, tfds_dir):
  config = _config(tfds_dir)
  batches = streaming.train_batches(
    stream, config.augment, size=16, seed=0, global_batch=16, shuffle_buffer=30
  )
  epochs = [np.concatenate([_ids(b) for b in _take(batches, 6)]) for _ in range(2)]
  for ids in epochs:
    assert sorted(ids) == list(range(NUM_TRAIN))
  assert not np.array_equal(epochs[0], epochs[1])
  first = _take(
    streaming.train_batches(
      stream, config.augment, size=16, seed=0, global_batch=16, shuffle_buffer=30
    ),
    1,
  )[0]
  np.testing.assert_array_equal(_ids(first), epochs[0][:16])  # same seed, same stream
  np.testing.assert_array_equal(first["label"], _ids(first) % 3)
  assert first["image"].shape == (16, 16, 16, 3) and first["image"].dtype == np.uint8


def test_tfds_resume_mid_epoch_continues_the_stream(stream, tfds_dir):
  config = _config(tfds_dir)
  config.augment.flip = True
  config.augment.randaugment.num_ops = 2
  full = _take(
    streaming.train_batches(
      stream, config.augment, size=16, seed=3, global_batch=8, shuffle_buffer=30
    ),
    15,
  )
  resumed = _take(
    streaming.train_batches(
      stream, config.augment, size=16, seed=3, global_batch=8, start_step=9, shuffle_buffer=30
    ),
    6,
  )
  for a, b in zip(full[9:], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_tfds_two_processes_disjoint_and_covering(stream, tfds_dir):
  config = _config(tfds_dir)
  assert streaming.steps_per_epoch(stream, 16, process_count=2) == 6
  parts = [
    np.concatenate(
      [
        _ids(b)
        for b in _take(
          streaming.train_batches(
            stream,
            config.augment,
            size=16,
            seed=0,
            global_batch=16,
            process_index=p,
            process_count=2,
            shuffle_buffer=10,
          ),
          6,
        )
      ]
    )
    for p in range(2)
  ]
  assert len(parts[0]) == len(parts[1]) == NUM_TRAIN // 2
  assert not set(parts[0]) & set(parts[1])
  assert sorted(np.concatenate(parts)) == list(range(NUM_TRAIN))


def test_tfds_eval_counts_every_example_once_with_padding(stream):
  for count in (1, 2):
    seen, masks = [], []
    lengths = set()
    for p in range(count):
      batches = list(
        streaming.eval_batches(
          stream, size=16, global_batch=10, process_index=p, process_count=count, crop_fraction=1.0
        )
      )
      lengths.add(len(batches))
      for b in batches:
        assert b["image"].shape == (10 // count, 16, 16, 3)
        seen += list(_ids(b)[b["mask"] > 0])
        masks.append(b["mask"])
    assert len(lengths) == 1  # every process runs the same number of eval steps
    assert sorted(seen) == list(range(NUM_TEST))
    assert float(np.concatenate(masks).sum()) == NUM_TEST


def test_streamed_eval_batches_equal_in_memory_eval_batches(tmp_path):
  # Fixed-size images: the in-memory path loads them, and at crop fraction 1 the streamed eval
  # transform is the identity, so both paths feed the eval step the same batches.
  rng = np.random.default_rng(0)
  for split, n in (("train", 20), ("test", 23)):
    for i in range(n):
      folder = tmp_path / "set" / split / f"c{i % 2}"
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        folder / f"{i:03d}.png"
      )
  config = common.get_base_config()
  config.dataset.source, config.dataset.name = "image_folder", "set"
  config.dataset.path, config.dataset.cache_dir = str(tmp_path / "set"), str(tmp_path / "cache")
  data = sources.load_dataset(config.dataset)
  stream_ = stream_sources.open_stream(config.dataset)
  memory = list(pipeline.eval_batches(data.test, global_batch=8))
  streamed = list(streaming.eval_batches(stream_, size=16, global_batch=8, crop_fraction=1.0))
  assert len(memory) == len(streamed) == 3
  for a, b in zip(memory, streamed, strict=True):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[key][a["mask"] > 0], b[key][b["mask"] > 0])
    np.testing.assert_array_equal(a["mask"], b["mask"])


@pytest.mark.slow
def test_streamed_eval_of_a_checkpoint_gives_the_in_memory_metrics(tmp_path):
  # Train a tiny model in memory, then score its checkpoint streamed: same loss and accuracy.
  # Fixed-size PNGs at crop fraction 1 and ImageNet normalisation on both paths (in memory would
  # otherwise normalise by the folder's own statistics), so only the input path differs.
  from jaxsam import evaluate, train, writers

  rng = np.random.default_rng(1)
  for split, n in (("train", 48), ("test", 29)):
    for i in range(n):
      folder = tmp_path / "set" / split / f"c{i % 3}"
      folder.mkdir(parents=True, exist_ok=True)
      image = np.full((16, 16, 3), 60 * (i % 3), np.uint8) + rng.integers(
        0, 60, (16, 16, 3), dtype=np.uint8
      )
      Image.fromarray(image).save(folder / f"{i:03d}.png")
  config = common.get_base_config()
  config.dataset.source, config.dataset.name = "image_folder", "set"
  config.dataset.path, config.dataset.cache_dir = str(tmp_path / "set"), str(tmp_path / "cache")
  config.dataset.in_memory, config.dataset.eval_crop_fraction = "true", 1.0
  config.model.name, config.model.width, config.model.normalization = "resnet8", 4, "imagenet"
  config.model.image_size = 16  # the native side: streaming needs it said
  config.num_epochs, config.batch_size, config.eval_batch_size = 2, 16, 8  # 29 = 3 x 8 + 5 pad
  config.augment.crop_padding, config.augment.flip = 0, False
  config.progress_bar, config.wandb.mode = False, "disabled"
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  assert summary["completed"] and summary["steps"] == 6
  logged = [
    r for r in writers.read_metrics(workdir_lib.RunDir(workdir).metrics) if "test/accuracy" in r
  ][-1]
  config.dataset.in_memory = "false"
  result = evaluate.evaluate_checkpoint(config, workdir)
  assert result["step"] == 6 and result["count"] == 29
  assert result["top1"] == logged["test/accuracy"] and result["top5"] == logged["test/top5"]
  assert result["loss"] == pytest.approx(logged["test/loss"], rel=1e-6, abs=1e-7)


def _mock_flowers_config(data_dir):
  """oxford_flowers102's real metadata in `data_dir` (as `tfds build` writes it), no records."""
  builder = tfds.builder("oxford_flowers102", data_dir=str(data_dir))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  config = common.get_base_config()
  config.dataset.name, config.dataset.data_dir = "oxford_flowers102", str(data_dir)
  config.dataset.download = False
  return config


@pytest.mark.slow  # ~10 s on 2 CPU cores
def test_mock_data_variable_size_images_stream_at_model_size(tmp_path):
  config = _mock_flowers_config(tmp_path)
  config.augment.random_resized_crop = True
  config.augment.crop_padding = 0
  config.augment.randaugment.num_ops = 2
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    stream_ = stream_sources.open_stream(config.dataset)
    assert stream_.native_size == 0 and stream_.num_classes == 102
    with pytest.raises(errors.ConfigError, match="model.image_size"):
      streaming.image_size(stream_, 0)
    runs = [
      _take(streaming.train_batches(stream_, config.augment, size=24, seed=1, global_batch=8), 3)
      for _ in range(2)
    ]
    batches = list(streaming.eval_batches(stream_, size=24, global_batch=16))
  for a, b in zip(*runs, strict=True):
    assert a["image"].shape == (8, 24, 24, 3)
    np.testing.assert_array_equal(a["image"], b["image"])
  assert [b["image"].shape for b in batches] == [(16, 24, 24, 3)] * 2
  assert sum(b["mask"].sum() for b in batches) == 24


def test_auto_streams_above_the_memory_fraction(tfds_dir):
  config = _config(tfds_dir)
  config.dataset.in_memory = "auto"
  stream_, line = choice.choose(config.dataset)
  assert stream_ and "varying size" in line and line.count("\n") == 0
  config.dataset.in_memory = "true"
  assert choice.choose(config.dataset)[0] is False
  config.dataset.in_memory = "yes"
  with pytest.raises(errors.ConfigError, match=r"dataset.in_memory='yes'; expected one of"):
    choice.choose(config.dataset)


# --------------------------------------------------------------------------------- image folder

COLOUR_LEVELS = 8  # per channel: index = (r, g, b) digits in base 8, 32 levels apart


def _colour(i: int) -> tuple[int, int, int]:
  return tuple(32 * ((i // COLOUR_LEVELS**c) % COLOUR_LEVELS) + 16 for c in range(3))


def _index(pixels: np.ndarray) -> np.ndarray:
  digits = np.clip(np.round((pixels.astype(float) - 16) / 32), 0, COLOUR_LEVELS - 1).astype(int)
  return digits[..., 0] + COLOUR_LEVELS * digits[..., 1] + COLOUR_LEVELS**2 * digits[..., 2]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
  """300 train and 50 test JPEGs of sizes 20-90 px in 3 classes, each one constant colour."""
  root = tmp_path_factory.mktemp("jpegs") / "photos"
  rng = np.random.default_rng(0)
  for split, n, offset in (("train", 300, 0), ("test", 50, 300)):
    for i in range(n):
      folder = root / split / f"class{i % 3}"
      folder.mkdir(parents=True, exist_ok=True)
      w, h = (int(v) for v in rng.integers(20, 90, size=2))
      Image.new("RGB", (w, h), _colour(i + offset)).save(folder / f"{i:04d}.jpg", quality=95)
  config = common.get_base_config()
  config.dataset.source, config.dataset.name = "image_folder", "photos"
  config.dataset.path = str(root)
  config.augment.crop_padding = 0
  config.augment.flip = False
  return config


def test_folder_of_mixed_size_jpegs_streams_each_once_per_epoch(jpeg_folder):
  stream_ = stream_sources.open_stream(jpeg_folder.dataset)
  assert stream_.train.num_examples == 300 and stream_.class_names == ("class0", "class1", "class2")
  assert choice.choose(jpeg_folder.dataset)[0]  # mixed sizes: auto streams
  batches = streaming.train_batches(stream_, jpeg_folder.augment, size=32, seed=0, global_batch=50)
  ids = np.concatenate([_index(b["image"][:, 16, 16]) for b in _take(batches, 6)])
  assert sorted(ids) == list(range(300))
  # Same order as the in-memory path's epoch permutation.
  order = rows.epoch_order(0, 0, 300)
  by_file = np.asarray([int(os.path.basename(p)[:4]) for p in stream_.train.paths])
  np.testing.assert_array_equal(ids, by_file[order])
  evals = list(streaming.eval_batches(stream_, size=32, global_batch=16))
  seen = np.concatenate([_index(b["image"][:, 16, 16])[b["mask"] > 0] for b in evals])
  assert sorted(seen) == list(range(300, 350))


def test_streamed_folder_takes_the_in_memory_subset_and_label_noise(jpeg_folder, tmp_path):
  """dataset.train_examples and label_noise pick the same files and labels streamed as in memory,
  and the streamed epoch covers exactly the subset."""
  config = jpeg_folder.copy_and_resolve_references()
  config.dataset.train_examples, config.dataset.label_noise = 30, 0.4
  config.dataset.image_size, config.dataset.cache_dir = 32, str(tmp_path / "cache")
  config.dataset.in_memory = "true"
  memory = datasource.load(config, main=False).with_train_split(config.dataset, 3)
  config.dataset.in_memory = "false"
  streamed = datasource.load(config, main=False).with_train_split(config.dataset, 3)
  assert isinstance(memory, datasource.InMemory) and isinstance(streamed, datasource.Streamed)
  assert streamed.num_train == memory.num_train == 30
  files = [int(os.path.basename(p)[:4]) for p in streamed.stream.train.paths]
  np.testing.assert_array_equal(files, _index(memory.arrays.train.images[:, 16, 16]))
  np.testing.assert_array_equal(streamed.stream.train.labels, memory.arrays.train.labels)
  assert (streamed.stream.train.labels != np.asarray(files) % 3).sum() == 12  # 40 % flipped
  config.batch_size = 10
  batches = streamed.train_input(config, size=32)(0, 0, 1)
  seen = np.concatenate([_index(next(batches)["image"][:, 16, 16]) for _ in range(3)])
  assert sorted(seen) == sorted(files)


@pytest.mark.slow  # ~6 s on 2 CPU cores
def test_batched_crop_boxes_give_each_example_s_own_train_crop(jpeg_folder):
  """The streamed batches compute crop draws and boxes per batch: each image equals
  `transforms.train_crop` of its file with its own seed (the per-example, torchvision-checked
  arithmetic), resumed steps included."""
  config = jpeg_folder.copy_and_resolve_references()
  config.augment.random_resized_crop = True
  config.augment.crop_scale = (0.02, 1.0)  # small crops too: upscaled as well as shrunk
  stream_ = stream_sources.open_stream(config.dataset)
  batches = streaming.train_batches(
    stream_, config.augment, size=48, seed=2, global_batch=20, start_step=14
  )
  steps = rows.train_steps(
    300, seed=2, start_step=14, global_batch=20, process_index=0, process_count=1
  )
  for _ in range(2):  # step 14 and 15 (epoch 0's last, epoch 1's first)
    batch, (index, seeds) = next(batches), next(steps)
    for image, i, seed in zip(batch["image"], index, seeds, strict=True):
      encoded = tf.io.read_file(stream_.train.paths[i])
      want = transforms.train_crop(encoded, seed, 48, config.augment.crop_scale).numpy()
      np.testing.assert_array_equal(image, want)


@pytest.mark.slow  # ~10 s on 2 CPU cores
def test_folder_random_resized_crop_and_randaugment_at_224(jpeg_folder):
  jpeg_folder.augment.random_resized_crop = True
  jpeg_folder.augment.flip = True
  jpeg_folder.augment.randaugment.num_ops = 2
  stream_ = stream_sources.open_stream(jpeg_folder.dataset)
  two = [
    _take(
      streaming.train_batches(
        stream_,
        jpeg_folder.augment,
        size=224,
        seed=5,
        global_batch=10,
        process_index=p,
        process_count=2,
      ),
      2,
    )
    for p in range(2)
  ]
  assert two[0][0]["image"].shape == (5, 224, 224, 3)
  one = _take(
    streaming.train_batches(stream_, jpeg_folder.augment, size=224, seed=5, global_batch=10), 2
  )
  for step in range(2):  # the two processes' halves are the one-process batch
    np.testing.assert_array_equal(
      np.concatenate([two[0][step]["image"], two[1][step]["image"]]), one[step]["image"]
    )


def test_folder_with_no_images_and_a_source_that_cannot_stream_are_refused(tmp_path):
  (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
  (tmp_path / "empty" / "test" / "a").mkdir(parents=True)
  (tmp_path / "empty" / "train" / "a" / "notes.txt").write_text("no images")
  config = common.get_base_config()
  config.dataset.source, config.dataset.name = "image_folder", "empty"
  config.dataset.path, config.dataset.in_memory = str(tmp_path / "empty"), "false"
  with pytest.raises(errors.DataError, match="holds no images"):
    stream_sources.open_stream(config.dataset)
  config.dataset.path = str(tmp_path / "photos.zip")
  (tmp_path / "photos.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip
  with pytest.raises(errors.DataError, match="has no split folder 'train'"):
    stream_sources.open_stream(config.dataset)
  config.dataset.source, config.dataset.name = "cifar_python", "cifar10"
  with pytest.raises(errors.ConfigError, match="source 'cifar_python' cannot stream") as e:
    choice.choose(config.dataset)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "kind",  # ~12 s each on 2 CPU cores: the tar in the fast tier, the other two in the slow one
  ["tar", *(pytest.param(k, marks=pytest.mark.slow) for k in ("zip", "gztar"))],
)
def test_archives_stream_the_folder_s_batches(jpeg_folder, tmp_path, capsys, kind):
  """A .tar and a .zip are read at random by member offsets, a .tar.gz is unpacked once into the
  cache: each gives the folder's train and eval batches exactly, a resumed stream included."""
  import shutil  # pylint: disable=import-outside-toplevel

  folder = jpeg_folder.dataset.path
  archive = shutil.make_archive(
    str(tmp_path / "photos"), kind, os.path.dirname(folder), os.path.basename(folder)
  )
  config = jpeg_folder.copy_and_resolve_references()
  config.dataset.path, config.dataset.cache_dir = archive, str(tmp_path / "cache")

  def batches(dataset, start_step):
    stream_ = stream_sources.open_stream(dataset)
    train = streaming.train_batches(
      stream_, config.augment, size=32, seed=3, global_batch=50, start_step=start_step
    )
    return _take(train, 2), list(streaming.eval_batches(stream_, size=32, global_batch=16))

  (train, evals), (want_train, want_evals) = (
    batches(config.dataset, 5),
    batches(jpeg_folder.dataset, 5),
  )
  for got, want in zip(train + evals, want_train + want_evals, strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  unpacked = capsys.readouterr().out.count("unpacking")
  assert unpacked == (1 if kind == "gztar" else 0)
  batches(config.dataset, 0)  # a second launch reuses the unpacked folder
  assert "unpacking" not in capsys.readouterr().out
  assert os.path.isdir(tmp_path / "cache" / "unpacked") == (kind == "gztar")
  if kind == "gztar":  # no temporary folder left beside the unpacked one
    assert len(os.listdir(tmp_path / "cache" / "unpacked")) == 1


def test_auto_looks_into_a_small_tar_gz_without_unpacking_it(jpeg_folder, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel

  folder = jpeg_folder.dataset.path
  archive = shutil.make_archive(
    str(tmp_path / "photos"), "gztar", os.path.dirname(folder), os.path.basename(folder)
  )
  config = jpeg_folder.copy_and_resolve_references()
  config.dataset.path, config.dataset.cache_dir = archive, str(tmp_path / "cache")
  config.dataset.in_memory, config.dataset.image_size = "auto", 32
  stream_, line = choice.choose(config.dataset)
  assert not stream_ and "300 images at 32x32" in line
  assert not (tmp_path / "cache").exists()  # nothing unpacked to decide


def test_tfds_split_with_no_images_is_refused(tmp_path):
  config = _mock_flowers_config(tmp_path)
  with (
    tfds.testing.mock_data(num_examples=0, data_dir=str(tmp_path)),
    pytest.raises(errors.DataError, match="has no images"),
  ):
    stream_sources.open_stream(config.dataset)


# ------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.5, 1.2), (0.9, 0.5), (-0.1, 0.5)])
def test_crop_scale_outside_unit_interval_is_refused(scale):
  with pytest.raises(errors.ConfigError, match=r"crop_scale=.*expected 0 < min <= max <= 1"):
    transforms.check_crop(scale, transforms.DEFAULT_RATIO)


def test_bad_crop_ratio_and_eval_fraction_are_refused():
  with pytest.raises(errors.ConfigError, match="augment.crop_ratio"):
    transforms.check_crop((0.08, 1.0), (0.0, 1.0))
  with pytest.raises(errors.ConfigError, match="dataset.eval_crop_fraction=1.2"):
    transforms.check_crop_fraction(1.2)


def _natural_image(height, width, seed=0) -> np.ndarray:
  """Smooth structure plus noise: a photo's mix of low and high frequencies."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), np.int32)
  return np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


SIZES = [(350, 400), (300, 500), (97, 61), (224, 224)]


@pytest.mark.parametrize("height,width", SIZES)
def test_random_resized_box_is_torchvision_arithmetic(height, width):
  from torchvision.transforms import RandomResizedCrop

  image = Image.new("RGB", (width, height))
  uniforms = tf.constant(np.random.default_rng(height).random(22), tf.float32)
  for scale, ratio in (
    ((0.3, 0.3), (0.9, 0.9)),
    ((0.08, 0.08), (4 / 3, 4 / 3)),
    ((1.0, 1.0), (0.75, 0.75)),
  ):
    _, _, h, w = RandomResizedCrop.get_params(image, scale=scale, ratio=ratio)
    top, left, bh, bw = transforms.random_resized_box(height, width, uniforms, scale, ratio).numpy()
    assert (bh, bw) == (h, w), (scale, ratio)
    if (h, w) != (height, width) or scale != (1.0, 1.0):
      assert 0 <= top <= height - h and 0 <= left <= width - w
  # Every try fails (a whole-image area cannot take these ratios): the centre fallback, exact.
  wide = Image.new("RGB", (400, 100))
  assert tuple(transforms.random_resized_box(100, 400, uniforms, (1.0, 1.0)).numpy()) == tuple(
    RandomResizedCrop.get_params(wide, scale=(1.0, 1.0), ratio=transforms.DEFAULT_RATIO)
  )


@pytest.mark.parametrize("height,width", SIZES)
def test_crop_and_resize_match_torchvision_within_one_level(height, width):
  """Same image, same box: |ours - torchvision's PIL bilinear| <= 1 per pixel, mean < 0.25; equal
  where the crop shrinks."""
  from torchvision.transforms import functional as F

  image = _natural_image(height, width)
  encoded = tf.constant(_png(image))
  uniforms = tf.constant(np.random.default_rng(width).random(22), tf.float32)
  box = transforms.random_resized_box(height, width, uniforms).numpy()
  top, left, h, w = (int(v) for v in box)
  ours = transforms.resize(
    transforms.decode_box(encoded, lambda *_: tf.constant(box)), 224, 224
  ).numpy()
  theirs = np.asarray(
    F.resized_crop(
      Image.fromarray(image), top, left, h, w, [224, 224], F.InterpolationMode.BILINEAR
    )
  )
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  assert diff.max() <= 1 and diff.mean() < 0.25
  if h > 224 or w > 224:  # a shrink is PIL's own resize: torchvision's pixels exactly
    np.testing.assert_array_equal(ours, theirs)
  ours = transforms.eval_crop(encoded, 224, 0.875).numpy()
  theirs = np.asarray(
    F.center_crop(F.resize(Image.fromarray(image), 256, F.InterpolationMode.BILINEAR), 224)
  )
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  assert ours.shape == theirs.shape == (224, 224, 3) and diff.max() <= 1 and diff.mean() < 0.25


def _photo(height, width, seed=0) -> np.ndarray:
  """A smooth scene with mild noise (a photo's spectrum, unlike `_natural_image`'s +-20 noise)."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), np.float32)
  return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
  "box,ratio",
  [
    ((0, 0, 1000, 1100), 4),
    ((3, 7, 1001, 1203), 4),
    ((0, 100, 1800, 2000), 8),
    ((5, 9, 895, 1200), 1),
  ],
)
def test_large_jpeg_crops_decode_at_a_dct_scale_close_to_full_resolution(box, ratio):
  """A JPEG crop >= 4x the output side in both sides is decoded at DCT scale 1/ratio (PIL's
  draft), then its sub-pixel region shrunk: within 1 level of the full-resolution crop's shrink
  on average, 3 at the 99th percentile (measured 0.5-0.6 and 2: the DCT scaling is a box-like
  low-pass, the antialiased shrink a triangle one), the same eagerly and in tf.data (a pure
  function of the box, so of the seed); a smaller crop is the full-resolution path exactly."""
  buffer = io.BytesIO()
  Image.fromarray(_photo(1800, 2400)).save(buffer, format="JPEG", quality=90)
  encoded, box_t = tf.constant(buffer.getvalue()), tf.constant(box, tf.int32)
  _, _, used = decode.tf_decode_scaled(encoded, box_t, 224)
  assert int(used) == ratio
  fast = transforms.crop_resized(encoded, box_t, 224).numpy()
  full = transforms.resize(transforms.decode_crop(encoded, box_t), 224, 224).numpy()
  diff = np.abs(fast.astype(int) - full.astype(int))
  assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3, (diff.mean(), diff.max())
  if ratio == 1:
    np.testing.assert_array_equal(fast, full)
  mapped = (
    tf.data.Dataset.from_tensors(encoded)
    .map(lambda e: transforms.crop_resized(e, box_t, 224))
    .get_single_element()
  )
  np.testing.assert_array_equal(mapped.numpy(), fast)


def test_train_crop_decodes_jpeg_crop_in_one_step_and_inside_dataset_map():
  image = _natural_image(120, 160)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=95)
  encoded = tf.constant(buffer.getvalue())
  seeds = tf.constant([[0, i] for i in range(4)], tf.int64)
  eager = [transforms.train_crop(encoded, s, 64).numpy() for s in seeds]
  mapped = list(
    tf.data.Dataset.from_tensor_slices(seeds)
    .map(lambda s: transforms.train_crop(encoded, s, 64))
    .as_numpy_iterator()
  )
  for a, b in zip(eager, mapped, strict=True):
    assert a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(eager[0], eager[1])  # crops differ by seed


# ------------------------------------------------------------------- kill -9 and resume, streamed

STREAM_SPE, STREAM_EPOCHS = 6, 3  # 96 examples // batch 16


def _stream_args(data_dir: str) -> list[str]:
  return [
    "--config=configs/quickstart.py",
    "--config.dataset.name=tiny_shapes",
    f"--config.dataset.data_dir={data_dir}",
    "--config.dataset.in_memory=false",
    "--config.dataset.shuffle_buffer=30",
    "--config.dataset.download=false",
    f"--config.num_epochs={STREAM_EPOCHS}",
    "--config.model.image_size=16",
    "--config.model.width=4",
    "--config.batch_size=16",
    "--config.eval_batch_size=16",
    "--config.augment.random_resized_crop=true",
    "--config.augment.crop_padding=0",
    "--config.augment.randaugment.num_ops=1",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_epochs=1",
    "--config.checkpoint_keep=2",
    "--config.progress_bar=false",
    "--config.wandb.mode=disabled",
  ]


@pytest.mark.slow
def test_streamed_kill9_and_resume_equals_uninterrupted(tfds_dir, tmp_path):
  import signal
  import subprocess

  from support import runs  # pylint: disable=import-outside-toplevel

  root = ROOT
  env = runs.launch_env(str(tmp_path))

  def launch(workdir, log):
    return subprocess.Popen(
      [sys.executable, "launch.py", f"--workdir={workdir}", *_stream_args(tfds_dir)],
      cwd=root,
      env=env,
      stdout=open(log, "w"),
      stderr=subprocess.STDOUT,
    )

  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  run_a = launch(a, tmp_path / "a.log")
  b1 = launch(b, tmp_path / "b1.log")
  killed = _kill_mid_epoch(b1, b)
  assert b1.wait(timeout=60) == -signal.SIGKILL and killed % STREAM_SPE
  b2 = launch(b, tmp_path / "b2.log")
  assert b2.wait(timeout=600) == 0, (tmp_path / "b2.log").read_text()[-3000:]
  assert run_a.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-3000:]
  log = (tmp_path / "b2.log").read_text()
  assert "streamed from files (dataset.in_memory='false')" in log and "resuming at step" in log
  total = STREAM_SPE * STREAM_EPOCHS
  state_a = runs.load_state(os.path.join(a, "checkpoints", str(total)))
  state_b = runs.load_state(os.path.join(b, "checkpoints", str(total)))
  leaves_a = jax_leaves(state_a)
  leaves_b = jax_leaves(state_b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y, strict=True)
  from jaxsam import writers

  records = [writers.read_metrics(workdir_lib.RunDir(w).metrics) for w in (a, b)]
  assert runs.without_time(records[0]) == runs.without_time(records[1])


def _kill_mid_epoch(proc, workdir) -> int:
  """SIGKILLs `proc` once a mid-epoch step past the first epoch is logged with a checkpoint."""
  import signal
  import time

  from jaxsam import writers

  deadline = time.time() + 600
  while time.time() < deadline:
    assert proc.poll() is None, f"run ended (rc {proc.returncode}) before it could be killed"
    steps = [
      r["step"]
      for r in writers.read_metrics(workdir_lib.RunDir(workdir).metrics)
      if "train/loss" in r
    ]
    folder = os.path.join(workdir, "checkpoints")
    saved = os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))
    if steps and steps[-1] > STREAM_SPE and steps[-1] % STREAM_SPE and saved:
      proc.send_signal(signal.SIGKILL)
      return steps[-1]
    time.sleep(0.005)
  raise AssertionError("no mid-epoch step logged in time")


def jax_leaves(tree):
  import jax

  return jax.tree_util.tree_leaves(tree)
