"""Prints the train input pipeline's throughput in images/s.

crop(4, reflect) + flip + RandAugment(N=2, M=9) + Cutout(16) on uint8 32x32x3 batches of 256 from
an in-memory source (random pixels: the ops' cost does not depend on content), tf.data with
AUTOTUNE on all cores. Reports the median of several timed passes after a warm-up pass.

  python bench/input_pipeline.py [--passes 5] [--batches 40] [--autoaugment] [--torchvision]

--torchvision times the original project's equivalent instead, for the ratio: torchvision's
RandomCrop(32, 4, reflect) + RandomHorizontalFlip + RandAugment(2, 9) on PIL images, ToTensor and a
Cutout(16) on the tensor, in a DataLoader with one worker per core (needs the torch extra).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf

from configs import common
from jaxsam.data import augment


def build_dataset(augment_config, num_images: int, batch_size: int) -> tf.data.Dataset:
  """In-memory uint8 images -> batch -> augment (per-example seeds), as the train pipeline does."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(num_images, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, size=num_images, dtype=np.int32)
  seeds = np.stack([np.arange(num_images), np.full(num_images, 7)], axis=1).astype(np.int64)
  fn = augment.make_train_augment(augment_config, image_shape=(32, 32, 3))
  dataset = tf.data.Dataset.from_tensor_slices((images, labels, seeds)).repeat()
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset.map(lambda x, y, s: (fn(x, s), y), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  return dataset.prefetch(tf.data.AUTOTUNE)


def time_pass(iterator, num_batches: int, batch_size: int) -> tuple[float, float]:
  """(images per wall second, images per CPU second of this process) over `num_batches`."""
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    images, _ = next(iterator)
    images.numpy()
  images = num_batches * batch_size
  return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def torchvision_rate(num_batches: int, batch_size: int, passes: int) -> list[float]:
  """Images/s of the original's PIL/torchvision pipeline at 32 px (peer comparison)."""
  # torchvision imports triton, whose LLVM segfaults after TensorFlow's; nothing here needs it.
  sys.modules.setdefault("triton", None)
  import torch
  from PIL import Image
  from torchvision import transforms

  def cutout(image: torch.Tensor, size: int = 16) -> torch.Tensor:  # the original's own Cutout
    _, h, w = image.shape
    y, x = np.random.randint(h), np.random.randint(w)
    image = image.clone()
    image[:, max(0, y - size // 2):y + size // 2, max(0, x - size // 2):x + size // 2] = 0
    return image

  transform = transforms.Compose([
      transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
      transforms.RandomHorizontalFlip(), transforms.RandAugment(2, 9), transforms.ToTensor(),
      cutout])
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(10_000, 32, 32, 3), dtype=np.uint8)

  class Data(torch.utils.data.Dataset):
    def __len__(self):
      return len(images)

    def __getitem__(self, i):
      return transform(Image.fromarray(images[i])), 0

  loader = torch.utils.data.DataLoader(Data(), batch_size=batch_size, shuffle=True,
                                       num_workers=os.cpu_count(), persistent_workers=True,
                                       drop_last=True)
  rates = []
  for _ in range(passes + 1):  # the first pass starts the workers
    start, count = time.perf_counter(), 0
    for batch, _ in loader:
      count += len(batch)
      if count >= num_batches * batch_size:
        break
    rates.append(count / (time.perf_counter() - start))
  return rates[1:]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--passes", type=int, default=5)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--autoaugment", action="store_true", help="AutoAugment CIFAR-10 instead")
  parser.add_argument("--torchvision", action="store_true",
                      help="time the original's PIL/torchvision pipeline instead")
  args = parser.parse_args()
  if args.torchvision:
    rates = torchvision_rate(min(args.batches, 20), args.batch_size, args.passes)
    print(f"torchvision/PIL crop + flip + RandAugment(2, 9) + Cutout(16), 32 px, batch "
          f"{args.batch_size}, DataLoader with {os.cpu_count()} workers: median "
          f"{statistics.median(rates):,.0f} images/s (passes: "
          f"{', '.join(f'{r:,.0f}' for r in rates)}); load average {os.getloadavg()[0]:.1f}")
    return

  config = common.get_base_config().augment
  config.crop_padding, config.crop_fill, config.flip, config.cutout_size = 4, "reflect", True, 16
  if args.autoaugment:
    config.autoaugment = "cifar10"
  else:
    config.randaugment.num_ops, config.randaugment.magnitude = 2, 9
  dataset = build_dataset(config, num_images=50_000, batch_size=args.batch_size)
  iterator = iter(dataset)
  time_pass(iterator, 10, args.batch_size)  # warm-up: tracing, AUTOTUNE ramp-up
  passes = [time_pass(iterator, args.batches, args.batch_size) for _ in range(args.passes)]
  rates = [wall for wall, _ in passes]
  cpu_rate = statistics.median(cpu for _, cpu in passes)
  policy = "AutoAugment(cifar10)" if args.autoaugment else "RandAugment(N=2, M=9)"
  # Images per CPU-second is what a busy machine cannot hide: wall rate ~ it x free cores.
  print(f"crop + flip + {policy} + Cutout(16), uint8 32 px, batch {args.batch_size}, "
        f"{os.cpu_count()} cores: median {statistics.median(rates):,.0f} images/s "
        f"(passes: {', '.join(f'{r:,.0f}' for r in rates)}); "
        f"{cpu_rate:,.0f} images per CPU-second; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
