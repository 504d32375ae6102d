"""launch.py subprocess runs: their environment, checkpoints read back, metrics without timings."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from support import devices

TIME_KEYS = {"images_per_sec", "time/input_wait_ms"}  # the metrics that differ between equal runs


def launch_env(tmp: str) -> dict:
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=devices.xla_flags(2),
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="2",
    WANDB_SILENT="true",
    WANDB_DIR=tmp,
    WANDB_CACHE_DIR=os.path.join(tmp, "wandb-cache"),
    WANDB_CONFIG_DIR=os.path.join(tmp, "wandb-config"),
    PYTHONUNBUFFERED="1",
  )
  env.pop("WANDB_MODE", None)
  return env


def load_state(checkpoint: str) -> dict:
  """A checkpoint's train state as numpy arrays, whatever mesh saved it."""
  path = epath.Path(checkpoint) / "state"
  metadata = ocp.StandardCheckpointHandler().metadata(path)
  args = jax.tree.map(
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
    metadata,
    is_leaf=lambda x: hasattr(x, "shape"),
  )
  return ocp.PyTreeCheckpointer().restore(path, restore_args=args)


def without_time(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def failure(done) -> str:
  """What a failed subprocess said: around a fatal error, the lines that name its cause (XLA's or
  the C++ runtime's last log lines) and the Python stacks after them, above the long module list
  Python prints last; else the start of its stderr and its end."""
  err = done.stderr or ""
  if isinstance(err, bytes):
    err = err.decode(errors="replace")
  fatal = err.find("Fatal Python error")
  if fatal >= 0:
    return f"rc {done.returncode}\n[...]\n{err[max(0, fatal - 3000) : fatal + 3000]}\n[...]"
  if len(err) <= 4000:
    return f"rc {done.returncode}\n{err}"
  return f"rc {done.returncode}\n{err[:2000]}\n[...]\n{err[-2000:]}"
