"""Prints training throughput and MFU of jaxsam's compiled SGD and SAM steps.

The steps are the real ones (`jaxsam.stepcost.build_step`: `optim.make_optimizer` +
`steps.compile_train_step`, as the train loop builds them from a config), on a mesh of the local
devices, with one uint8 batch already on device at the model's resolution. FLOPs are XLA's count
for the compiled per-device program (`compiled.cost_analysis()`); MFU = achieved FLOP/s per
device / the device's dense peak for the compute dtype (bf16, or TF32 for float32 on GPUs, which
XLA uses for fp32 convolutions by default).

  python bench/train_throughput.py                      # tiny CPU defaults
  python bench/train_throughput.py --model=resnet50 --image_size=224 --batch_size=256 \
      --dtype=bfloat16                                   # one GPU; compare SAM with ~49 GFLOP/image
  python bench/train_throughput.py --peak_tflops=1.2     # a CPU's peak, to print an MFU there

jaxsam.train is not imported on purpose: it pulls in TensorFlow (the input pipeline), seconds of
start-up that a benchmark with synthetic on-device data does not need.
"""

import warnings

import jax
from absl import app, flags

from configs import common
from jaxsam import cli, errors, parallel, stepcost
from jaxsam import state as state_lib

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
  "peak_tflops", 0.0, "Per-device dense peak TFLOP/s (0 = look the device up; CPUs: MFU n/a)."
)

OPTIMIZER_RHO = {"sgd": 0.0, "sam": None}  # None: --rho


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
  step, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=_NUM_CLASSES.value)
  state = parallel.replicate(state_lib.create_train_state(model, tx, cfg), mesh)
  return step.lower(state, batch).compile(), state


def measure(optimizer: str, mesh, batch, peak: float | None) -> dict:
  """Compiles one step, warms up, then times `--steps` steps dispatched back to back."""
  compiled, state = build(make_config(optimizer), mesh, batch)
  if _WARMUP.value:
    state, _ = stepcost.time_steps(compiled, state, batch, _WARMUP.value, repeats=1)
  _, (seconds,) = stepcost.time_steps(compiled, state, batch, _STEPS.value, repeats=1)
  devices = mesh.devices.size
  flops = stepcost.flops(compiled) * devices  # the program runs once per device
  tflops_per_device = flops / devices / seconds / 1e12
  return {
    "optimizer": optimizer,
    "step_ms": 1e3 * seconds,
    "images_per_s": _BATCH.value / seconds,
    "gflop_step": flops / 1e9,
    "gflop_image": flops / 1e9 / _BATCH.value,
    "tflops": flops / seconds / 1e12,
    "mfu": None if peak is None else tflops_per_device / peak,
  }


@cli.entry
def main(argv) -> None:
  del argv
  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")  # CPUs may not use donated buffers
  unknown = [o for o in _OPTIMIZERS.value if o not in OPTIMIZER_RHO]
  if unknown:
    raise errors.ConfigError(
      f"--optimizers={','.join(unknown)} unknown; known: {', '.join(OPTIMIZER_RHO)}"
    )
  devices = jax.local_devices()[: _NUM_DEVICES.value or None]
  mesh = parallel.make_mesh(devices)
  parallel.per_process_batch_size(_BATCH.value, mesh)
  kind = devices[0].device_kind
  peak = _PEAK.value or stepcost.peak_tflops(kind, _DTYPE.value)
  size = _IMAGE_SIZE.value  # uint8 at the model's resolution: no resize inside the step
  batch = stepcost.synthetic_batch(_BATCH.value, size, _NUM_CLASSES.value, mesh)
  print(
    f"jax {jax.__version__}, {len(devices)} x {kind}, peak "
    f"{'n/a' if peak is None else f'{peak:g} TFLOP/s'} per device ({_DTYPE.value}), "
    f"{_STEPS.value} timed steps after {_WARMUP.value} warm-up, SAM rho={_RHO.value}"
  )
  rows = [measure(o, mesh, batch, peak) for o in _OPTIMIZERS.value]
  print(
    f"{'model':<12} {'opt':<4} {'batch':>5} {'px':>4} {'dtype':<8} {'step ms':>9} "
    f"{'images/s':>9} {'GFLOP/step':>11} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6}"
  )
  for r in rows:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(
      f"{_MODEL.value:<12} {r['optimizer']:<4} {_BATCH.value:>5} {size:>4} "
      f"{_DTYPE.value:<8} {r['step_ms']:>9.2f} {r['images_per_s']:>9.1f} "
      f"{r['gflop_step']:>11.2f} {r['gflop_image']:>10.3f} {r['tflops']:>8.3f} {mfu:>6}"
    )
  print("GFLOP from XLA's cost analysis of the compiled step (all devices); MFU per device.")


if __name__ == "__main__":
  app.run(main)
