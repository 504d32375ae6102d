"""The compiled train step without data: its FLOPs, memory and speed, for benchmarks.

The step is the training loop's own (`optim.make_optimizer` + `steps.compile_train_step` from a
config), fed a synthetic uint8 batch already on device. Nothing here imports TensorFlow, so the
benchmarks run on a machine that has only JAX, flax, optax and ml_collections (a bare GPU box).

  >>> step, model, tx, cfg = build_step(config, mesh, num_classes=10)
  >>> state = parallel.replicate(jaxsam.state.create_train_state(model, tx, cfg), mesh)
  >>> compiled = step.lower(state, batch).compile()
  >>> flops(compiled), memory(compiled)["peak"]
"""

import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxsam import errors, models, optim, parallel, steps
from jaxsam import state as state_lib

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


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak for `dtype` (TF32 for float32), or None when unknown (CPUs)."""
  for name, (bf16, tf32) in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else tf32
  return None


def step_config(
  config: ml_collections.ConfigDict, per_device_batch: int, image_size: int, steps_per_epoch: int
) -> state_lib.StepConfig:
  """The StepConfig the loop derives from `config` (ImageNet normalisation: the same cost)."""
  return state_lib.StepConfig(
    image_size=image_size,
    mean=steps.IMAGENET_MEAN,
    std=steps.IMAGENET_STD,
    dtype=state_lib.compute_dtype(config.dtype),
    label_smoothing=config.label_smoothing,
    **optim.step_sam_settings(config, per_device_batch, steps_per_epoch),
  )


def build_step(
  config: ml_collections.ConfigDict,
  mesh,
  num_classes: int,
  steps_per_epoch: int = 1000,
  ascent: bool | None = None,
) -> tuple[Any, Any, Any, state_lib.StepConfig]:
  """(jitted train step, model, optimizer, StepConfig) as the loop builds them from `config`.

  `config.model.image_size` must be set (there is no dataset to take the native size from).
  `ascent`: for the host-scheduled SAM variants (`optim.host_ascent_schedule`), the SAM (True)
  or the base (False) program; None is the one program of every other config.
  """
  size = config.model.image_size
  if size < 1:
    raise errors.ConfigError(f"model.image_size={size} must be >= 1 without a dataset")
  parallel.per_process_batch_size(config.batch_size, mesh)  # the loop's error if it won't divide
  per_device = config.batch_size // mesh.devices.size
  cfg = step_config(config, per_device, size, steps_per_epoch)
  tx, lr = optim.make_optimizer(
    config, steps_per_epoch, axis_name=optim.sam_axis_name(cfg, per_device)
  )
  model = models.create_model(config.model, num_classes=num_classes, dtype=cfg.dtype)
  extra = {} if ascent is None else {"ascent": ascent}
  step = steps.compile_train_step(mesh, model=model, tx=tx, lr_schedule=lr, cfg=cfg, **extra)
  return step, model, tx, cfg


def synthetic_batch(
  batch_size: int, image_size: int, num_classes: int, mesh, seed: int = 0
) -> dict[str, jax.Array]:
  """Random uint8 images and int32 labels, sharded over the data axis as the loop's batches."""
  rng = np.random.default_rng(seed)
  return parallel.shard_batch(
    {
      "image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
      "label": rng.integers(0, num_classes, (batch_size,)).astype(np.int32),
    },
    mesh,
  )


def flops(compiled) -> float:
  """XLA's FLOPs of one compiled per-device program (a dict, or a list of one per module)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def memory(compiled) -> dict[str, int]:
  """Bytes of one compiled program per device: arguments, outputs, aliased (donated), temporaries.

  peak = arguments + outputs - aliased + temporaries, everything the program holds at once (an
  upper bound: XLA may free an argument before the last temporary is made). XLA's own
  `peak_memory_in_bytes` is kept as `xla_peak`; on CPU it is smaller than the arguments alone.
  """
  stats = compiled.memory_analysis()
  out = {
    "argument": int(stats.argument_size_in_bytes),
    "output": int(stats.output_size_in_bytes),
    "alias": int(stats.alias_size_in_bytes),
    "temp": int(stats.temp_size_in_bytes),
    "xla_peak": int(getattr(stats, "peak_memory_in_bytes", 0)),
  }
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def time_steps(compiled, state, batch, num_steps: int, repeats: int = 3, pick=None):
  """(state, seconds per step of each repeat): `num_steps` dispatched back to back, then a block.

  Asynchronous dispatch as in training; the medians of several repeats shrug off a busy host.
  `pick(step)`, when given, is the program for that step (a host schedule), `compiled` unused.
  """
  seconds = []
  step = int(state.step)
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(num_steps):
      state, metrics = (compiled if pick is None else pick(step))(state, batch)
      step += 1
    jax.block_until_ready((state, metrics))
    seconds.append((time.perf_counter() - start) / num_steps)
  return state, seconds
