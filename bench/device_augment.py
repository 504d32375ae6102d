"""Prints the train augmentation's throughput on the device against tf.data's, in images/s.

crop(4, reflect) + flip + RandAugment(N=2, M=9) + Cutout(16) on uint8 32x32x3 batches of 256, the
same batches both ways (jaxsam.data.device_augment equals jaxsam.data.augment for the same seeds):
  * tf.data: in-memory images -> batch -> `augment.make_train_augment` in Dataset.map with AUTOTUNE
    on all host cores, prefetched (the loop's host pipeline);
  * device: the images resident on the JAX device as uint8, every step's batch gathered by index
    and augmented from (seed, step) by one jitted program (`device_augment`), dispatched
    back to back as a loop would, synchronised at the end of each pass.
Median of --passes timed passes after a warm-up pass (compile included there), then the ratio;
then the device path at 224 px (the same ops; random pixels: the ops' cost does not depend on
content).

  python bench/device_augment.py [--passes 3] [--batches 20] [--batches_224 3]
  python bench/device_augment.py --device_only --json=out.json   # no TensorFlow (gpu_suite)
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from configs import common

SEED = 7


def bench_config():
  config = common.get_base_config().augment
  config.crop_padding, config.crop_fill, config.flip, config.cutout_size = 4, "reflect", True, 16
  config.randaugment.num_ops, config.randaugment.magnitude = 2, 9
  return config


def random_images(num: int, size: int) -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (num, size, size, 3), dtype=np.uint8)


def tf_rates(num_batches: int, batch: int, passes: int) -> list[float]:
  """Images/s of tf.data with the augmentation in Dataset.map on all host cores."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from jaxsam.data import augment  # pylint: disable=import-outside-toplevel

  tf.config.set_visible_devices([], "GPU")
  images = random_images(50 * batch, 32)
  seeds = np.stack([np.full(len(images), SEED), np.arange(len(images))], 1).astype(np.int64)
  fn = augment.make_train_augment(bench_config(), (32, 32, 3))
  ds = tf.data.Dataset.from_tensor_slices((images, seeds)).repeat().batch(batch, True)
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  iterator = iter(ds.prefetch(tf.data.AUTOTUNE))
  rates = []
  for _ in range(passes + 1):  # the first pass traces and fills the prefetch buffer
    start = time.perf_counter()
    for _ in range(num_batches):
      next(iterator).numpy()
    rates.append(num_batches * batch / (time.perf_counter() - start))
  return rates[1:]


def device_rates(size: int, num_batches: int, batch: int, passes: int) -> tuple[list[float], float]:
  """(images/s of each timed pass, first call's seconds incl. compile) of the device path."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxsam.data import device_augment  # pylint: disable=import-outside-toplevel

  num_images = max(4 * batch, 512) if size <= 64 else 2 * batch
  images = jax.device_put(random_images(num_images, size))
  augment = device_augment.make_device_augment(bench_config(), (size, size, 3))

  @jax.jit
  def step(images, index, step):
    rows = jnp.arange(index.shape[0], dtype=jnp.int32)
    seeds = device_augment.example_seeds(SEED, step, index.shape[0], rows)
    return augment(jnp.take(images, index, axis=0), seeds)

  rng = np.random.default_rng(0)
  indices = [jax.device_put(rng.permutation(num_images)[:batch].astype(np.int32)) for _ in range(8)]
  start = time.perf_counter()
  jax.block_until_ready(step(images, indices[0], jnp.int32(0)))
  first_s = time.perf_counter() - start
  rates = []
  for _ in range(passes):
    start = time.perf_counter()
    out = None
    for i in range(num_batches):
      out = step(images, indices[i % len(indices)], jnp.int32(i))
    jax.block_until_ready(out)
    rates.append(num_batches * batch / (time.perf_counter() - start))
  return rates, first_s


def device_rows(args) -> list[dict]:
  """The device path at 32 px and at the large size, one dict each."""
  import jax  # pylint: disable=import-outside-toplevel

  rows = []
  sizes = ((32, args.batches, args.batch), (args.large, args.batches_224, args.batch_224))
  for size, batches, batch in sizes:
    rates, first_s = device_rates(size, batches, batch, args.passes)
    rows.append(
      {
        "path": "device",
        "image_size": size,
        "batch": batch,
        "images_per_s": statistics.median(rates),
        "passes": rates,
        "first_call_s": first_s,
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
      }
    )
  return rows


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--passes", type=int, default=3, help="timed passes (median reported)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=20, help="batches per pass at 32 px")
  parser.add_argument("--large", type=int, default=224, help="the large image side")
  parser.add_argument("--batch_224", type=int, default=64)
  parser.add_argument("--batches_224", type=int, default=3, help="batches per pass at --large")
  parser.add_argument("--device_only", action="store_true", help="skip tf.data (no TensorFlow)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (CI): 32 and 64 px")
  parser.add_argument("--json", default="", help="write the figures here too")
  args = parser.parse_args(argv)
  if args.quick:
    args.passes, args.batch, args.batches = 2, 32, 3
    args.large, args.batch_224, args.batches_224 = 64, 8, 2
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  rows = device_rows(args)
  tf_median = None
  if not args.device_only:
    tf_passes = tf_rates(args.batches, args.batch, args.passes)
    tf_median = statistics.median(tf_passes)
    rows.insert(
      0,
      {
        "path": "tf.data",
        "image_size": 32,
        "batch": args.batch,
        "images_per_s": tf_median,
        "passes": tf_passes,
        "host_cores": os.cpu_count(),
      },
    )
  print("crop(4, reflect) + flip + RandAugment(2, 9) + Cutout(16), uint8, images/s (median):")
  for r in rows:
    where = r.get("device", f"{r.get('host_cores')} host cores")
    print(
      f"  {r['path']:8s} {r['image_size']:4d} px  batch {r['batch']:4d}  "
      f"{r['images_per_s']:12,.0f}  ({where}; passes "
      + ", ".join(f"{p:,.0f}" for p in r["passes"])
      + (f"; first call {r['first_call_s']:.1f} s" if "first_call_s" in r else "")
      + ")"
    )
  ratio = None
  if tf_median:
    ratio = rows[1]["images_per_s"] / tf_median
    print(f"device / tf.data at 32 px: {ratio:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"status": "ok", "rows": rows, "device_over_tf": ratio}, f, indent=1)


if __name__ == "__main__":
  main()
