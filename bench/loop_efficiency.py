"""How much of the compiled step's speed the real training loop keeps: launch.py's images/s over the
compiled train step's, for the same model, batch, resolution, dtype and optimizer.

  python bench/loop_efficiency.py            # the study's shape: 32 px uint8 -> 224 on device,
                                             # RandAugment, ResNet-50 bf16, batch 256, SAM (a GPU)
  python bench/loop_efficiency.py --quick    # configs/quickstart.py as it is (CPU, ~1-2 min)
  python bench/loop_efficiency.py --config=configs/quickstart.py --set=batch_size=128 --steps=200
  python bench/loop_efficiency.py --quick --pipeline=both   # tf.data and device, side by side

One run: a `launch.py` training run in a fresh workdir (its metrics.jsonl `images_per_sec`, the
first window dropped: it holds the compile), then, once it has exited, the compiled step alone on
a synthetic uint8 batch at the data's native size (`jaxsam.stepcost`, as bench/train_throughput.py
times it). Both use the digits bundled with scikit-learn, so no download is needed.

`--pipeline` picks `dataset.pipeline`: with `tf` (default) the reference is the train step alone
(the augmentation runs on the host); with `device` it is the same compiled programs the loop runs,
the on-device gather + augmentation then the train step (one fused program where
`device_input.FUSE_INTO_STEP` is on), fed indices and seeds already on the devices, so the ratio
measures only what the loop adds; `both` measures the two in one run.
The device pipeline needs no TensorFlow (neither launch.py nor this script imports it then); the tf
one does: without TensorFlow its run prints a skip with that reason (exit 0), the device run goes
on. On a CPU the tf.data pipeline and the step share the cores, so its figure there has no target.
"""

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from jaxsam import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The study's shape on data every machine has: digits (32 px uint8) upscaled to 224 on device.
STUDY = (
  "configs/sam_ra.py",
  ["dataset.name=digits", "model.pretrained=", "dtype=bfloat16", "eval_batch_size=360"],
)
QUICK = ("configs/quickstart.py", [])
# Every run: no eval or checkpoint before the end (they are outside the timed windows anyway, but
# cost wall time), no progress bar, no wandb.
RUN_KEYS = [
  "eval_every_epochs=100000",
  "checkpoint_every_epochs=100000",
  "progress_bar=False",
  "wandb.mode=disabled",
]


def skip_reason(pipeline: str) -> str | None:
  """Why a run with `dataset.pipeline=pipeline` cannot be measured here, or None."""
  if pipeline == "tf" and importlib.util.find_spec("tensorflow") is None:
    return "TensorFlow is not installed (dataset.pipeline=tf is tf.data)"
  return None


def load_config(path: str, overrides: list[str]):
  """The config file's `get_config()` with KEY=VALUE overrides typed as the keys they set."""
  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    kind = type(node[leaf])
    node[leaf] = value.lower() in ("1", "true") if kind is bool else kind(value)
  return config


def loop_images_per_s(metrics_path: str, batch_size: int) -> tuple[float, int]:
  """(images/s over the train windows after the first, steps they hold) from metrics.jsonl.

  Each window's seconds are its images / its images_per_sec, so this is total images over total
  seconds: windows of different lengths (epoch ends cut them short) count by their time.
  """
  with open(metrics_path) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if "images_per_sec" in r]
  if len(train) < 2:
    raise SystemExit(
      f"error: {metrics_path} has {len(train)} train windows; give more --steps "
      "(the first window, which holds the compile, is dropped)"
    )
  images = seconds = 0.0
  for prev, r in itertools.pairwise(train):
    n = (r["step"] - prev["step"]) * batch_size
    images += n
    seconds += n / r["images_per_sec"]
  return images / seconds, train[-1]["step"] - train[0]["step"]


def run_loop(config_path: str, overrides: list[str], workdir: str, timeout_s: float) -> float:
  """Trains through launch.py; returns its wall seconds (metrics are in `workdir`)."""
  command = [
    sys.executable,
    os.path.join(ROOT, "launch.py"),
    f"--config={config_path}",
    f"--workdir={workdir}",
    *(f"--config.{o}" for o in overrides),
  ]
  start = time.perf_counter()
  done = subprocess.run(
    command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
  )
  if done.returncode != 0:
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise SystemExit(f"error: launch.py exited {done.returncode}: {last}")
  return time.perf_counter() - start


def step_images_per_s(config, repeats: int, steps: int) -> dict:
  """The compiled step alone, fed a uint8 batch at the data's native size as the loop feeds it;
  with `dataset.pipeline=device`, the on-device gather + augmentation before it, from one step's
  indices and seeds already on the devices."""
  import warnings  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  import jaxsam.data  # pylint: disable=import-outside-toplevel
  from jaxsam import parallel, stepcost  # pylint: disable=import-outside-toplevel
  from jaxsam import state as state_lib  # pylint: disable=import-outside-toplevel

  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
  data = jaxsam.data.load(config, main=False)
  native = data.native_size(config.model.image_size)
  num_classes = config.model.num_classes or data.num_classes
  if not config.model.image_size:
    config.model.image_size = native
  mesh = parallel.make_mesh()  # the loop's mesh: every local device
  step, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=num_classes)
  state = parallel.replicate(state_lib.create_train_state(model, tx, cfg), mesh)
  batch = stepcost.synthetic_batch(config.batch_size, native, num_classes, mesh)
  compiled = step.lower(state, batch).compile()
  program = compiled
  if config.dataset.pipeline == "device":
    from jaxsam.data import device_input  # pylint: disable=import-outside-toplevel

    train = data.train_input(config, size=cfg.image_size, mesh=mesh)
    batch = parallel.shard_batch(next(train(0, 0, 1)), mesh)  # indices, labels, seeds
    transform, fuse = device_input.loop_parts(train)
    if fuse:  # the loop's one program: gather + augment + step
      program = fuse(step)
    else:

      def program(state, rows):  # the loop's two programs, in its order
        return compiled(state, transform(rows))

  state, _ = stepcost.time_steps(program, state, batch, 2, repeats=1)
  _, seconds = stepcost.time_steps(program, state, batch, steps, repeats)
  step_s = statistics.median(seconds)
  return {
    "step_images_per_s": config.batch_size / step_s,
    "step_ms": 1e3 * step_s,
    "native_size": native,
    "image_size": cfg.image_size,
    "devices": f"{mesh.devices.size} x {jax.devices()[0].device_kind}",
    "jax": jax.__version__,
  }


def measure(args, pipeline: str) -> dict:
  config_path, overrides = args.config, list(args.set)
  if not config_path:
    config_path, base = QUICK if args.quick else STUDY
    overrides = base + overrides
  overrides.append(f"dataset.pipeline={pipeline}")
  steps = args.steps or (40 if args.quick else 60)
  log_every = args.log_every or (10 if args.quick else 5)
  overrides += [f"max_steps={steps}", f"log_every_steps={log_every}", *RUN_KEYS]
  config = load_config(config_path, overrides)
  with tempfile.TemporaryDirectory() as tmp:
    run = os.path.join(tmp, "run")
    wall_s = run_loop(config_path, overrides, run, args.timeout_s)
    loop, timed_steps = loop_images_per_s(workdir_lib.RunDir(run).metrics, config.batch_size)
  step = step_images_per_s(config, repeats=3, steps=max(10, steps // 10))
  return {
    "status": "ok",
    "config": f"{config_path} {' '.join(overrides)}",
    "pipeline": pipeline,
    "model": config.model.name,
    "batch": config.batch_size,
    "dtype": config.dtype,
    "sam_rho": config.sam.rho,
    "loop_images_per_s": loop,
    "loop_timed_steps": timed_steps,
    "loop_wall_s": wall_s,
    **step,
    "efficiency": loop / step["step_images_per_s"],
    "cpu_count": os.cpu_count(),
    "load_average": os.getloadavg(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="configs/quickstart.py (CPU)")
  parser.add_argument("--config", default="", help="config file (default: the study's shape)")
  parser.add_argument(
    "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable"
  )
  parser.add_argument("--steps", type=int, default=0, help="train steps (default 60, quick 40)")
  parser.add_argument(
    "--log_every", type=int, default=0, help="steps per window (default 5, quick 10)"
  )
  parser.add_argument(
    "--pipeline",
    choices=("tf", "device", "both"),
    default="tf",
    help="dataset.pipeline of the loop and its reference (both: one after the other)",
  )
  parser.add_argument("--timeout_s", type=float, default=600.0, help="launch.py's time limit")
  parser.add_argument("--json", default="", help="also write the figures here")
  args = parser.parse_args()
  pipelines = ("tf", "device") if args.pipeline == "both" else (args.pipeline,)
  results = []
  for pipeline in pipelines:
    reason = skip_reason(pipeline)
    results.append(
      {"status": "skipped", "pipeline": pipeline, "reason": reason}
      if reason
      else measure(args, pipeline)
    )
  result = results[0] if len(results) == 1 else {"status": "ok", "runs": results}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  for run in result.get("runs", [result]):
    report(run)


def report(result: dict) -> None:
  if result["status"] == "skipped":
    print(f"skipped [dataset.pipeline={result['pipeline']}]: {result['reason']}")
    return
  print(
    f"{result['config']}\n{result['devices']}, jax {result['jax']}: launch.py "
    f"{result['loop_images_per_s']:,.1f} images/s over {result['loop_timed_steps']} steps "
    f"(first window dropped) / compiled step {result['step_images_per_s']:,.1f} images/s "
    f"({result['step_ms']:.1f} ms, batch {result['batch']}, {result['native_size']} px uint8 "
    f"-> {result['image_size']} px) = loop efficiency {result['efficiency']:.3f} "
    f"[dataset.pipeline={result['pipeline']}]"
  )


if __name__ == "__main__":
  main()
