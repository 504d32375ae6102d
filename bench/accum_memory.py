"""Prints the device memory gradient accumulation saves: XLA's plan of the compiled SAM step.

For each `accum_steps` the real train step (`jaxsam.stepcost.build_step`, the loop's own) is
compiled, not run, for one device at the given global batch; `compiled.memory_analysis()` gives
its argument, output, aliased (donated) and temporary bytes, and `stepcost.memory`'s peak is what
the program holds at once. Micro-batches run one after another in a `lax.scan`, so the
activations of only one are alive: temporaries should shrink about n-fold, the state not at all.

  python bench/accum_memory.py [--model resnet50] [--image-size 224] [--batch 64]
                               [--accum 1 2 4] [--rho 0.05] [--dtype bfloat16]
"""

import argparse
import time

import jax

from configs import common
from jaxsam import parallel, stepcost
from jaxsam import state as state_lib

GIB = 2**30


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet50")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--accum", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--dtype", default="bfloat16", choices=list(state_lib.DTYPES))
  parser.add_argument("--num-classes", type=int, default=100)
  args = parser.parse_args()
  mesh = parallel.make_mesh(jax.devices()[:1])
  batch = stepcost.synthetic_batch(args.batch, args.image_size, args.num_classes, mesh)
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}: {args.model} at "
    f"{args.image_size} px, {args.dtype}, global batch {args.batch} on one device, "
    f"SAM rho={args.rho}"
  )
  print(
    f"{'accum':>5} {'micro':>5} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9} "
    f"{'vs 1':>6} {'compile s':>9}"
  )
  base = None
  for n in args.accum:
    config = common.get_base_config()
    config.model.name = args.model
    config.model.image_size = args.image_size
    config.dtype = args.dtype
    config.batch_size = args.batch
    config.accum_steps = n
    config.sam.rho = args.rho
    step, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=args.num_classes)
    state = state_lib.abstract_state(model, tx, cfg, mesh)
    start = time.perf_counter()
    memory = stepcost.memory(step.lower(state, batch).compile())
    seconds = time.perf_counter() - start
    base = base or memory["peak"]
    print(
      f"{n:>5} {args.batch // n:>5} {memory['argument'] / GIB:>9.2f} "
      f"{memory['temp'] / GIB:>9.2f} {memory['peak'] / GIB:>9.2f} "
      f"{memory['peak'] / base:>6.2f} {seconds:>9.0f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
