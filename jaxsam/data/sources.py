"""Dataset sources: each turns `config.dataset` into uint8 images and int32 labels in memory.

Images stay at native resolution (CIFAR-sized datasets fit in host memory); upscaling to the
model's resolution happens on device. Which source runs is chosen by `dataset.name` ('digits')
or else by `dataset.source` ('tfds' | 'cifar_python'), through the explicit `SOURCES` registry.
"""

import codecs
import dataclasses
import io
import os
import pickle
import socket
import tarfile
from collections.abc import Callable, Sequence

import numpy as np

from jaxsam.errors import ConfigError, DataError


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
  class_names: tuple[str, ...] = ()  # by class index, where the source names its classes
  skipped_images: int = 0  # bad files left out (dataset.skip_bad_images)
  note: str = ""  # the source's start-up line ('' = none)


# ImageNet's channel statistics (0-1 scale): what pretrained weights expect, and what streamed
# sets, which are not scanned for their own, are normalised with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_STATS_CHUNK = 1 << 20  # pixels per histogram pass
# The smallest std a channel is normalised with: one uint8 level on the 0-1 scale. A channel that
# (nearly) never changes (solid-colour sets, some scans) would otherwise be divided by ~0; as in
# tf.image.per_image_standardization's max(std, 1/sqrt(N)), the floor keeps inputs finite, and
# such a channel carries less than one level of signal anyway.
STD_FLOOR = 1.0 / 255.0


def floored_channels(std: Sequence[float]) -> list[int]:
  """Indices of the channels whose std is at the floor (`channel_stats` raised them to it)."""
  return [c for c, s in enumerate(std) if s <= STD_FLOOR]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 images [N, H, W, C] on the 0-1 scale; a std below
  `STD_FLOOR` is raised to it (the data's stats divide the inputs).

  From each channel's histogram of the 256 values: exact float64 moments without a float copy of
  the images (50,000 CIFAR images would take 1.2 GB as float64).
  """
  pixels = images.reshape(-1, images.shape[-1])
  counts = np.zeros((pixels.shape[-1], 256))
  for start in range(0, len(pixels), _STATS_CHUNK):  # chunks that stay in cache: 5x faster
    chunk = pixels[start : start + _STATS_CHUNK]
    for c in range(pixels.shape[-1]):
      counts[c] += np.bincount(chunk[:, c], minlength=256)
  values = np.arange(256, dtype=np.float64) / 255.0
  means, stds = [], []
  for c in range(pixels.shape[-1]):
    p = counts[c] / counts[c].sum()
    mean = float(p @ values)
    means.append(mean)
    stds.append(max(float(np.sqrt(max(p @ (values - mean) ** 2, 0.0))), STD_FLOOR))
  return tuple(means), tuple(stds)


def _to_rgb(images: np.ndarray) -> np.ndarray:
  """Grey [N, H, W] or [N, H, W, 1] -> [N, H, W, 3]; RGB passes through."""
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def _make_dataset(
  name: str, train: Split, test: Split, num_classes: int, class_names: tuple[str, ...] = ()
) -> DatasetArrays:
  """Builds DatasetArrays with train-set channel statistics, checking dtypes and shapes."""
  for split in (train, test):
    if split.images.dtype != np.uint8 or split.images.ndim != 4 or split.images.shape[-1] != 3:
      raise DataError(
        f"dataset {name!r}: expected uint8 images [N, H, W, 3], got "
        f"{split.images.dtype} {split.images.shape}"
      )
    if len(split.images) != len(split.labels):
      raise DataError(
        f"dataset {name!r}: {len(split.images)} images but {len(split.labels)} labels"
      )
  mean, std = channel_stats(train.images)
  return DatasetArrays(
    name=name,
    train=train,
    test=test,
    num_classes=num_classes,
    mean=mean,
    std=std,
    class_names=tuple(class_names),
  )


# ------------------------------------------------------------------------------------------ digits

DIGITS_SIZE = 32
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def _upscale_digits(grey: np.ndarray) -> np.ndarray:
  """8x8 values 0..16 -> 32x32 uint8 0..255 by 4x nearest (pixel replication).

  Why nearest: the bundled digits are 8x8 block averages of 32x32 binary bitmaps (sklearn's
  docs), so a 4x4 block per pixel is the image's own grid; it keeps every stored value exact
  and gives the 32 px crop/translate ops whole-pixel structure to move. The device-side resize
  to `model.image_size` (bilinear) then smooths it like any other dataset. Measured: a small
  BN-CNN (8 epochs, Adam, crop 4 reflect) reached 89.4 / 93.3 % test accuracy on nearest vs
  82.8 / 90.0 % on bilinear 8->32 upscaling, seeds 0 / 1.
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
    np.arange(len(labels)),
    test_size=DIGITS_TEST_FRACTION,
    random_state=DIGITS_SEED,
    stratify=labels,
  )
  # Sorted indices: a split's order does not depend on the splitter; the pipeline shuffles.
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  return _make_dataset(
    "digits",
    Split(images[train_idx], labels[train_idx]),
    Split(images[test_idx], labels[test_idx]),
    num_classes=10,
  )


# -------------------------------------------------------------------------------------------- tfds

# tfds retries an unreachable host for minutes (urllib3, 10 retries with backoff); a quick TCP
# probe of the hosts it downloads from turns "no network" into an error within seconds.
DOWNLOAD_PROBE_HOSTS = (("storage.googleapis.com", 443), ("www.cs.toronto.edu", 443))
DOWNLOAD_PROBE_TIMEOUT_S = 3.0


def _network_reachable(hosts=DOWNLOAD_PROBE_HOSTS, timeout_s=DOWNLOAD_PROBE_TIMEOUT_S) -> bool:
  """True when a TCP connection to any of `hosts` opens within `timeout_s` seconds."""
  for host, port in hosts:
    try:
      with socket.create_connection((host, port), timeout=timeout_s):
        return True
    except OSError:
      continue
  return False


def tfds_builder(dataset_config):
  """The tfds builder for `dataset.name` in `dataset.data_dir`; DataError for unknown names, a
  ConfigError where tensorflow-datasets is not installed."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError(
      f"dataset.name={dataset_config.name!r} is read through tfds, which needs TensorFlow and "
      "tensorflow-datasets (pip install tensorflow tensorflow-datasets); without them use "
      "digits, cifar_python or an image folder in memory"
    ) from None

  try:
    return tfds.builder(dataset_config.name, data_dir=dataset_config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(
      f"unknown tfds dataset {dataset_config.name!r}; known: 'digits' or any name "
      f"in tfds.list_builders() (e.g. cifar10, cifar100, svhn_cropped)"
    ) from e


def prepare(dataset_config):
  """Makes sure `config.dataset` is on disk (tfds: download and prepare if allowed); loads nothing.

  Returns the tfds builder (None for other sources), for `load_dataset` and the streamed path to
  reuse: one builder per launch. For multi-host runs, call on process 0 and then barrier before
  every process calls `load_dataset`. Bundled sources and torchvision archives need nothing.

  Raises:
    DataError: data absent and `dataset.download` is False or the network is unreachable; the
      message says where the prepared data must be put.
  """
  if source_name(dataset_config) != "tfds":
    return None
  builder = tfds_builder(dataset_config)
  if builder.is_prepared():
    return builder
  where = (
    f"put the prepared tfds dataset at {builder.data_path} (e.g. `tfds build "
    f"{dataset_config.name} --data_dir=DIR` on a machine with network, then copy DIR/"
    f"{dataset_config.name}), or point dataset.data_dir at the folder holding it"
  )
  if not dataset_config.download:
    raise DataError(
      f"tfds dataset {dataset_config.name!r} is not prepared and dataset.download is False: {where}"
    )
  if not _network_reachable():
    raise DataError(
      f"tfds dataset {dataset_config.name!r} is not prepared and the network is "
      f"unreachable (probed {[h for h, _ in DOWNLOAD_PROBE_HOSTS]}): {where}"
    )
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    # Download/extract errors come in many types (network, checksum, disk); name them in one line.
    reason = " ".join(str(e).split())[:300]
    raise DataError(
      f"could not download tfds dataset {dataset_config.name!r} "
      f"({type(e).__name__}: {reason}): {where}"
    ) from e
  return builder


def _tfds_split(builder, split: str, label_key: str, image_key: str) -> Split:
  """Reads one tfds split fully into numpy, in the stored order."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  # Batches of 10k rather than batch_size=-1: bounded peak memory, and it works with
  # tfds.testing.mock_data (whose split sizes are unknown).
  from jaxsam.data import decode  # pylint: disable=import-outside-toplevel

  # Decoded by the streamed path's decoder (decode.tf_decode), not tfds' own (TF's fast DCT): a
  # JPEG dataset then gives the same pixels in memory and streamed.
  dataset = (
    builder.as_dataset(
      split=split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()}
    )
    .map(lambda ex: (decode.tf_decode(ex[image_key]), ex[label_key]))
    .batch(10_000)
  )
  images, labels = [], []
  for image_batch, label_batch in tfds.as_numpy(dataset):
    images.append(image_batch)
    labels.append(label_batch)
  if not images:
    raise DataError(f"tfds dataset {builder.name!r} split {split!r} is empty")
  return Split(
    _to_rgb(np.concatenate(images)).astype(np.uint8), np.concatenate(labels).astype(np.int32)
  )


def load_tfds(dataset_config, builder=None) -> DatasetArrays:
  """Any tfds image-classification dataset, prepared (see `prepare`, which gives `builder`) and
  loaded into memory."""
  builder = builder or prepare(dataset_config)
  keys = builder.info.supervised_keys
  if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
    raise DataError(
      f"tfds dataset {dataset_config.name!r} has no (image, label) supervised keys "
      f"(got {keys!r}); only image-classification datasets are supported"
    )
  image_key, label_key = keys
  label_feature = builder.info.features[label_key]
  if not hasattr(label_feature, "num_classes"):
    raise DataError(
      f"tfds dataset {dataset_config.name!r}: label {label_key!r} is not a "
      f"ClassLabel; only image-classification datasets are supported"
    )
  train = _tfds_split(builder, dataset_config.train_split, label_key, image_key)
  test = _tfds_split(builder, dataset_config.test_split, label_key, image_key)
  return _make_dataset(dataset_config.name, train, test, int(label_feature.num_classes))


# ------------------------------------------------------------------------------------ cifar_python

# torchvision's layouts: folder name -> (dataset name, label field, train files, test files).
CIFAR_LAYOUTS = {
  "cifar-10-batches-py": (
    "cifar10",
    b"labels",
    [f"data_batch_{i}" for i in range(1, 6)],
    ["test_batch"],
  ),
  "cifar-100-python": ("cifar100", b"fine_labels", ["train"], ["test"]),
}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR_SIDE = 32

# The only globals a CIFAR pickle may name: numpy's array reconstruction. Anything else (a
# pickle can call any importable function) is refused, so a foreign file cannot run code.
_CIFAR_PICKLE_GLOBALS = {
  ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
  ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
  ("numpy", "ndarray"): np.ndarray,
  ("numpy", "dtype"): np.dtype,
  # Python 3 writers at protocol 2 (the files' protocol) store bytes through codecs.encode.
  ("_codecs", "encode"): codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
  """Unpickler that resolves only numpy array reconstruction globals."""

  def find_class(self, module, name):
    if (module, name) in _CIFAR_PICKLE_GLOBALS:
      return _CIFAR_PICKLE_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _read_cifar_batch(raw: bytes, where: str, label_field: bytes, num_classes: int) -> Split:
  """One pickled CIFAR batch -> Split, checking that it has exactly the expected structure."""
  try:
    batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{where} is not a CIFAR python batch ({type(e).__name__}: {e})") from e
  if not isinstance(batch, dict):
    raise DataError(f"{where} is not a CIFAR python batch (a {type(batch).__name__}, not a dict)")
  batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
  data, labels = batch.get(b"data"), batch.get(label_field)
  if (
    not isinstance(data, np.ndarray)
    or data.dtype != np.uint8
    or data.ndim != 2
    or (data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE)
  ):
    got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
    raise DataError(
      f"{where} is not a CIFAR python batch: 'data' must be uint8 [N, 3072], got {got}"
    )
  if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
    raise DataError(
      f"{where} is not a CIFAR python batch: {label_field.decode()!r} must be a "
      f"list of {len(data)} labels"
    )
  labels = np.asarray(labels)
  if labels.dtype.kind not in "iu" or (
    len(labels) and (labels.min() < 0 or labels.max() >= num_classes)
  ):
    raise DataError(
      f"{where} is not a CIFAR python batch: {label_field.decode()!r} must be "
      f"integers in [0, {num_classes})"
    )
  images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
  return Split(np.ascontiguousarray(images), labels.astype(np.int32))


def _concat(splits: list[Split]) -> Split:
  return Split(
    np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits])
  )


def _cifar_member_reader(path: str):
  """Returns (layout folder name, read(file name) -> bytes, where(file name) -> str) for a
  folder or a tar(.gz) archive; (None, None, None) when `path` holds neither layout."""
  if os.path.isdir(path):
    for layout in CIFAR_LAYOUTS:
      for folder in (path, os.path.join(path, layout)):  # the folder itself or torchvision's root
        if os.path.basename(os.path.normpath(folder)) == layout and os.path.isdir(folder):

          def read(name, folder=folder):
            with open(os.path.join(folder, name), "rb") as f:
              return f.read()

          return layout, read, lambda name, folder=folder: os.path.join(folder, name)
    return None, None, None
  if os.path.isfile(path) and tarfile.is_tarfile(path):
    # The image-folder sources' archive reader: member names checked, nothing extracted.
    from jaxsam.data import image_folder  # pylint: disable=import-outside-toplevel  (PIL)

    tree = image_folder.open_tree(path)
    files = set(tree.files)
    for layout in CIFAR_LAYOUTS:
      if any(name.startswith(layout + "/") for name in files):

        def read(name, layout=layout):
          if f"{layout}/{name}" not in files:
            raise FileNotFoundError(f"{layout}/{name}")
          return tree.read(f"{layout}/{name}")

        return layout, read, lambda name, layout=layout: f"{path}:{layout}/{name}"
  return None, None, None


def load_cifar_python(dataset_config) -> DatasetArrays:
  """torchvision's `cifar-10-batches-py` / `cifar-100-python` folder or its .tar.gz, in memory."""
  path = os.path.expanduser(dataset_config.path)
  expected = f"the {' or '.join(CIFAR_LAYOUTS)} folder (or torchvision's .tar.gz, or their parent)"
  if not path:
    raise DataError(f"dataset.source='cifar_python' needs dataset.path: {expected}")
  if not os.path.exists(path):
    raise DataError(f"dataset.path {path!r} does not exist; expected {expected}")
  layout, read, where_is = _cifar_member_reader(path)
  if layout is None:
    raise DataError(f"dataset.path {path!r} is not a CIFAR python archive; expected {expected}")
  name, label_field, train_files, test_files = CIFAR_LAYOUTS[layout]
  if dataset_config.name != name:
    raise DataError(
      f"dataset.path {path!r} holds {name} ({layout}) but dataset.name is "
      f"{dataset_config.name!r}; set dataset.name={name!r}"
    )
  files = {"train": train_files, "test": test_files}
  splits = []
  for split in (dataset_config.train_split, dataset_config.test_split):
    if split not in files:
      raise DataError(f"dataset.source='cifar_python' has splits {list(files)}, not {split!r}")
    batches = []
    for file_name in files[split]:
      where = where_is(file_name)
      try:
        raw = read(file_name)
      except (OSError, KeyError) as e:
        raise DataError(f"{where} is missing; {path!r} is not a complete {layout} archive") from e
      batches.append(_read_cifar_batch(raw, where, label_field, CIFAR_CLASSES[name]))
    splits.append(_concat(batches))
  return _make_dataset(name, splits[0], splits[1], CIFAR_CLASSES[name])


# ------------------------------------------------------------------------------------ image_folder


def load_image_folder(dataset_config) -> DatasetArrays:
  """A `<split>/<class>/<image>` folder or archive (torchvision's ImageFolder layout), in memory."""
  from jaxsam.data import decode, image_folder  # pylint: disable=import-outside-toplevel

  splits = (dataset_config.train_split, dataset_config.test_split)
  if dataset_config.image_size < 0:
    raise DataError(
      f"dataset.image_size={dataset_config.image_size} must be 0 (native sizes) "
      "or a positive side length in pixels"
    )
  loaded = image_folder.load_arrays(
    dataset_config.path,
    splits,
    size=dataset_config.image_size,
    cache_dir=dataset_config.cache_dir,
    max_pixels=decode.check_max_pixels(
      dataset_config.get("max_image_pixels", decode.DEFAULT_MAX_PIXELS)
    ),
    skip_bad=bool(dataset_config.get("skip_bad_images", False)),
  )
  (train_images, train_labels), (test_images, test_labels) = loaded.arrays
  data = _make_dataset(
    dataset_config.name,
    Split(train_images, train_labels),
    Split(test_images, test_labels),
    len(loaded.classes),
    class_names=tuple(loaded.classes),
  )
  return dataclasses.replace(data, skipped_images=loaded.skipped, note=loaded.line)


# -------------------------------------------------------------------------------------- registry

SOURCES: dict[str, Callable] = {
  "digits": load_digits,
  "tfds": load_tfds,
  "cifar_python": load_cifar_python,
  "image_folder": load_image_folder,
}

# Names that select their own source whatever `dataset.source` says.
NAMED_SOURCES = ("digits",)


# Sources that read dataset.path, and what they expect there.
PATH_SOURCES = {
  "image_folder": "a folder or .tar/.tar.gz/.zip archive laid out as <split>/<class>/<image>",
  "cifar_python": "torchvision's cifar-10-batches-py / cifar-100-python folder or its .tar.gz",
}


def source_name(dataset_config) -> str:
  """Which SOURCES entry serves this config: `dataset.source`, except that the default 'tfds'
  with a bundled name (digits) means that bundled set. DataError when the config names
  something the chosen source would silently ignore, or a path that does not exist."""
  source = dataset_config.get("source", "tfds")
  if source not in SOURCES or source in NAMED_SOURCES:
    known = sorted(k for k in SOURCES if k not in NAMED_SOURCES)
    raise DataError(
      f"unknown dataset.source {source!r} for dataset {dataset_config.name!r}; "
      f"known sources: {known}, or dataset.name in {list(NAMED_SOURCES)}"
    )
  named = source == "tfds" and dataset_config.name in NAMED_SOURCES
  chosen = dataset_config.name if named else source
  path = dataset_config.get("path", "")
  if chosen not in PATH_SOURCES and path:
    what = f"dataset {chosen!r} (bundled)" if named else "dataset.source='tfds' (reads data_dir)"
    raise DataError(
      f"dataset.path={path!r} is ignored by {what}; to train on it set dataset.source="
      f"'image_folder' ({PATH_SOURCES['image_folder']}) or 'cifar_python', else drop dataset.path"
    )
  if chosen in PATH_SOURCES:
    if not path:
      raise DataError(f"dataset.source={chosen!r} needs dataset.path: {PATH_SOURCES[chosen]}")
    if not os.path.exists(os.path.expanduser(path)):
      raise DataError(
        f"dataset.path {path!r} does not exist; dataset.source={chosen!r} expects "
        f"{PATH_SOURCES[chosen]}"
      )
  return chosen


def load_dataset(dataset_config, builder=None) -> DatasetArrays:
  """Loads `config.dataset` fully into memory as uint8 numpy arrays.

  Args:
    dataset_config: `config.dataset` (keys name, source, path, data_dir, download, train_split,
      test_split; see configs/common.py).
    builder: the tfds builder `prepare` returned, so a launch makes one builder (None: made here).

  Returns:
    DatasetArrays with train/test Splits at native resolution and train-set channel stats.

  Raises:
    DataError: unknown name or source, data absent and not downloadable, malformed archive.
  """
  source = source_name(dataset_config)
  if source == "tfds":
    return load_tfds(dataset_config, builder)
  return SOURCES[source](dataset_config)
