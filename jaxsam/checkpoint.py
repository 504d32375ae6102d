"""Orbax checkpoints of the whole train state, plus the loop's position, in one place.

Layout under the workdir: `checkpoints/<step>/` keeps the last `checkpoint_keep` saves; `best/<step>/`
keeps the one with the best test accuracy. Each save holds `state` (params, BN statistics, optimizer
and SAM state, step, RNG key) and `meta` (JSON: epoch, step, metric accumulators, wandb run id...).
Orbax writes to a temporary folder and renames it when complete, so a kill during a save leaves
every earlier checkpoint intact.

Resume order (`latest_path`): an explicit --checkpoint path, else the newest step in
`checkpoints/`, else none (fresh start).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxsam import errors

LAST_DIR = "checkpoints"
BEST_DIR = "best"


class Checkpointer:
  """Saves and restores (state, meta) pairs under one workdir."""

  def __init__(self, workdir: str, keep: int):
    if keep < 1:
      raise errors.ConfigError(f"checkpoint_keep={keep} must be >= 1")
    self.last = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, LAST_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, BEST_DIR)),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["test/accuracy"], best_mode="max"))

  def save(self, step: int, state: Any, meta: dict, *, best_metrics: dict | None = None) -> None:
    """Saves to `checkpoints/` and, when `best_metrics` is given, offers it to `best/`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self.last.save(step, args=args, force=True)
    if best_metrics is not None:
      self.best.save(step, args=args, metrics=best_metrics, force=True)
    self.wait()

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def latest_path(self) -> str | None:
    step = self.latest_step()
    return None if step is None else os.path.join(str(self.last.directory), str(step))

  def close(self) -> None:
    self.last.close()
    self.best.close()


def restore(path: str, abstract_state: Any) -> tuple[Any, dict]:
  """Restores (state, meta) from one checkpoint folder into the structure of `abstract_state`.

  A missing, truncated or incompatible checkpoint raises CheckpointError naming the path.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "state")):
    raise errors.CheckpointError(
        f"checkpoint {path} has no 'state' folder; pass a step folder such as "
        f"<workdir>/{LAST_DIR}/<step>")
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = checkpointer.restore(path, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types; all mean "this checkpoint cannot be used"
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise errors.CheckpointError(
        f"checkpoint {path} cannot be restored into this model/config "
        f"({type(e).__name__}: {first_line}); pick another with --checkpoint=PATH") from e
  return restored["state"], restored["meta"]


def abstract_like(state: Any) -> Any:
  """Shape, dtype and sharding of every leaf, as restore targets."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
