"""The device pipeline's gather + augmentation fused into the compiled train step, against the same
augmentation as a separate compiled program dispatched before the step (what the loop runs when
`dataset.pipeline=device`), in images/s from one run.

  python bench/device_fusion.py                  # ResNet-18 (CIFAR stem), 16 px, batch 16, SGD
  python bench/device_fusion.py --image_size=32 --batch=256 --rho=0.05   # the GPU study's shapes
  python bench/device_fusion.py --model=resnet8 --native=32 --batch=64    # the quickstart's shapes

Both variants train the same model from the same state on the same rows: an in-memory split of
random uint8 images at `--image_size` resident on the devices, each step gathering its batch by
index and applying crop(4, reflect) + flip + RandAugment(2, 9) + Cutout(16) from the per-example
seeds. The two run alternately, `--repeats` blocks of `--steps` steps each (dispatched back to
back, then one block), so a busy host slows both alike; the medians and their ratio are printed.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from configs import cifar10_sam
from jaxsam import parallel, stepcost
from jaxsam.data import device_input, sources


def bench_config(args):
  config = cifar10_sam.get_config()
  config.model.name = args.model
  config.model.image_size = args.image_size
  config.batch_size = args.batch
  config.dtype = args.dtype
  config.sam.rho = args.rho
  config.sam.m = 0  # the per-device batch: any --batch works
  config.augment.cutout_size = 16 if args.native >= 32 else args.native // 2
  config.augment.randaugment.num_ops, config.augment.randaugment.magnitude = 2, 9
  return config


def programs(config, mesh, num_examples: int, size: int):
  """(separate, fused, state, rows): two `(state, rows) -> (state, metrics)` over one split of
  `size` px images (upscaled or downscaled to the model's side on device, as the loop does)."""
  rng = np.random.default_rng(0)
  split = sources.Split(
    rng.integers(0, 256, (num_examples, size, size, 3), dtype=np.uint8),
    rng.integers(0, 10, num_examples).astype(np.int32),
  )
  train = device_input.DeviceTrainInput(
    split, config.augment, seed=config.seed, global_batch=config.batch_size, mesh=mesh
  )
  step, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=10)
  state = parallel.replicate(stepcost.init_state(model, tx, cfg.image_size, cfg.dtype), mesh)
  rows = parallel.shard_batch(next(train(0, 0, 1)), mesh)

  def separate(state, rows):  # two programs, the augmentation dispatched first
    return step(state, train.on_device(rows))

  fused = train.fuse(step)
  return separate, fused, state, rows


def time_block(program, state, rows, steps: int):
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = program(state, rows)
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - start) / steps


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18", help="model.name (CIFAR stem)")
  parser.add_argument("--image_size", type=int, default=16, help="the model's side")
  parser.add_argument("--native", type=int, default=0, help="the data's side (0: --image_size)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--rho", type=float, default=0.0, help="SAM's radius (0: SGD)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=5, help="timed blocks per variant")
  parser.add_argument("--json", default="", help="also write the figures here")
  args = parser.parse_args(argv)
  args.native = args.native or args.image_size
  config = bench_config(args)
  mesh = parallel.make_mesh()
  separate, fused, state, rows = programs(
    config, mesh, num_examples=max(4 * args.batch, 512), size=args.native
  )
  variants = {"separate": separate, "fused": fused}
  compile_s, seconds = {}, {name: [] for name in variants}
  for name, program in variants.items():  # compile and warm up
    start = time.perf_counter()
    state, _ = time_block(program, state, rows, 2)
    compile_s[name] = time.perf_counter() - start
  for _ in range(args.repeats):
    for name, program in variants.items():
      state, s = time_block(program, state, rows, args.steps)
      seconds[name].append(s)
  median = {name: statistics.median(s) for name, s in seconds.items()}
  ratio = median["separate"] / median["fused"]
  device = f"{mesh.devices.size} x {jax.devices()[0].device_kind}"
  optimizer = f"SAM rho {args.rho}" if args.rho else "SGD"
  print(
    f"{args.model} (CIFAR stem) {optimizer}, {args.native} px data -> {args.image_size} px "
    f"{args.dtype}, batch {args.batch}, crop + flip + RandAugment(2, 9) + Cutout on device; "
    f"{device}, jax {jax.__version__}, {os.cpu_count()} host cores, load {os.getloadavg()[0]:.1f}"
  )
  for name in variants:
    print(
      f"  {name:8s} {1e3 * median[name]:9.1f} ms/step  {args.batch / median[name]:9.1f} images/s"
      f"  (blocks: {', '.join(f'{1e3 * s:.0f}' for s in seconds[name])} ms; first 2 steps with "
      f"compile {compile_s[name]:.1f} s)"
    )
  print(f"fused speed-up over separate (median step time ratio): {ratio:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {"args": vars(args), "seconds": seconds, "median_s": median, "ratio": ratio}, f, indent=1
      )


if __name__ == "__main__":
  main()
