"""Prints training throughput and MFU of jaxsam's compiled SGD and SAM steps.

The steps are the real ones (`optim.make_optimizer` + `steps.compile_train_step`, as the train loop
builds them from a config), on a mesh of the local devices, with one uint8 batch already on device
at the model's resolution. FLOPs are XLA's count for the compiled per-device program
(`compiled.cost_analysis()`); MFU = achieved FLOP/s per device / the device's dense peak for the
compute dtype (bf16, or TF32 for float32 on GPUs, which XLA uses for fp32 convolutions by default).

  python bench/train_throughput.py                      # tiny CPU defaults
  python bench/train_throughput.py --model=resnet50 --image_size=224 --batch_size=256 \
      --dtype=bfloat16                                   # one GPU; compare SAM with ~49 GFLOP/image
  python bench/train_throughput.py --peak_tflops=1.2     # a CPU's peak, to print an MFU there

jaxsam.train is not imported on purpose: it pulls in TensorFlow (the input pipeline), seconds of
start-up that a benchmark with synthetic on-device data does not need.
"""

import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import common
from jaxsam import errors, models, optim, parallel, steps

_MODEL = flags.DEFINE_string("model", "resnet8", "Model name (jaxsam.models.MODELS).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Resolution the model sees.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch over all local devices.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["sgd", "sam"], "Steps to time: sgd and/or sam.")
_RHO = flags.DEFINE_float("rho", 0.05, "SAM radius of the sam step.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classifier width.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per optimizer.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Local devices to use (0 = all).")
_PEAK = flags.DEFINE_float(
    "peak_tflops", 0.0, "Per-device dense peak TFLOP/s (0 = look the device up; CPUs: MFU n/a).")

# Dense (no sparsity) peak TFLOP/s per device from NVIDIA's data sheets: (bf16, tf32).
# Most specific name first: device_kind is e.g. 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe'.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100 NVL", (835.0, 418.0)),
    ("GH200", (989.0, 494.0)),
    ("H200", (989.0, 494.0)),
    ("H100", (989.0, 494.0)),  # SXM
    ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
    ("L4", (121.0, 60.0)),
)
OPTIMIZER_RHO = {"sgd": 0.0, "sam": None}  # None: --rho


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak for `dtype`, or None when unknown (CPUs, unlisted cards)."""
  for name, (bf16, tf32) in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else tf32
  return None


def make_config(optimizer: str):
  """The base config with the benchmark's model, resolution, batch, dtype and SAM radius."""
  config = common.get_base_config()
  config.model.name = _MODEL.value
  config.model.image_size = _IMAGE_SIZE.value
  config.batch_size = _BATCH.value
  config.dtype = _DTYPE.value
  config.sam.rho = _RHO.value if OPTIMIZER_RHO[optimizer] is None else OPTIMIZER_RHO[optimizer]
  return config


def build(config, mesh, batch):
  """(compiled step, initial state on device) as the train loop builds them from `config`."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
  tx, lr = optim.make_optimizer(config, steps_per_epoch=1000, axis_name=parallel.DATA_AXIS)
  model = models.create_model(config.model, num_classes=_NUM_CLASSES.value, dtype=dtype)
  cfg = steps.StepConfig(image_size=config.model.image_size, mean=steps.IMAGENET_MEAN,
                         std=steps.IMAGENET_STD, dtype=dtype)
  step = steps.compile_train_step(mesh, model=model, tx=tx, lr_schedule=lr, cfg=cfg)
  size = config.model.image_size
  variables = jax.jit(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
      jnp.zeros((1, size, size, 3), dtype), train=False))()
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}),
                           opt_state=tx.init(variables["params"]), rng=jax.random.PRNGKey(2))
  state = parallel.replicate(state, mesh)
  return step.lower(state, batch).compile(), state


def step_flops(compiled) -> float:
  """XLA's FLOPs of one compiled per-device program (a dict, or a list of one per module)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def measure(optimizer: str, mesh, batch, peak: float | None) -> dict:
  """Compiles one step, warms up, then times `--steps` steps dispatched back to back."""
  compiled, state = build(make_config(optimizer), mesh, batch)
  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(_STEPS.value):  # asynchronous dispatch, as in training
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / _STEPS.value
  devices = mesh.devices.size
  flops = step_flops(compiled) * devices  # the program runs once per device
  tflops_per_device = flops / devices / seconds / 1e12
  return {"optimizer": optimizer, "step_ms": 1e3 * seconds,
          "images_per_s": _BATCH.value / seconds, "gflop_step": flops / 1e9,
          "gflop_image": flops / 1e9 / _BATCH.value, "tflops": flops / seconds / 1e12,
          "mfu": None if peak is None else tflops_per_device / peak}


def main(argv) -> None:
  del argv
  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")  # CPUs may not use donated buffers
  unknown = [o for o in _OPTIMIZERS.value if o not in OPTIMIZER_RHO]
  if unknown:
    sys.exit(f"error: --optimizers={','.join(unknown)} unknown; known: "
             f"{', '.join(OPTIMIZER_RHO)}")
  devices = jax.local_devices()[:_NUM_DEVICES.value or None]
  mesh = parallel.make_mesh(devices)
  try:
    parallel.per_process_batch_size(_BATCH.value, mesh)
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  kind = devices[0].device_kind
  peak = _PEAK.value or peak_tflops(kind, _DTYPE.value)
  rng = np.random.default_rng(0)
  size = _IMAGE_SIZE.value
  batch = parallel.shard_batch(  # uint8 at the model's resolution: no resize inside the step
      {"image": rng.integers(0, 256, (_BATCH.value, size, size, 3), dtype=np.uint8),
       "label": rng.integers(0, _NUM_CLASSES.value, (_BATCH.value,)).astype(np.int32)}, mesh)
  print(f"jax {jax.__version__}, {len(devices)} x {kind}, peak "
        f"{'n/a' if peak is None else f'{peak:g} TFLOP/s'} per device ({_DTYPE.value}), "
        f"{_STEPS.value} timed steps after {_WARMUP.value} warm-up, SAM rho={_RHO.value}")
  rows = [measure(o, mesh, batch, peak) for o in _OPTIMIZERS.value]
  print(f"{'model':<12} {'opt':<4} {'batch':>5} {'px':>4} {'dtype':<8} {'step ms':>9} "
        f"{'images/s':>9} {'GFLOP/step':>11} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6}")
  for r in rows:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"{_MODEL.value:<12} {r['optimizer']:<4} {_BATCH.value:>5} {size:>4} "
          f"{_DTYPE.value:<8} {r['step_ms']:>9.2f} {r['images_per_s']:>9.1f} "
          f"{r['gflop_step']:>11.2f} {r['gflop_image']:>10.3f} {r['tflops']:>8.3f} {mfu:>6}")
  print("GFLOP from XLA's cost analysis of the compiled step (all devices); MFU per device.")


if __name__ == "__main__":
  app.run(main)
