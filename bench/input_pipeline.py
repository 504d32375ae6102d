"""Prints the train input pipeline's throughput in images/s.

crop(4, reflect) + flip + RandAugment(N=2, M=9) + Cutout(16) on uint8 32x32x3 batches of 256 from
an in-memory source (random pixels: the ops' cost does not depend on content), tf.data with
AUTOTUNE on all cores. Reports the median of several timed passes after a warm-up pass.

  python bench/input_pipeline.py [--passes 5] [--batches 40] [--autoaugment] [--torchvision]

--torchvision times the original project's equivalent instead, for the ratio: torchvision's
RandomCrop(32, 4, reflect) + RandomHorizontalFlip + RandAugment(2, 9) on PIL images, ToTensor and a
Cutout(16) on the tensor, in a DataLoader with one worker per core (needs the torch extra).

  python bench/input_pipeline.py --streaming [--images 256] [--per_pass 4096] [--passes 3]

--streaming times full-size photos instead, both pipelines in one run: it writes `--images` JPEGs
of about 400x350 px (smooth random scenes, quality 90) to a temporary <split>/<class>/<image>
folder, then streams them through jaxsam's streamed train input (`jaxsam.data.load` with
dataset.in_memory='false', as training builds it: read, crop box from the header, the crop's
blocks decoded, resize to 224, flip, RandAugment(2, 9), batches of uint8) and through
torchvision's ImageFolder + DataLoader (one worker per core: RandomResizedCrop(224),
RandomHorizontalFlip, RandAugment(2, 9), PILToTensor, uint8 batches); then both again without
RandAugment. Per pass it reports images/s and images per CPU-second, the CPU time being the
process's and its children's (resource.getrusage: TF's threads and the DataLoader's workers
alike), then the ratios and the cores per GPU it takes to feed ResNet-50 at the accelerator
target. A pass is `--per_pass` images (the folder cycled): torchvision's workers start with each
pass and are joined at its end, so their start-up (~0.2 CPU-s) is charged to its images; at 4,096
images per pass that is ~1.5 %, where 256 images per pass flattered jaxsam by ~20 % (long runs keep
their workers for an epoch of many thousand images).
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

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
  dataset = dataset.map(
    lambda x, y, s: (fn(x, s), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )
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
    image[:, max(0, y - size // 2) : y + size // 2, max(0, x - size // 2) : x + size // 2] = 0
    return image

  transform = transforms.Compose(
    [
      transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
      transforms.RandomHorizontalFlip(),
      transforms.RandAugment(2, 9),
      transforms.ToTensor(),
      cutout,
    ]
  )
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(10_000, 32, 32, 3), dtype=np.uint8)

  class Data(torch.utils.data.Dataset):
    def __len__(self):
      return len(images)

    def __getitem__(self, i):
      return transform(Image.fromarray(images[i])), 0

  loader = torch.utils.data.DataLoader(
    Data(),
    batch_size=batch_size,
    shuffle=True,
    num_workers=os.cpu_count(),
    persistent_workers=True,
    drop_last=True,
  )
  rates = []
  for _ in range(passes + 1):  # the first pass starts the workers
    start, count = time.perf_counter(), 0
    for batch, _ in loader:
      count += len(batch)
      if count >= num_batches * batch_size:
        break
    rates.append(count / (time.perf_counter() - start))
  return rates[1:]


# ResNet-50 at 224 px on one GPU, the accelerator target: SGD and SAM train images/s.
TARGET_SGD_IMAGES_PER_S, TARGET_SAM_IMAGES_PER_S = 7_000, 3_500


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and of its children that have ended."""
  own, children = (
    resource.getrusage(resource.RUSAGE_SELF),
    resource.getrusage(resource.RUSAGE_CHILDREN),
  )
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_photos(root: str, count: int, classes: int = 8) -> float:
  """`count` JPEGs of 380-420 x 330-370 px in root/train/<class>/, smooth random scenes (a
  coarse random grid upsampled, plus noise) that compress like photos; returns their mean KB."""
  from PIL import Image

  rng = np.random.default_rng(0)
  sizes = []
  for i in range(count):
    w, h = int(rng.integers(380, 421)), int(rng.integers(330, 371))
    coarse = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    folder = os.path.join(root, "train", f"class{i % classes}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{i:05d}.jpg")
    Image.fromarray(image).save(path, quality=90)
    sizes.append(os.path.getsize(path))
  for c in range(classes):  # a test split with the same classes, as open_stream requires
    os.makedirs(os.path.join(root, "test", f"class{c}"), exist_ok=True)
    Image.fromarray(image).save(os.path.join(root, "test", f"class{c}", "0.jpg"), quality=90)
  return float(np.mean(sizes)) / 1024


def timed(run) -> tuple[float, float]:
  """(images per wall second, images per CPU-second) of `run()`, which returns its image count."""
  start, cpu_start = time.perf_counter(), cpu_seconds()
  count = run()
  return count / (time.perf_counter() - start), count / (cpu_seconds() - cpu_start)


def jaxsam_streamed(
  root: str, per_pass: int, passes: int, batch: int, randaugment: bool = True
) -> list[tuple[float, float]]:
  """jaxsam's streamed train input on the folder (`jaxsam.data.load`, as training builds it):
  (images/s, images per CPU-second) per pass."""
  import jaxsam.data

  config = common.get_base_config()
  config.dataset.source, config.dataset.name, config.dataset.path = "image_folder", "bench", root
  config.dataset.in_memory = "false"
  config.seed, config.batch_size = 0, batch
  augment_config = config.augment
  augment_config.random_resized_crop, augment_config.flip = True, True
  augment_config.crop_padding = 0
  augment_config.randaugment.num_ops = 2 if randaugment else 0
  augment_config.randaugment.magnitude = 9
  data = jaxsam.data.load(config, main=False)
  batches = data.train_input(config, size=224)(0, 0, 1)

  def take(n):
    for _ in range(n):
      assert next(batches)["image"].shape == (batch, 224, 224, 3)
    return n * batch

  take(4)  # warm-up: tracing, AUTOTUNE ramp-up, file cache
  return [timed(lambda: take(per_pass // batch)) for _ in range(passes)]


def torchvision_streamed(
  root: str, per_pass: int, passes: int, batch: int, randaugment: bool = True
) -> list[tuple[float, float]]:
  """torchvision's ImageFolder + DataLoader on the folder, one worker per core, workers started
  per pass and joined at its end (so their CPU time is counted): (images/s, images per CPU-s)."""
  sys.modules.setdefault("triton", None)  # see torchvision_rate
  import torch
  from torchvision import datasets, transforms

  transform = transforms.Compose(
    [
      transforms.RandomResizedCrop(224),
      transforms.RandomHorizontalFlip(),
      *([transforms.RandAugment(2, 9)] if randaugment else []),
      transforms.PILToTensor(),
    ]
  )
  folder = datasets.ImageFolder(os.path.join(root, "train"), transform=transform)

  class Repeated(torch.utils.data.Dataset):  # one pass = per_pass images, cycling the folder
    def __len__(self):
      return per_pass

    def __getitem__(self, i):
      return folder[i % len(folder)]

  def run():
    loader = torch.utils.data.DataLoader(
      Repeated(), batch_size=batch, shuffle=True, num_workers=os.cpu_count(), drop_last=True
    )
    count = 0
    for images, _ in loader:
      assert images.shape == (batch, 3, 224, 224) and images.dtype == torch.uint8
      count += len(images)
    return count

  timed(run)  # warm-up: imports in the workers, file cache
  return [timed(run) for _ in range(passes)]


def streaming_main(args) -> None:
  """Both pipelines on one generated folder, with and without RandAugment, then the ratios."""
  load_before = os.getloadavg()
  cores = os.cpu_count()
  with tempfile.TemporaryDirectory() as root:
    kb = write_photos(root, args.images)
    per_pass = args.per_pass
    print(
      f"{args.images} JPEGs of 380-420 x 330-370 px ({kb:.0f} KB mean), random-resized crop to "
      f"224 + flip (+ RandAugment(2, 9)), uint8 batches of {args.batch_size}, {cores} cores, "
      f"{per_pass} images per pass, {args.passes} passes (medians):"
    )
    ratios = {}
    for randaugment in (True, False):
      what = "with RandAugment(2, 9)" if randaugment else "without RandAugment"
      ours = jaxsam_streamed(root, per_pass, args.passes, args.batch_size, randaugment)
      theirs = torchvision_streamed(root, per_pass, args.passes, args.batch_size, randaugment)
      medians = []
      for name, rows in (
        ("jaxsam streamed (tf.data)", ours),
        (f"torchvision ImageFolder + DataLoader ({cores} workers)", theirs),
      ):
        wall, cpu = (statistics.median(r[i] for r in rows) for i in (0, 1))
        medians.append((wall, cpu))
        print(
          f"  {what}: {name}: {wall:,.0f} images/s, {cpu:,.0f} images per CPU-second "
          f"(passes: {', '.join(f'{w:,.0f}/{c:,.0f}' for w, c in rows)} images/s / per CPU-s)"
        )
      (ours_wall, ours_cpu), (theirs_wall, theirs_cpu) = medians
      ratios[randaugment] = ours_cpu / theirs_cpu
      print(
        f"  {what}: jaxsam / torchvision {ours_cpu / theirs_cpu:.2f}x per CPU-second, "
        f"{ours_wall / theirs_wall:.2f}x images/s"
      )
      if randaugment:
        for kind, target in (("SGD", TARGET_SGD_IMAGES_PER_S), ("SAM", TARGET_SAM_IMAGES_PER_S)):
          print(
            f"  feeding ResNet-50 {kind} at {target:,} images/s per GPU takes {target:,} / "
            f"{ours_cpu:,.0f} = {target / ours_cpu:.1f} cores per GPU with jaxsam, {target:,} / "
            f"{theirs_cpu:,.0f} = {target / theirs_cpu:.1f} with torchvision"
          )
  print(
    f"  per CPU-second: {ratios[True]:.2f}x with RandAugment (target >= 2x), "
    f"{ratios[False]:.2f}x without"
  )
  load_after = os.getloadavg()
  print(
    f"  load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min; above "
    f"{cores} means other jobs shared the cores: images/s drop, images per CPU-second much "
    "less)"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--passes", type=int, default=None, help="default 5 (--streaming: 3)")
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--batch_size", type=int, default=None, help="default 256 (--streaming: 32)")
  parser.add_argument("--autoaugment", action="store_true", help="AutoAugment CIFAR-10 instead")
  parser.add_argument(
    "--torchvision",
    action="store_true",
    help="time the original's PIL/torchvision pipeline instead",
  )
  parser.add_argument(
    "--streaming",
    action="store_true",
    help="full-size JPEGs: jaxsam's streamed input against torchvision's",
  )
  parser.add_argument("--images", type=int, default=256, help="--streaming: JPEGs to generate")
  parser.add_argument(
    "--per_pass", type=int, default=4096, help="--streaming: images per pass (the folder cycled)"
  )
  args = parser.parse_args()
  if args.streaming:
    args.passes, args.batch_size = args.passes or 3, args.batch_size or 32
    streaming_main(args)
    return
  args.passes, args.batch_size = args.passes or 5, args.batch_size or 256
  if args.torchvision:
    rates = torchvision_rate(min(args.batches, 20), args.batch_size, args.passes)
    print(
      f"torchvision/PIL crop + flip + RandAugment(2, 9) + Cutout(16), 32 px, batch "
      f"{args.batch_size}, DataLoader with {os.cpu_count()} workers: median "
      f"{statistics.median(rates):,.0f} images/s (passes: "
      f"{', '.join(f'{r:,.0f}' for r in rates)}); load average {os.getloadavg()[0]:.1f}"
    )
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
  print(
    f"crop + flip + {policy} + Cutout(16), uint8 32 px, batch {args.batch_size}, "
    f"{os.cpu_count()} cores: median {statistics.median(rates):,.0f} images/s "
    f"(passes: {', '.join(f'{r:,.0f}' for r in rates)}); "
    f"{cpu_rate:,.0f} images per CPU-second; load average {os.getloadavg()[0]:.1f}"
  )


if __name__ == "__main__":
  main()
