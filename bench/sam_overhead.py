"""Prints the wall-clock cost of SAM and its cheaper variants relative to plain SGD.

Every variant's step is jaxsam's real compiled train step, built from the same config as the loop
builds it (`optim.make_optimizer`, `steps.compile_train_step`) with only the `sam.*` keys changed,
on a one-device mesh with the batch already on device; the count-based schedules run the loop's
two branch-free programs chosen on the host (`optim.host_ascent_schedule`), AE-SAM its one
program with a `lax.cond`. A variant that does not take the ascent on every step is timed over a
block that holds whole periods (SAM every 5th step, LookSAM with k = 5) or a whole schedule (late
phase: the schedule spans one block, SAM on its last 20 %; AE-SAM's threshold schedule likewise),
each block starting from the same fresh state. After compile and one untimed block per variant,
the blocks are timed round-robin (SGD, SAM, SAM-5, ...), each dispatched back to back and then
blocked on, so load from other processes hits every variant alike. The table gives each
variant's median seconds per step, its ratio to SGD's median, the median of the per-round ratios,
the fraction of SAM steps in its block, and XLA's FLOP ratio of its compiled step (for a variant
with a cond, AE-SAM, XLA counts both sides, so that figure is an upper bound).

Targets on a 2-core CPU: SAM <= 2.05 (two passes), SAM-5 <= 1.25, LookSAM-5 <= 1.3, late phase
(last 20 %) <= 1.25, MSAM <= 1.1.

  python bench/sam_overhead.py [--models resnet18] [--batch 32] [--image-size 32] [--cifar-stem]
                               [--block 20] [--rounds 5] [--variants sgd sam sam5 ...]
"""

import argparse
import os
import statistics
import time
import warnings

import jax
import numpy as np

from configs import common
from jaxsam import optim, parallel, stepcost
from jaxsam import state as state_lib

RHO = 0.05
# name -> the sam.* keys over plain SGD (sam.rho = 0). MSAM's rho is its authors' default.
VARIANTS = {
  "sgd": {},
  "sam": {"rho": RHO},
  "sam5": {"rho": RHO, "every": 5},
  "looksam5": {"rho": RHO, "variant": "looksam", "every": 5},
  "late20": {"rho": RHO, "start_fraction": 0.8},
  "aesam": {"rho": RHO, "variant": "aesam"},
  "msam": {"rho": 0.3, "variant": "msam"},
}
TARGETS = {"sam": 2.05, "sam5": 1.25, "looksam5": 1.3, "late20": 1.25, "msam": 1.1}


def make_config(model_name: str, sam: dict, args):
  """The base config (SGD, momentum, L2, cosine lr over one block) with the variant's sam keys."""
  config = common.get_base_config()
  config.model.name = model_name
  config.model.cifar_stem = args.cifar_stem
  config.model.image_size = args.image_size
  config.batch_size = args.batch
  config.num_epochs = 1
  for key, value in sam.items():
    config.sam[key] = value
  return config


def fresh_state(host_state, mesh):
  """A new device copy of the initial state (the compiled step donates the one it is given)."""
  return parallel.replicate(jax.tree.map(np.asarray, host_state), mesh)


def build(config, mesh, batch, block: int, num_classes: int):
  """(programs by ascent choice, host schedule or None, initial host state) for `config`."""
  schedule = optim.host_ascent_schedule(config, block)
  programs, host = {}, None
  for ascent in (True, False) if schedule else (None,):
    step, model, tx, cfg = stepcost.build_step(
      config, mesh, num_classes, steps_per_epoch=block, ascent=ascent
    )
    if host is None:  # both programs take the same state
      host = jax.device_get(state_lib.create_train_state(model, tx, cfg))
    programs[ascent] = step.lower(fresh_state(host, mesh), batch).compile()
  return programs, schedule, host


def run_block(programs, schedule, state, batch, steps: int):
  """(seconds per step, fraction of SAM steps) of `steps` steps dispatched back to back."""
  start = time.perf_counter()
  active = []
  for i in range(steps):
    state, metrics = programs[schedule(i) if schedule else None](state, batch)
    active.append(metrics.get("sam/active"))
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - start) / steps
  fraction = float(np.mean([float(a) for a in active])) if active[0] is not None else 0.0
  return seconds, fraction


def block_flops(programs, schedule, steps: int) -> float:
  """XLA's FLOPs of one block: each step's program counted once per step it runs."""
  return sum(stepcost.flops(programs[schedule(i) if schedule else None]) for i in range(steps))


def measure(model_name: str, args) -> list[dict]:
  """Round-robin block timings of every variant of one model."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  batch = stepcost.synthetic_batch(args.batch, args.image_size, args.num_classes, mesh)
  built = {}
  for name in args.variants:
    config = make_config(model_name, VARIANTS[name], args)
    built[name] = build(config, mesh, batch, args.block, args.num_classes)
    programs, schedule, host = built[name]
    run_block(programs, schedule, fresh_state(host, mesh), batch, args.block)  # warm-up
  times = {name: [] for name in built}
  fractions = {}
  for _ in range(args.rounds):
    for name, (programs, schedule, host) in built.items():
      state = fresh_state(host, mesh)
      jax.block_until_ready(state)
      seconds, fractions[name] = run_block(programs, schedule, state, batch, args.block)
      times[name].append(seconds)
  sgd = times["sgd"]
  sgd_flops = block_flops(*built["sgd"][:2], args.block)
  rows = []
  for name, ts in times.items():
    rows.append(
      {
        "model": model_name,
        "variant": name,
        "ms": 1e3 * statistics.median(ts),
        "ratio": statistics.median(ts) / statistics.median(sgd),
        "round_ratio": statistics.median(t / s for t, s in zip(ts, sgd)),
        "sam_fraction": fractions[name],
        "flop_ratio": block_flops(*built[name][:2], args.block) / sgd_flops,
        "target": TARGETS.get(name),
      }
    )
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["resnet18"])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument(
    "--block",
    type=int,
    default=20,
    help="steps per timed block: whole periods of 5, one whole schedule",
  )
  parser.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds")
  parser.add_argument("--cifar-stem", action="store_true", help="ResNet 3x3 stem, no max-pool")
  args = parser.parse_args()
  if "sgd" not in args.variants:
    args.variants = ["sgd", *args.variants]
  if args.block % 5:
    parser.error(f"--block={args.block} must be a multiple of 5 (whole SAM-5 periods)")
  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")  # CPU may not use donated buffers

  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
    f"batch {args.batch} at {args.image_size} px, cifar_stem={args.cifar_stem}, "
    f"{args.rounds} rounds of {args.block}-step blocks"
  )
  load_before = os.getloadavg()
  rows = [row for name in args.models for row in measure(name, args)]
  load_after = os.getloadavg()
  print(
    f"{'model':<10} {'variant':<9} {'ms/step':>8} {'ratio':>6} {'round':>6} {'SAM %':>6} "
    f"{'FLOPs':>6} {'target':>7}"
  )
  for r in rows:
    target = (
      ""
      if r["target"] is None
      else (f"<={r['target']:g} " + ("ok" if r["ratio"] <= r["target"] else "MISS"))
    )
    print(
      f"{r['model']:<10} {r['variant']:<9} {r['ms']:>8.1f} {r['ratio']:>6.3f} "
      f"{r['round_ratio']:>6.3f} {100 * r['sam_fraction']:>5.0f}% {r['flop_ratio']:>6.2f} "
      f"{target:>7}"
    )
  print(
    "ratio = median ms / SGD's median ms; round = median of per-round ratios; SAM % = steps "
    "with the ascent in a block; FLOPs = XLA's count (both branches of a cond)"
  )
  print(
    "load average (1/5/15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f"
    % (load_before + load_after)
  )


if __name__ == "__main__":
  main()
