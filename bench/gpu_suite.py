"""The GPU figures from one command: per model and optimizer, the compiled train step's time,
images/s, XLA GFLOP per image, MFU, memory and compile time, as one Markdown table and one JSON.

  python bench/gpu_suite.py                      # one GPU: <= 9 min, compile included
  python bench/gpu_suite.py --quick              # CPU, tiny sizes, < 4 min (CI runs it)
  python bench/gpu_suite.py --cases=resnet18_cifar --optimizers=sgd,sam --batch=32   # a subset

The ViTs (S/16 and B/16 at 224 px) time AdamW and AdamW + SAM, the conv nets SGD and SAM.
Each model runs in a child process with a time budget, so a model that runs out of memory or time
becomes a row that says so and the others still run. SGD and SAM of every model come first, then
the cheaper SAM variants (SAM every 2nd step, LookSAM, AE-SAM, MSAM, 2 accumulated micro-batches)
in the time left; a variant the installed jaxsam lacks is a row marked n/a. Steps are jaxsam's own
(`jaxsam.stepcost`), one device, a uint8 batch already on it at the model's resolution.
Memory is XLA's static plan of the compiled step (`compiled.memory_analysis()`), the same on any
run; MFU is against the device's dense bf16 (or TF32) peak, n/a where the device is not listed.

Only JAX, flax, optax, numpy and ml_collections are imported: the GPU machine may lack TensorFlow,
tensorflow_datasets and wandb. bench/loop_efficiency.py runs twice at the end (budgets kept from the
variants): with the tf.data pipeline where TensorFlow is installed (a skipped row with that reason
where it is not), and as the real-loop row, launch.py's images/s against the bare step's for
ResNet-18 CIFAR at 32 px with `dataset.pipeline=device`, which needs no TensorFlow. The on-device
train augmentation (bench/device_augment.py --device_only: crop + flip + RandAugment(2, 9) +
Cutout, jitted) gets one line of images/s at 32 and 224 px; it needs no TensorFlow. XLA's
persistent compilation cache is on (the same folder as launch.py's), so a rerun skips the
compiles; the table marks compiles served from it.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from jaxsam import compile_cache  # imports no JAX: each child imports it itself


@dataclasses.dataclass(frozen=True)
class Case:
  """One model at one resolution, batch and dtype; `budget_s` bounds its child process."""

  name: str
  model: str
  image_size: int
  batch: int
  dtype: str
  num_classes: int
  budget_s: float
  cifar_stem: bool = False
  family: str = "sgd"  # which rows it runs: the SGD-based ones, or (ViTs) AdamW and AdamW + SAM


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A row's config keys (flattened); phase 1 rows of every case run before any phase 2 row."""

  name: str
  overrides: dict
  phase: int
  family: str = "sgd"


# One H200 (or H100), <= 9 min in all: budgets sized for compile (~20-60 s per step with SAM's two
# passes) plus 30+ timed steps; the variants get what the SGD/SAM rows leave.
GPU_CASES = (
  Case("resnet50", "resnet50", 224, 256, "bfloat16", 1000, budget_s=150),
  Case("efficientnet_b0", "efficientnet_b0", 224, 256, "bfloat16", 1000, budget_s=150),
  Case("resnet18_cifar", "resnet18", 32, 512, "bfloat16", 10, budget_s=75, cifar_stem=True),
  Case("wrn28_10", "wrn28_10", 32, 256, "bfloat16", 100, budget_s=90),
  # ViTs with the SAM-ViT recipe's optimizer (AdamW, decay on kernels, clip 1); their rows come
  # in phase 1, before the conv nets' cheaper-SAM variants.
  Case("vit_s16", "vit_s16", 224, 256, "bfloat16", 1000, budget_s=120, family="adamw"),
  Case("vit_b16", "vit_b16", 224, 256, "bfloat16", 1000, budget_s=150, family="adamw"),
)
# The same code paths on a 2-core CPU in under 2.5 minutes.
QUICK_CASES = (
  Case("resnet8", "resnet8", 8, 8, "float32", 10, budget_s=100),
  Case("vit_tiny", "vit_tiny", 8, 8, "float32", 10, budget_s=60, family="adamw"),
)
RHO = 0.05
ADAMW = {
  "sam.rho": 0.0,
  "optimizer.name": "adamw",
  "optimizer.learning_rate": 3e-3,
  "optimizer.weight_decay": 0.3,
  "optimizer.grad_clip_norm": 1.0,
}
OPTIMIZERS = (
  Optimizer("sgd", {"sam.rho": 0.0}, phase=1),
  Optimizer("sam", {"sam.rho": RHO}, phase=1),
  Optimizer("sam_every2", {"sam.rho": RHO, "sam.every": 2}, phase=2),
  Optimizer("looksam_k5", {"sam.rho": RHO, "sam.variant": "looksam", "sam.every": 5}, phase=2),
  Optimizer("aesam", {"sam.rho": RHO, "sam.variant": "aesam"}, phase=2),
  Optimizer("msam", {"sam.rho": RHO, "sam.variant": "msam"}, phase=2),
  Optimizer("sam_accum2", {"sam.rho": RHO, "accum_steps": 2}, phase=2),
  Optimizer("adamw", ADAMW, phase=1, family="adamw"),
  Optimizer("adamw_sam", {**ADAMW, "sam.rho": RHO}, phase=1, family="adamw"),
)
# --quick times a subset: every code path of the suite, in CI's 2 minutes (each CPU compile of a
# SAM step takes 5-20 s); the other variants differ only in their config keys.
QUICK_OPTIMIZERS = ("sgd", "sam", "sam_every2", "sam_accum2", "adamw", "adamw_sam")
STEPS_PER_REPEAT = 10  # a multiple of every `every` above, so each repeat has the same mix
MIN_CHILD_S = 20  # less time left than this: the rows are "not run" (a child needs start-up)
MIB = 2**20


# ---- child: one case, its rows one JSON line each as soon as measured ----


def child_config(case: Case, optimizer: Optimizer, batch: int):
  """The base config with the case's model and the row's overrides, or a reason it has none."""
  from configs import common  # pylint: disable=import-outside-toplevel

  config = common.get_base_config()
  flat = {
    "model.name": case.model,
    "model.image_size": case.image_size,
    "model.cifar_stem": case.cifar_stem,
    "batch_size": batch,
    "dtype": case.dtype,
    **optimizer.overrides,
  }
  missing = [k for k in flat if not _has_key(config, k)]
  if missing:
    return None, f"this jaxsam has no config key {', '.join(missing)}"
  config.update_from_flattened_dict(flat)
  return config, None


def _has_key(config, dotted: str) -> bool:
  *parents, leaf = dotted.split(".")
  for p in parents:
    if p not in config:
      return False
    config = config[p]
  return leaf in config


def measure_row(case: Case, optimizer: Optimizer, args, mesh, listener_hits: list) -> dict:
  """Compiles one row's step, reads XLA's FLOPs and memory, warms up, times; a dict of figures."""
  import jax  # pylint: disable=import-outside-toplevel

  from jaxsam import errors, optim, parallel, stepcost  # pylint: disable=import-outside-toplevel
  from jaxsam import state as state_lib  # pylint: disable=import-outside-toplevel

  batch_size = args.batch or case.batch
  config, reason = child_config(case, optimizer, batch_size)
  if config is None:
    return {"status": "n/a", "reason": reason}
  schedule = optim.host_ascent_schedule(config, 1000)
  ascents = [None] if schedule is None else [True, False]  # the loop's host-picked programs
  try:
    built = {
      a: stepcost.build_step(config, mesh, num_classes=case.num_classes, ascent=a) for a in ascents
    }
  except errors.ConfigError as e:
    return {"status": "n/a", "reason": str(e)}
  _, model, tx, cfg = built[ascents[0]]
  batch = stepcost.synthetic_batch(batch_size, case.image_size, case.num_classes, mesh)
  abstract = state_lib.abstract_state(model, tx, cfg, mesh)
  hits_before = len(listener_hits)
  start = time.perf_counter()
  compiled = {a: built[a][0].lower(abstract, batch).compile() for a in ascents}
  compile_s = time.perf_counter() - start
  mems = [stepcost.memory(c) for c in compiled.values()]
  mem = max(mems, key=lambda m: m["peak"])
  # XLA counts a loop body once: accumulated micro-batches run in a lax.scan of accum_steps.
  step_flops = {a: stepcost.flops(c) * cfg.accum_steps for a, c in compiled.items()}
  timed = range(args.warmup, args.warmup + STEPS_PER_REPEAT)
  sam_share = 1.0 if schedule is None else sum(map(schedule, timed)) / len(timed)
  flops = (
    step_flops[None]
    if schedule is None
    else sam_share * step_flops[True] + (1 - sam_share) * step_flops[False]
  )
  row = {
    "status": "ok",
    "compile_s": compile_s,
    "programs": len(compiled),
    "sam_share": sam_share,
    "compile_cached": len(listener_hits) - hits_before >= len(compiled),
    "gflop_step": flops / 1e9,
    "gflop_image": flops / 1e9 / batch_size,
    **{f"{k}_bytes": v for k, v in mem.items()},
  }
  state = parallel.replicate(state_lib.create_train_state(model, tx, cfg), mesh)
  pick = None if schedule is None else (lambda step: compiled[bool(schedule(step))])
  first = compiled[ascents[0]]
  state, _ = stepcost.time_steps(first, state, batch, args.warmup, repeats=1, pick=pick)
  state, seconds = stepcost.time_steps(
    first, state, batch, STEPS_PER_REPEAT, args.repeats, pick=pick
  )
  jax.block_until_ready(state)
  step_s = statistics.median(seconds)
  peak = stepcost.peak_tflops(jax.devices()[0].device_kind, case.dtype)
  row.update(
    step_ms=1e3 * step_s,
    step_ms_repeats=[1e3 * s for s in seconds],
    images_per_s=batch_size / step_s,
    tflops=flops / step_s / 1e12,
    mfu=None if peak is None else flops / step_s / 1e12 / peak,
    peak_tflops=peak,
  )
  return row


def failure_status(error: Exception) -> str:
  text = f"{type(error).__name__} {error}"
  return "oom" if ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()) else "error"


def run_child(args) -> None:
  """Measures the rows of one case in this process, appending one JSON line per row to --jsonl."""
  import warnings  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from jaxsam import parallel  # pylint: disable=import-outside-toplevel

  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")  # backends that cannot donate
  compile_cache.enable(os.environ.get(compile_cache.ENV, ""))
  hits = []
  jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None
  )
  case = {c.name: c for c in all_cases()}[args.child]
  rows = [o for o in OPTIMIZERS if o.name in args.rows.split(",")]
  device = jax.devices()[0]
  mesh = parallel.make_mesh([device])
  write = lambda record: _append(args.jsonl, record)
  write(
    {
      "kind": "device",
      "device_kind": device.device_kind,
      "platform": device.platform,
      "jax": jax.__version__,
      **versions(),
    }
  )
  for optimizer in rows:
    try:
      row = measure_row(case, optimizer, args, mesh, hits)
    except Exception as e:  # noqa: BLE001  (any failure of one row, OOM included, is that row's)
      row = {"status": failure_status(e), "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    write({"kind": "row", "case": case.name, "optimizer": optimizer.name, **row})


def _append(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def versions() -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  return {
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
  }


# ---- parent: children under budgets, then the table and the JSON ----


def all_cases() -> tuple[Case, ...]:
  return GPU_CASES + QUICK_CASES


def spawn(
  case: Case, rows: list[Optimizer], budget_s: float, args, env: dict
) -> tuple[list[dict], dict | None]:
  """One child for `rows` of `case`: (its rows, unfinished ones marked timeout or error; its
  device record)."""
  with tempfile.TemporaryDirectory() as tmp:
    jsonl = os.path.join(tmp, "rows.jsonl")
    command = [
      sys.executable,
      os.path.abspath(__file__),
      f"--child={case.name}",
      f"--rows={','.join(o.name for o in rows)}",
      f"--jsonl={jsonl}",
      f"--batch={args.batch}",
      f"--warmup={args.warmup}",
      f"--repeats={args.repeats}",
    ]
    start = time.perf_counter()
    try:
      done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=budget_s, check=False
      )
      missing = {
        "status": "error",
        "reason": f"child exited {done.returncode}: {_last_line(done.stderr)}",
      }
    except subprocess.TimeoutExpired:
      missing = {"status": "timeout", "reason": f"over the model's {budget_s:.0f} s budget"}
    wall_s = time.perf_counter() - start
    records = []
    if os.path.exists(jsonl):
      with open(jsonl) as f:
        records = [json.loads(line) for line in f]
  done_rows = {r["optimizer"]: r for r in records if r["kind"] == "row"}
  device = next((r for r in records if r["kind"] == "device"), None)
  out = [
    done_rows.get(o.name, {"kind": "row", "case": case.name, "optimizer": o.name, **missing})
    for o in rows
  ]
  for r in out:
    r.update(_case_fields(case, args), child_wall_s=wall_s)
  return out, device


def _last_line(text: str) -> str:
  lines = [line for line in (text or "").strip().splitlines() if line.strip()]
  return lines[-1][:300] if lines else "no output"


def _case_fields(case: Case, args) -> dict:
  return {
    "model": case.model,
    "image_size": case.image_size,
    "batch": args.batch or case.batch,
    "dtype": case.dtype,
    "cifar_stem": case.cifar_stem,
    "num_classes": case.num_classes,
  }


def run_loop_efficiency(args, budget_s: float, env: dict) -> dict:
  """bench/loop_efficiency.py as a child (it needs TensorFlow), or why it was skipped."""
  if importlib.util.find_spec("tensorflow") is None:
    return {
      "status": "skipped",
      "reason": "TensorFlow is not installed (the loop's input pipeline is tf.data)",
    }
  return run_loop_child(["--quick"] if args.quick else [], budget_s, env)


def run_loop_child(extra: list[str], budget_s: float, env: dict) -> dict:
  """bench/loop_efficiency.py with `extra` arguments as a child under `budget_s`: its JSON, or
  a status saying why there is none."""
  if budget_s < MIN_CHILD_S:
    return {"status": "not run", "reason": "suite time budget spent"}
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "loop.json")
    command = [sys.executable, os.path.join(ROOT, "bench", "loop_efficiency.py"), f"--json={out}"]
    try:
      done = subprocess.run(
        command + extra, env=env, capture_output=True, text=True, timeout=budget_s, check=False
      )
    except subprocess.TimeoutExpired:
      return {"status": "timeout", "reason": f"over its {budget_s:.0f} s budget"}
    if not os.path.exists(out):
      return {"status": "error", "reason": f"exited {done.returncode}: {_last_line(done.stderr)}"}
    with open(out) as f:
      return json.load(f)


# ---- the real loop: launch.py's images/s against the bare step's, on-device input (no TF) ----

# The CIFAR study's SGD arm (ResNet-18, CIFAR stem, 32 px, bf16, batch 256) on the digits bundled
# with scikit-learn (32 px uint8, no download), the train split gathered and augmented on the
# device; with --quick at CPU sizes (8 px, float32, batch 16; two ResNet-18 compiles, ~80 s). Its
# budget is kept from the variants', as the tf loop's is.
REAL_LOOP_CONFIG = "configs/cifar10_sgd.py"
REAL_LOOP_SET = ("dataset.name=digits", "eval_batch_size=360")
REAL_LOOP_QUICK_SET = (
  "model.image_size=8",
  "dtype=float32",
  "batch_size=16",
  "optimizer.learning_rate=0.01",  # 0.1 diverges at 8 px, batch 16 (a throughput row still)
)
REAL_LOOP_STEPS = {False: ("--steps=300", "--log_every=50"), True: ("--steps=30", "--log_every=10")}
REAL_LOOP_BUDGET_S = {False: 120.0, True: 90.0}


def real_loop_arguments(quick: bool) -> list[str]:
  """loop_efficiency.py's arguments for the real-loop row."""
  sets = REAL_LOOP_SET + (REAL_LOOP_QUICK_SET if quick else ())
  return [
    f"--config={REAL_LOOP_CONFIG}",
    "--pipeline=device",
    *REAL_LOOP_STEPS[quick],
    *(f"--set={s}" for s in sets),
  ]


def run_real_loop(args, budget_s: float, env: dict) -> dict:
  """The real loop's images/s against the bare step's for ResNet-18 CIFAR with the device
  pipeline (bench/loop_efficiency.py --pipeline=device; no TensorFlow needed)."""
  return run_loop_child(real_loop_arguments(args.quick), budget_s, env)


def real_loop_line(result: dict | None) -> list[str]:
  if result is None:
    return []
  if result.get("status") != "ok":
    what = f"{result.get('status')}: {result.get('reason', '')}"
    return [f"real loop (ResNet-18 CIFAR, device input): {what}"]
  line = (
    f"real loop ({result['model']} CIFAR stem, {result['image_size']} px {result['dtype']}, batch "
    f"{result['batch']}, dataset.pipeline={result['pipeline']}): launch.py "
    f"{result['loop_images_per_s']:,.0f} images/s / bare step (gather + augment + train step) "
    f"{result['step_images_per_s']:,.0f} images/s = **{result['efficiency']:.3f}**"
  )
  return [line]


# ---- device augmentation: images/s of the on-device train augmentation (no TensorFlow) ----

# By --quick: its budget, and what of it is kept from the variants' time (none with --quick, whose
# variant rows CI needs; the line then gets what the variants leave).
DEVICE_AUGMENT_BUDGET_S = {False: 90.0, True: 40.0}
DEVICE_AUGMENT_RESERVE_S = {False: 90.0, True: 0.0}


def run_device_augment(args, budget_s: float, env: dict) -> dict:
  """bench/device_augment.py --device_only as a child: crop + flip + RandAugment(2, 9) + Cutout
  images/s on the device at 32 and 224 px (--quick: 32 and 64 px, small batches)."""
  if budget_s < MIN_CHILD_S:
    return {"status": "not run", "reason": "suite time budget spent"}
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "device_augment.json")
    command = [
      sys.executable,
      os.path.join(ROOT, "bench", "device_augment.py"),
      "--device_only",
      f"--json={out}",
    ] + (["--quick"] if args.quick else ["--batch_224=256"])
    try:
      done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=budget_s, check=False
      )
    except subprocess.TimeoutExpired:
      return {"status": "timeout", "reason": f"over its {budget_s:.0f} s budget"}
    if not os.path.exists(out):
      return {"status": "error", "reason": f"exited {done.returncode}: {_last_line(done.stderr)}"}
    with open(out) as f:
      return json.load(f)


def device_augment_lines(result: dict | None) -> list[str]:
  if result is None:
    return []
  if result.get("status") != "ok":
    return [f"device augmentation: {result.get('status')}: {result.get('reason', '')}"]
  return [
    "device augmentation (crop + flip + RandAugment(2, 9) + Cutout(16), uint8, jitted): "
    + "; ".join(
      f"{r['image_size']} px batch {r['batch']}: {r['images_per_s']:,.0f} images/s"
      for r in result["rows"]
    )
  ]


def fmt(value, spec: str, scale: float = 1.0) -> str:
  return "n/a" if value is None else format(value * scale, spec)


def table(rows: list[dict]) -> str:
  """The Markdown table: one line per row, figures where measured, the status otherwise."""
  header = (
    "| model | px | batch | dtype | optimizer | step ms | images/s | GFLOP/image | MFU "
    "| peak MiB | temp MiB | compile s | status |"
  )
  lines = [header, "|" + "---|" * 13]
  for r in rows:
    model = r["model"] + (" (CIFAR stem)" if r["cifar_stem"] else "")
    head = f"| {model} | {r['image_size']} | {r['batch']} | {r['dtype']} | {r['optimizer']} |"
    if r["status"] != "ok":
      lines.append(head + " |" * 7 + f" {r['status']}: {r.get('reason', '')} |")
      continue
    compile_s = f"{r['compile_s']:.1f}" + (" (cached)" if r["compile_cached"] else "")
    lines.append(
      head + f" {r['step_ms']:.2f} | {r['images_per_s']:,.0f} | {r['gflop_image']:.3f} | "
      f"{fmt(r['mfu'], '.1%')} | {r['peak_bytes'] / MIB:,.1f} | {r['temp_bytes'] / MIB:,.1f} | "
      f"{compile_s} | ok |"
    )
  return "\n".join(lines)


def sam_memory_notes(rows: list[dict]) -> list[str]:
  """SAM's temporaries against SGD's per model: a second live copy of the activations would
  make SAM's nearly twice SGD's; parameter-sized extras (perturbed weights, a second gradient)
  are what SAM needs."""
  ok = {(r["model"], r["optimizer"]): r for r in rows if r["status"] == "ok"}
  notes = []
  pairs = {"sgd": "sam", "adamw": "adamw_sam"}
  for (model, name), sgd in ok.items():
    sam = ok.get((model, pairs.get(name)))
    if name in pairs and sam:
      ratio = sam["temp_bytes"] / sgd["temp_bytes"]
      notes.append(
        f"{model}: {pairs[name]} temp {sam['temp_bytes'] / MIB:,.1f} MiB vs {name} "
        f"{sgd['temp_bytes'] / MIB:,.1f} MiB = {ratio:.2f}x"
        f" (peak {sam['peak_bytes'] / sgd['peak_bytes']:.2f}x)"
      )
  return notes


def suite(args) -> dict:
  """Runs every case's children within the suite's budget; returns the JSON document."""
  start = time.perf_counter()
  deadline = start + args.budget_s
  cases = QUICK_CASES if args.quick else GPU_CASES
  if args.cases:
    known = {c.name: c for c in all_cases()}
    unknown = [n for n in args.cases.split(",") if n not in known]
    if unknown:
      sys.exit(f"error: --cases={','.join(unknown)} unknown; known: {', '.join(known)}")
    cases = tuple(known[n] for n in args.cases.split(","))
  names = args.optimizers or (",".join(QUICK_OPTIMIZERS) if args.quick else "")
  selected = [o for o in OPTIMIZERS if not names or o.name in names.split(",")]
  if args.optimizers and len(selected) != len(args.optimizers.split(",")):
    sys.exit(
      f"error: --optimizers={args.optimizers} has unknown names; known: "
      f"{', '.join(o.name for o in OPTIMIZERS)}"
    )
  cache = compile_cache.resolve(args.compilation_cache, os.environ)
  warning = compile_cache.unwritable_reason(cache) if cache else None
  if warning:
    print(
      f"warning: compilation cache {cache} is not writable ({warning}); compiling without it",
      file=sys.stderr,
    )
    cache = ""
  env = dict(os.environ, **{compile_cache.ENV: cache})
  results, device = {}, None
  loop = None
  # The loop-efficiency run goes last, but its budget is kept from the variants where it will run.
  wants_loop = not args.no_loop_efficiency and importlib.util.find_spec("tensorflow") is not None
  real_loop_s = 0 if args.no_real_loop else REAL_LOOP_BUDGET_S[args.quick]
  for phase in (1, 2):
    for case in cases:
      rows = [o for o in selected if o.phase == phase and o.family == case.family]
      if not rows:
        continue
      left = (
        deadline
        - (args.loop_budget_s if phase == 2 and wants_loop else 0)
        - (real_loop_s if phase == 2 else 0)
        - (DEVICE_AUGMENT_RESERVE_S[args.quick] if phase == 2 and not args.no_device_augment else 0)
        - (time.perf_counter())
      )
      if left < MIN_CHILD_S:
        for o in rows:
          results[(case.name, o.name)] = {
            "kind": "row",
            "case": case.name,
            "optimizer": o.name,
            "status": "not run",
            "reason": "suite time budget spent",
            **_case_fields(case, args),
          }
        continue
      got, dev = spawn(case, rows, min(args.case_budget_s or case.budget_s, left), args, env)
      device = device or dev
      results.update({(case.name, r["optimizer"]): r for r in got})
      print(
        f"  {case.name} phase {phase}: "
        + ", ".join(f"{r['optimizer']} {r['status']}" for r in got),
        file=sys.stderr,
        flush=True,
      )
  device_augment = None
  if not args.no_device_augment:
    left = deadline - (args.loop_budget_s if wants_loop else 0) - real_loop_s - time.perf_counter()
    device_augment = run_device_augment(args, min(DEVICE_AUGMENT_BUDGET_S[args.quick], left), env)
  real_loop = None
  if not args.no_real_loop:
    left = deadline - (args.loop_budget_s if wants_loop else 0) - time.perf_counter()
    real_loop = run_real_loop(args, min(real_loop_s, left), env)
  if not args.no_loop_efficiency:
    loop = run_loop_efficiency(args, min(args.loop_budget_s, deadline - time.perf_counter()), env)
  order = [(c.name, o.name) for c in cases for o in selected if o.family == c.family]
  return {
    "meta": {
      "date": datetime.date.today().isoformat(),
      "command": " ".join(sys.argv),
      "quick": args.quick,
      "wall_s": time.perf_counter() - start,
      "budget_s": args.budget_s,
      "compilation_cache": cache or None,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "cpu_count": os.cpu_count(),
      "device": device,
    },
    "rows": [results[k] for k in order if k in results],
    "loop_efficiency": loop,
    "device_augment": device_augment,
    "real_loop": real_loop,
  }


def report(doc: dict) -> str:
  meta, device = doc["meta"], doc["meta"]["device"] or {}
  title = (
    f"jaxsam GPU suite, {meta['date']}: {device.get('device_kind', 'no device reported')} "
    f"({device.get('platform', '?')}), jax {device.get('jax', '?')}, flax "
    f"{device.get('flax', '?')}, optax {device.get('optax', '?')}, "
    f"wall {meta['wall_s']:.0f} s of a {meta['budget_s']:.0f} s budget"
  )
  lines = [title, "", table(doc["rows"]), ""]
  lines += sam_memory_notes(doc["rows"])
  lines += device_augment_lines(doc.get("device_augment"))
  lines += real_loop_line(doc.get("real_loop"))
  loop = doc["loop_efficiency"]
  if loop is not None:
    if loop.get("status") == "ok":
      lines.append(
        f"loop efficiency ({loop['config']}): launch.py {loop['loop_images_per_s']:,.0f}"
        f" images/s / compiled step {loop['step_images_per_s']:,.0f} = "
        f"**{loop['efficiency']:.3f}**"
      )
    else:
      lines.append(f"loop efficiency: {loop.get('status')}: {loop.get('reason', '')}")
  lines.append(
    "step ms: median of the repeats' mean step time; MFU per device against its dense "
    "peak; peak = arguments + outputs - donated + temporaries (XLA's static plan). "
    "Host-scheduled rows (every-k, LookSAM) alternate the loop's two programs: their "
    "FLOPs are the schedule's mix, compile s and memory cover both. AE-SAM decides on "
    "device (a cond): XLA counts its FLOPs with the pass taken, so its MFU is high."
  )
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="CPU sizes, < 2 min (CI)")
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  parser.add_argument("--optimizers", default="", help="comma-separated row names (default: all)")
  parser.add_argument("--batch", type=int, default=0, help="override every case's batch (0: keep)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument(
    "--repeats",
    type=int,
    default=3,
    help=f"timed repeats of {STEPS_PER_REPEAT} steps (the median is reported)",
  )
  parser.add_argument(
    "--budget_s",
    type=float,
    default=0.0,
    help="suite wall-time budget (default 510 s, --quick 230 s)",
  )
  parser.add_argument(
    "--case_budget_s",
    type=float,
    default=0.0,
    help="every model's budget (default: each its own; a CPU needs more)",
  )
  parser.add_argument(
    "--loop_budget_s",
    type=float,
    default=0.0,
    help="loop_efficiency's budget (default 150 s, --quick 50 s)",
  )
  parser.add_argument("--no_loop_efficiency", action="store_true")
  parser.add_argument("--no_device_augment", action="store_true", help="skip the augment row")
  parser.add_argument("--no_real_loop", action="store_true", help="skip the real-loop row")
  parser.add_argument(
    "--compilation_cache", default=None, help="XLA cache folder ('' = off; default as launch.py)"
  )
  parser.add_argument("--out", default="", help="JSON path (default runs/gpu_suite[_quick].json)")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--rows", default="", help=argparse.SUPPRESS)
  parser.add_argument("--jsonl", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.budget_s = args.budget_s or (230.0 if args.quick else 510.0)
  args.loop_budget_s = args.loop_budget_s or (50.0 if args.quick else 150.0)
  if args.quick and args.repeats == 3:
    args.repeats = 2
  args.out = args.out or os.path.join("runs", f"gpu_suite{'_quick' * args.quick}.json")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child:
    run_child(args)
    return
  doc = suite(args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(doc, f, indent=1, allow_nan=False)
  print(report(doc))
  print(f"figures: {args.out}")
  # Out of time or memory is a figure; a row that raised anything else is a bug in the suite or
  # in jaxsam, which CI (--quick) must catch.
  errors = [f"{r['case']}/{r['optimizer']}" for r in doc["rows"] if r["status"] == "error"]
  if (doc["device_augment"] or {}).get("status") == "error":
    errors.append("device augmentation")
  if (doc["real_loop"] or {}).get("status") == "error":
    errors.append("real loop")
  if errors or (doc["loop_efficiency"] or {}).get("status") == "error":
    sys.exit(f"error: rows failed: {', '.join(errors) or 'loop efficiency'}; see {args.out}")


if __name__ == "__main__":
  main()
