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
  """What a failed subprocess said: the start of its stderr (a fatal error's first lines, above a
  crash's module list) and its end."""
  err = done.stderr or ""
  if len(err) <= 4000:
    return f"rc {done.returncode}\n{err}"
  return f"rc {done.returncode}\n{err[:2000]}\n[...]\n{err[-2000:]}"
