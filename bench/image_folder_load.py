"""Prints how long the image-folder source takes to decode an archive, and to load it again from
its cache (what a relaunch pays).

  python bench/image_folder_load.py               # ../shared/data/cifar10-jpeg.tar.gz
  python bench/image_folder_load.py --path=DIR_OR_ARCHIVE --repeats=5

Each decode starts from an empty cache folder; the cached loads read the entry the decode wrote.
Both are `sources.load_dataset` as training calls it (train-set channel statistics included).
"""

import argparse
import os
import statistics
import tempfile
import time

from configs import common
from jaxsam.data import sources

DEFAULT = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10-jpeg.tar.gz"
)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--path", default=DEFAULT)
  parser.add_argument("--repeats", type=int, default=3, help="cached loads to time")
  parser.add_argument("--decodes", type=int, default=1, help="cold decodes to time")
  args = parser.parse_args()
  config = common.get_base_config().dataset
  config.name, config.source, config.path = "cifar10", "image_folder", args.path
  decode, cached = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.decodes):
      config.cache_dir = os.path.join(tmp, f"cache{i}")
      start = time.perf_counter()
      data = sources.load_dataset(config)
      decode.append(time.perf_counter() - start)
    for _ in range(args.repeats):
      start = time.perf_counter()
      sources.load_dataset(config)
      cached.append(time.perf_counter() - start)
  print(
    f"{args.path}: {len(data.train.labels):,} train + {len(data.test.labels):,} test images, "
    f"{data.num_classes} classes, {os.cpu_count()} cores"
  )
  print(f"decode (empty cache): median {statistics.median(decode):.1f} s of {len(decode)}")
  print(f"relaunch (from cache): median {statistics.median(cached):.2f} s of {len(cached)}")


if __name__ == "__main__":
  main()
