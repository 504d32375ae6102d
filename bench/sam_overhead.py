"""Prints SAM's cost over plain SGD: the step-time ratio of jaxsam's real compiled train step.

Both steps come from the same config (sam.rho = 0 vs 0.05) through `jaxsam.stepcost.build_step`
(`optim.make_optimizer` and `steps.compile_train_step`), on a one-device mesh, with the batch
already on device. After compile and warm-up the two steps are timed ALTERNATELY in one process
(SGD, SAM, SGD, SAM, ...), each blocking on its outputs, so load from other processes hits both
alike; the table gives the medians, their ratio, the median of the per-pair ratios and XLA's FLOP
ratio (`compiled.cost_analysis()`).
SAM does two forward/backward passes, so 2 is the physical limit; the target is <= 2.05.

  python bench/sam_overhead.py [--models resnet18 resnet50] [--batch 32] [--image-size 32]
                               [--repeats 20] [--rho 0.05] [--cifar-stem]
"""

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from configs import common
from jaxsam import parallel, stepcost


def make_config(model_name: str, rho: float, cifar_stem: bool, batch: int, image_size: int):
  """The base config with the model and SAM radius under test (SGD, momentum, L2, cosine lr)."""
  config = common.get_base_config()
  config.model.name = model_name
  config.model.cifar_stem = cifar_stem
  config.model.image_size = image_size
  config.batch_size = batch
  config.sam.rho = rho
  return config


def build(config, mesh, batch, num_classes: int):
  """(compiled train step, its initial state on device) for `config`, compiled ahead of time."""
  step, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=num_classes)
  state = parallel.replicate(stepcost.init_state(model, tx, cfg.image_size, cfg.dtype), mesh)
  return step.lower(state, batch).compile(), state


def timed(step, state, batch):
  """Runs one step, blocks on every output; returns (new state, seconds)."""
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


def measure(model_name: str, args) -> dict:
  """Alternating SGD/SAM timings of one model; medians, ratios and the FLOP ratio."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  batch = stepcost.synthetic_batch(args.batch, args.image_size, args.num_classes, mesh)
  configs = [make_config(model_name, rho, args.cifar_stem, args.batch, args.image_size)
             for rho in (0.0, args.rho)]
  (sgd, sgd_state), (sam, sam_state) = [build(c, mesh, batch, args.num_classes) for c in configs]
  for _ in range(args.warmup):
    sgd_state, _ = timed(sgd, sgd_state, batch)
    sam_state, _ = timed(sam, sam_state, batch)
  sgd_times, sam_times = [], []
  for _ in range(args.repeats):
    sgd_state, t = timed(sgd, sgd_state, batch)
    sgd_times.append(t)
    sam_state, t = timed(sam, sam_state, batch)
    sam_times.append(t)
  sgd_ms, sam_ms = 1e3 * statistics.median(sgd_times), 1e3 * statistics.median(sam_times)
  return {"model": model_name, "batch": args.batch, "size": args.image_size,
          "sgd_ms": sgd_ms, "sam_ms": sam_ms, "ratio": sam_ms / sgd_ms,
          "pair_ratio": statistics.median(b / a for a, b in zip(sgd_times, sam_times)),
          "flop_ratio": stepcost.flops(sam) / stepcost.flops(sgd)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--num-classes", type=int, default=100)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--repeats", type=int, default=20, help="timed SGD/SAM pairs per model")
  parser.add_argument("--warmup", type=int, default=2, help="untimed pairs after compiling")
  parser.add_argument("--cifar-stem", action="store_true", help="ResNet 3x3 stem, no max-pool")
  args = parser.parse_args()
  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")  # CPU may not use donated buffers

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
        f"rho={args.rho}, cifar_stem={args.cifar_stem}, {args.repeats} alternating pairs")
  load_before = os.getloadavg()
  rows = [measure(name, args) for name in args.models]
  load_after = os.getloadavg()
  header = (f"{'model':<10} {'batch':>5} {'size':>4} {'SGD ms':>9} {'SAM ms':>9} {'ratio':>6} "
            f"{'pair':>6} {'FLOPs':>6}")
  print(header)
  for r in rows:
    print(f"{r['model']:<10} {r['batch']:>5} {r['size']:>4} {r['sgd_ms']:>9.1f} "
          f"{r['sam_ms']:>9.1f} {r['ratio']:>6.3f} {r['pair_ratio']:>6.3f} {r['flop_ratio']:>6.3f}")
  print("ratio = median SAM / median SGD; pair = median of per-pair SAM/SGD; FLOPs = XLA ratio")
  print("load average (1/5/15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f"
        % (load_before + load_after))


if __name__ == "__main__":
  main()
