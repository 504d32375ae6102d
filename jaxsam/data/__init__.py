"""Input data. `jaxsam.data.load(config)` gives the DataSource the loop, evaluation, analysis and
the benches use; nothing outside this package looks at which kind it is.

Module map (one concern each):
  datasource     the DataSource interface, its in-memory and streamed implementations, `load`
  choice         which path a dataset takes (`dataset.in_memory`: memory estimate, one line why)
  sources        in-memory sources (digits, tfds, cifar_python, image_folder) as uint8 arrays
  image_folder   <split>/<class>/<image> folders and archives: listing, PIL decode, decode cache
  decode         one decoder for both paths (PIL in memory, TF streamed: the same pixels), header
                 checks, bad-file errors
  archives       archives for streaming: .tar/.zip read at random, a .tar.gz unpacked once
  stream_sources a dataset opened to stream: tfds record files or image-folder files, listed
  rows           row arithmetic: which examples a process takes at each step, and their seeds
  pipeline       in-memory batches (augmented in tf.data)
  streaming      streamed batches: tfds windows, file reads, crops, augmentation (tf.data)
  transforms     random-resized crop and eval resize + centre crop of encoded images
  augment        batched augmentation ops (RandAugment, AutoAugment, crop, flip, Cutout)
  augment_spec   the ops table, policies and magnitudes both augment modules read (no TF)
  device_augment augment's ops in jax.numpy, bit for bit (no TF)
  device_input   dataset.pipeline: the train split on the devices, gathered + augmented there
  train_split    class-balanced subsets and label noise of the train split
"""


def load(config, main: bool = True):
  """`config.dataset` as a DataSource (see `datasource.load`); imported here on first use, so
  `import jaxsam.data` costs no TensorFlow import."""
  from jaxsam.data import datasource  # pylint: disable=import-outside-toplevel

  return datasource.load(config, main=main)
