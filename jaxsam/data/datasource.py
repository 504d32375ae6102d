"""The one interface the loop, evaluation, analysis and the benches use: `load(config)` gives a
DataSource, decoded in memory (InMemory) or streamed from files (Streamed), each owning its
batches.

Callers never look at which one they hold: both answer the same questions (class count, the side
of a batch's images, steps per epoch) and make the same batches (train, test, analysis).
"""

import abc
import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from jaxsam import errors, parallel
from jaxsam.data import choice, device_input, pipeline, rows, sources, stream_sources, train_split

# `streaming` and `transforms` (TensorFlow) are imported by the Streamed methods that use them, so
# that in-memory data with the device pipeline trains where TensorFlow is not installed.

TrainInput = Callable[[int, int, int], Iterator[dict]]  # (start_step, process, processes)


class DataSource(abc.ABC):
  """A dataset ready to train on: its metadata and its batches."""

  name: str
  num_classes: int
  class_names: tuple[str, ...]
  mean: tuple[float, float, float]  # the train split's channel statistics (0-1 scale)
  std: tuple[float, float, float]
  skipped_images: int  # bad files left out (dataset.skip_bad_images)
  note: str  # the source's start-up line ('' = none)

  @property
  @abc.abstractmethod
  def num_train(self) -> int:
    """Examples in the train split (after `with_train_split`)."""

  @abc.abstractmethod
  def native_size(self, model_size: int) -> int:
    """The side of the images a batch holds before the device resizes them to the model's."""

  @abc.abstractmethod
  def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
    """Full global batches per epoch."""

  @abc.abstractmethod
  def with_train_split(self, dataset_config, seed: int) -> "DataSource":
    """`dataset.train_examples` and `dataset.label_noise` applied to the train split; a
    ConfigError where this source cannot apply them."""

  @abc.abstractmethod
  def train_input(self, config, size: int, mesh=None, main: bool = False) -> TrainInput:
    """`batches(start_step, process_index, process_count)`: this process's share of every global
    train batch from `start_step` on. The augmentation is built (its config checked) now, and
    `dataset.pipeline` resolved (one start-up line on `main`). With the device pipeline the
    result also has `on_device(sharded batch) -> batch`, which the loop applies to each batch
    once placed on `mesh` (default: every device)."""

  @abc.abstractmethod
  def test_batches(
    self, *, global_batch: int, size: int, process_index: int, process_count: int
  ) -> Iterator[dict]:
    """The test split once, this process's rows, padded with mask 0."""

  @abc.abstractmethod
  def train_examples(self, index: np.ndarray, size: int) -> sources.Split:
    """Train examples `index`, unaugmented, as uint8 arrays of one side (for analysis)."""

  def train_split_in_memory(self) -> sources.Split | None:
    """The whole train split as it is trained on (labels with their noise), where it is held in
    memory; None for a streamed one (measuring it would be one more pass over the files)."""
    return None


@dataclasses.dataclass(frozen=True)
class InMemory(DataSource):
  """Every image decoded in host memory (`sources.load_dataset`)."""

  arrays: sources.DatasetArrays

  def __getattr__(self, key):  # name, num_classes, class_names, mean, std
    if key == "arrays":
      raise AttributeError(key)
    return getattr(self.arrays, key)

  @property
  def num_train(self) -> int:
    return len(self.arrays.train.labels)

  def native_size(self, model_size: int) -> int:
    del model_size  # the device resizes
    return self.arrays.train.images.shape[1]

  def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
    del process_count  # every process draws its rows from the same global batches
    return rows.steps_per_epoch(self.num_train, global_batch)

  def with_train_split(self, dataset_config, seed: int) -> "InMemory":
    return InMemory(train_split.apply(self.arrays, dataset_config, seed))

  def train_input(self, config, size: int, mesh=None, main: bool = False) -> TrainInput:
    del size  # batches keep the native side
    name, why = device_input.resolve_pipeline(config.dataset, streamed=False)
    if name == "device":
      train = device_input.DeviceTrainInput(
        self.arrays.train,
        config.augment,
        seed=config.seed,
        global_batch=config.batch_size,
        mesh=parallel.make_mesh() if mesh is None else mesh,
      )
      _say(main, f"jaxsam: input pipeline device ({why}): {train.describe()}")
      return train
    from jaxsam.data import augment  # pylint: disable=import-outside-toplevel

    _say(main, f"jaxsam: input pipeline tf.data on the host ({why})")
    fn = augment.make_train_augment(config.augment, image_shape=self.arrays.train.images.shape[1:])
    return lambda start_step, process_index, process_count: pipeline.train_batches(
      self.arrays.train,
      fn,
      seed=config.seed,
      global_batch=config.batch_size,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
    )

  def test_batches(self, *, global_batch, size, process_index, process_count):
    del size
    return pipeline.eval_batches(
      self.arrays.test,
      global_batch=global_batch,
      process_index=process_index,
      process_count=process_count,
    )

  def train_split_in_memory(self) -> sources.Split:
    return self.arrays.train

  def train_examples(self, index: np.ndarray, size: int) -> sources.Split:
    del size
    train = self.arrays.train
    return sources.Split(images=train.images[index], labels=train.labels[index])


@dataclasses.dataclass(frozen=True)
class Streamed(DataSource):
  """Images decoded from their files as they are trained on (`streaming`)."""

  stream: stream_sources.Stream
  shuffle_buffer: int = 10_000

  def __getattr__(self, key):  # name, num_classes, class_names, mean, std
    if key == "stream":
      raise AttributeError(key)
    return getattr(self.stream, key)

  @property
  def num_train(self) -> int:
    return self.stream.train.num_examples

  def native_size(self, model_size: int) -> int:
    from jaxsam.data import streaming  # pylint: disable=import-outside-toplevel

    return streaming.image_size(self.stream, model_size)

  def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
    from jaxsam.data import streaming  # pylint: disable=import-outside-toplevel

    return streaming.steps_per_epoch(self.stream, global_batch, process_count)

  def with_train_split(self, dataset_config, seed: int) -> "Streamed":
    """An image folder's files are listed, so a subset and label noise apply to the list, as in
    memory; tfds record files are read in order, so they cannot."""
    train = self.stream.train
    if isinstance(train, stream_sources.FolderSplit):
      index, labels = train_split.select(train.labels, self.num_classes, dataset_config, seed)
      if index is None and labels is train.labels:
        return self
      paths = train.paths if index is None else train.paths[index]
      split = dataclasses.replace(train, paths=paths, labels=labels)
      return dataclasses.replace(self, stream=dataclasses.replace(self.stream, train=split))
    for key, off in (("train_examples", 0), ("label_noise", 0.0)):
      if dataset_config.get(key, off) != off:
        raise errors.ConfigError(
          f"dataset.{key}={dataset_config[key]!r} needs random access to the train split "
          f"(tfds records stream in order); set dataset.in_memory='true' or dataset.{key}={off}"
        )
    return self

  def train_input(self, config, size: int, mesh=None, main: bool = False) -> TrainInput:
    from jaxsam.data import augment, streaming, transforms  # pylint: disable=import-outside-toplevel

    del mesh  # batches are made on the host
    _, why = device_input.resolve_pipeline(config.dataset, streamed=True)
    _say(main, f"jaxsam: input pipeline tf.data on the host ({why})")
    augment.make_train_augment(config.augment, image_shape=(size, size, 3))  # checks the keys
    transforms.check_crop(config.augment.crop_scale, config.augment.crop_ratio)
    if self.shuffle_buffer < 1:
      raise errors.ConfigError(
        f"dataset.shuffle_buffer={self.shuffle_buffer}; expected >= 1 examples per shuffle window"
      )
    return lambda start_step, process_index, process_count: streaming.train_batches(
      self.stream,
      config.augment,
      size=size,
      seed=config.seed,
      global_batch=config.batch_size,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      shuffle_buffer=self.shuffle_buffer,
    )

  def test_batches(self, *, global_batch, size, process_index, process_count):
    from jaxsam.data import streaming  # pylint: disable=import-outside-toplevel

    return streaming.eval_batches(
      self.stream,
      size=size,
      global_batch=global_batch,
      crop_fraction=self.stream.eval_crop_fraction,
      process_index=process_index,
      process_count=process_count,
    )

  def train_examples(self, index: np.ndarray, size: int) -> sources.Split:
    from jaxsam.data import streaming  # pylint: disable=import-outside-toplevel

    images, labels = streaming.decode_examples(
      self.stream.train, index, size=size, crop_fraction=self.stream.eval_crop_fraction
    )
    return sources.Split(images=images, labels=labels)


def _say(main: bool, line: str) -> None:
  if main:
    print(line, flush=True)


def load(config, main: bool = True) -> DataSource:
  """`config.dataset` in memory or streamed, as `dataset.in_memory` picks (one line on `main`).

  The source is opened once: tfds is prepared and its builder made once, and both the choice
  and the opened source use them.
  """
  dataset = config.dataset
  choice.in_memory_setting(dataset)  # a bad value fails before any download
  builder = sources.prepare(dataset)
  stream, line = choice.choose(dataset, builder=builder)
  if main:
    print(line, flush=True)
  if not stream:
    data = InMemory(sources.load_dataset(dataset, builder))
  else:
    if not device_input.tensorflow_importable():
      raise errors.ConfigError(
        f"dataset {dataset.name!r} streams from its files, which needs TensorFlow (tf.data; pip "
        "install tensorflow); without it set dataset.in_memory='true'"
      )
    data = Streamed(
      stream_sources.open_stream(dataset, builder), int(dataset.get("shuffle_buffer", 10_000))
    )
  if main and data.note:
    print(data.note, flush=True)
  return data
