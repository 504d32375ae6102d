"""Prints what the one decoder costs the streamed path: JPEG decode + random-resized crop + resize
to 224 per CPU-second, through `decode.tf_decode` against TF's bare `decode_and_crop_jpeg` (its
default fast DCT, no format dispatch: the streamed decoder before the rules were shared), and the
listing's header check per file.

  python bench/stream_decode.py [--images 256] [--passes 9]

Both pipelines run in one process on the same generated ~400x350 JPEGs (quality 90), interleaved
pass by pass so that a busy machine slows both alike; each pass is one tf.data epoch (4 repeats,
parallel map, batches of 32). Prints the median images per CPU-second of each and their ratio, then
the median microseconds per file of `decode.header_problems` on the same files written to a folder.
"""

import argparse
import io
import os
import resource
import statistics
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from jaxsam.data import decode, transforms


def photos(count: int) -> list[bytes]:
  """Smooth scenes with noise, as JPEG (quality 90): a photo's decode cost, not a flat image's."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:350, 0:400]
  out = []
  for i in range(count):
    image = np.stack([(x * 0.6 + i) % 256, (y * 0.7) % 256, ((x + y) * 0.3) % 256], -1)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


def bare_jpeg_box(encoded, box_fn):
  """TF's JPEG crop decode alone: default DCT, no dispatch on the format."""
  shape = tf.image.extract_jpeg_shape(encoded)
  return tf.image.decode_and_crop_jpeg(encoded, box_fn(shape[0], shape[1]), channels=3)


def pipeline(raws: list[bytes], decode_box) -> tf.data.Dataset:
  def crop(encoded, seed):
    uniforms = transforms.crop_uniforms(seed)
    image = decode_box(encoded, lambda h, w: transforms.random_resized_box(h, w, uniforms))
    image.set_shape([None, None, 3])
    return transforms.resize(image, 224, 224)

  seeds = np.stack([np.zeros(len(raws)), np.arange(len(raws))], -1).astype(np.int64)
  ds = tf.data.Dataset.from_tensor_slices((raws, seeds)).repeat(4)
  ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(32).prefetch(2)


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--passes", type=int, default=9)
  args = parser.parse_args()
  raws = photos(args.images)
  pipes = {"bare": pipeline(raws, bare_jpeg_box), "tf_decode": pipeline(raws, decode.tf_decode)}
  for ds in pipes.values():  # warm-up: tracing, thread pools
    for _ in ds:
      pass
  rates = {name: [] for name in pipes}
  for _ in range(args.passes):
    for name, ds in pipes.items():
      start = cpu_seconds()
      count = sum(len(batch) for batch in ds)
      rates[name].append(count / (cpu_seconds() - start))
  medians = {name: statistics.median(r) for name, r in rates.items()}
  for name, r in rates.items():
    print(f"{name}: {medians[name]:.0f} images per CPU-second (passes: {[round(v) for v in r]})")
  print(f"tf_decode / bare: {medians['tf_decode'] / medians['bare']:.3f}")
  with tempfile.TemporaryDirectory() as root:
    paths = []
    for i, raw in enumerate(raws):
      paths.append(os.path.join(root, f"{i}.jpg"))
      with open(paths[-1], "wb") as f:
        f.write(raw)
    times = []
    for _ in range(5):
      start = time.perf_counter()
      decode.header_problems(paths, lambda p: p, decode.DEFAULT_MAX_PIXELS)
      times.append((time.perf_counter() - start) / len(paths) * 1e6)
    print(f"header check: {statistics.median(times):.0f} us per file (median of 5)")


if __name__ == "__main__":
  main()
