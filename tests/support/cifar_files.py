"""CIFAR files in torchvision's real on-disk format (Python 2 pickles, folder or .tar.gz), for
tests."""

import io
import pickle
import struct
import tarfile
from typing import ClassVar

import numpy as np


def cifar_batch(rng, n, label_field, num_classes):
  """A batch in the real CIFAR python format: bytes keys, uint8 [N, 3072] planes, list labels."""
  data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
  labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
  batch = {
    b"batch_label": b"testing batch",
    label_field: labels,
    b"data": data,
    b"filenames": [b"img_%d.png" % i for i in range(n)],
  }
  if label_field == b"fine_labels":
    batch[b"coarse_labels"] = [v // 5 for v in labels]
  return batch


def py2_pickle(obj) -> bytes:
  """Pickles like Python 2's cPickle at protocol 2, as the real CIFAR files were written.

  Python 2 `str` (CIFAR's keys, file names and the arrays' raw data) is stored with the
  (SHORT_)BINSTRING opcodes, which Python 3 reads back as bytes (encoding='bytes', our reader)
  or as str (encoding='latin1', torchvision's). Python 3 would write bytes via _codecs.encode.
  """

  class Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch can be extended
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, data):
      if len(data) < 256:
        self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
      else:
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
      self.memoize(data)

    dispatch[bytes] = save_py2_str

  buffer = io.BytesIO()
  Py2Pickler(buffer, protocol=2).dump(obj)
  return buffer.getvalue()


def write_cifar(root, layout, as_tar, rng, per_batch=4):
  """Writes torchvision's CIFAR layout (folder or .tar.gz) as Python 2 pickles; returns
  (path, train batches, test batches, label field)."""
  if layout == "cifar-10-batches-py":
    field, classes, train_files, test_files = (
      b"labels",
      10,
      [f"data_batch_{i}" for i in range(1, 6)],
      ["test_batch"],
    )
    meta = ("batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
  else:
    field, classes, train_files, test_files = b"fine_labels", 100, ["train"], ["test"]
    meta = ("meta", {b"fine_label_names": [b"c%d" % i for i in range(100)]})
  folder = root / layout
  folder.mkdir()
  batches = {}
  for file_name in train_files + test_files:
    batches[file_name] = cifar_batch(rng, per_batch, field, classes)
  batches[meta[0]] = meta[1]
  for file_name, content in batches.items():
    (folder / file_name).write_bytes(py2_pickle(content))
  path = folder
  if as_tar:
    path = root / (layout.replace("-batches-py", "-python") + ".tar.gz")
    with tarfile.open(path, "w:gz") as tar:
      tar.add(folder, arcname=layout)
  return path, [batches[f] for f in train_files], [batches[f] for f in test_files], field
