"""Orbax checkpoints of the whole train state, plus the loop's position, in one place.

Layout under the workdir: `checkpoints/<step>/` keeps the last `checkpoint_keep` saves;
`best/<step>/` keeps the one with the best test accuracy. Each save holds `state` (params, BN
statistics, optimizer and SAM state, step, RNG key) and `meta` (JSON: epoch, best accuracy, the
train-metric window not yet logged, wall time, SAM step count). The input pipeline is a pure
function of (seed, step), so `state.step` is all it needs to continue the same stream.

Safety: orbax writes each save to a temporary folder and renames it when complete, so a kill during
a save leaves every earlier checkpoint intact (the leftover temporary folder is ignored and cleaned
up on the next start). A save that fails (disk full, permissions) raises CheckpointError; the
earlier checkpoints stay as they were.

Resume order (`Checkpointer.restore_latest`): the newest step in `checkpoints/`; if it cannot be
read (truncated or damaged files), a one-line warning names it, it is moved to `corrupt/<step>`
and the next older one is tried; when none can be read, CheckpointError names the newest. A
checkpoint of another model or config is never skipped silently: it raises CheckpointError.
`--mode=eval --checkpoint=PATH` restores one folder explicitly (`restore`).
"""

import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxsam import errors
from jaxsam import workdir as workdir_lib


def _manager(directory: str, barrier_prefix: str, **options) -> ocp.CheckpointManager:
  # Distinct barrier names per manager: with several processes, `checkpoints/` and `best/` save
  # the same step, and shared names would pair one manager's barrier with the other's.
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(
      create=True,
      cleanup_tmp_directories=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        barrier_sync_key_prefix=barrier_prefix
      ),
      **options,
    ),
  )


def _one_line(e: BaseException) -> str:
  """First sentence of an exception, without TensorStore's multi-line spec dumps."""
  text = (str(e).strip().splitlines() or [""])[0]
  text = text.split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class Checkpointer:
  """Saves and restores (state, meta) pairs under one workdir."""

  def __init__(self, workdir: str, keep: int):
    if keep < 1:
      raise errors.ConfigError(f"checkpoint_keep={keep} must be >= 1")
    self.workdir = os.path.abspath(workdir)
    self.run_dir = workdir_lib.RunDir(self.workdir)
    self.keep = keep
    self._open()

  def _open(self) -> None:
    self.last = _manager(self.run_dir.checkpoints, "jaxsam_last", max_to_keep=self.keep)
    self.best = _manager(
      self.run_dir.best,
      "jaxsam_best",
      max_to_keep=1,
      best_fn=lambda m: m["test/accuracy"],
      best_mode="max",
    )

  def save(self, step: int, state: Any, meta: dict, *, best_metrics: dict | None = None) -> str:
    """Saves to `checkpoints/` and, when `best_metrics` is given, offers it to `best/`.

    Returns the new checkpoint folder. Any failure (disk full...) raises CheckpointError; the
    earlier checkpoints are untouched because orbax only renames a save into place once complete.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    try:
      self.last.save(step, args=args, force=True)
      if best_metrics is not None:
        self.best.save(step, args=args, metrics=best_metrics, force=True)
      self.wait()
    except Exception as e:  # orbax/tensorstore wrap OSErrors in many types
      raise errors.CheckpointError(
        f"saving checkpoint step {step} under {self.workdir} failed ({_one_line(e)}); earlier "
        f"checkpoints are intact: free space or fix the folder, then rerun to resume"
      ) from e
    return self.step_path(step)

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.last.all_steps())

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def step_path(self, step: int) -> str:
    return self.run_dir.checkpoint(step)

  def latest_path(self) -> str | None:
    step = self.latest_step()
    return None if step is None else self.step_path(step)

  def best_path(self) -> str | None:
    step = self.best.best_step()
    return None if step is None else self.run_dir.best_checkpoint(step)

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, str] | None:
    """(state, meta, path) of the newest readable checkpoint, or None when there is none.

    A damaged newest checkpoint is moved to `corrupt/` with a warning line and the previous one
    restores; one that belongs to another model/config raises CheckpointError.
    """
    newest = self.latest_path()
    for step in reversed(self.steps()):
      path = self.step_path(step)
      try:
        state, meta = restore(path, abstract_state)
        return state, meta, path
      except CorruptCheckpointError as e:
        if len(self.steps()) == 1:
          raise errors.CheckpointError(
            f"{e}; no earlier checkpoint in {newest and os.path.dirname(newest)} restores: "
            f"move the workdir aside to start fresh"
          ) from e
        moved = self.quarantine(step)
        print(
          f"warning: {e}; moved it to {moved} and resuming from the previous checkpoint",
          file=sys.stderr,
          flush=True,
        )
    return None

  def quarantine(self, step: int) -> str:
    """Moves a damaged checkpoint out of `checkpoints/` (kept for inspection, never resumed)."""
    self.close()
    target = self.run_dir.corrupt(step)
    if os.path.exists(target):
      shutil.rmtree(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(self.step_path(step), target)
    self._open()
    return target

  def close(self) -> None:
    self.last.close()
    self.best.close()


class CorruptCheckpointError(errors.CheckpointError):
  """A checkpoint's files are truncated, damaged or missing (as opposed to another config's)."""


def _leaf_signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in leaves)


def _describe(signature: list[tuple[tuple[int, ...], str]]) -> str:
  count = sum(int(np.prod(shape)) for shape, _ in signature)
  return f"{len(signature)} arrays, {count:,} values"


def check_compatible(path: str, abstract_state: Any) -> None:
  """Raises CheckpointError when the checkpoint's arrays differ from this config's train state."""
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path) / "state")
  except Exception as e:
    raise CorruptCheckpointError(
      f"checkpoint {path} is damaged (its metadata cannot be read: {_one_line(e)})"
    ) from e
  saved, wanted = _leaf_signature(metadata), _leaf_signature(abstract_state)
  if saved != wanted:
    raise errors.CheckpointError(
      f"checkpoint {path} belongs to another model or config ({_describe(saved)}; this config's "
      f"train state has {_describe(wanted)}); use the config it was trained with, or another "
      "--workdir"
    )


def restore(path: str, abstract_state: Any) -> tuple[Any, dict]:
  """Restores (state, meta) from one checkpoint folder into the structure of `abstract_state`.

  A missing or damaged checkpoint raises CorruptCheckpointError, one of another model/config
  CheckpointError; both name the path.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "state")):
    raise errors.CheckpointError(
      f"checkpoint {path} has no 'state' folder; pass a step folder such as "
      f"<workdir>/{workdir_lib.LAST_DIR}/<step>"
    )
  check_compatible(path, abstract_state)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = checkpointer.restore(
      path,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
  except Exception as e:  # orbax raises many types; the structure matched, so the files are bad
    raise CorruptCheckpointError(
      f"checkpoint {path} is damaged (truncated or unreadable files: {_one_line(e)})"
    ) from e
  finally:
    checkpointer.close()
  return restored["state"], restored["meta"]


def abstract_like(state: Any) -> Any:
  """Shape, dtype and sharding of every leaf, as restore targets."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
