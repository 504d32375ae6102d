"""Checkpointer safety: keep-last-N and best, corrupt -> clear error and fallback, another config's
checkpoint refused, a failed save (file too large / disk full) leaves earlier checkpoints intact."""

import os
import resource
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsam import checkpoint as ckpt_lib
from jaxsam import errors
from jaxsam import workdir as workdir_lib


def _state(value: float, size: int = 64):
  return {
    "params": {"w": jnp.full((size,), value, jnp.float32)},
    "step": jnp.asarray(int(value), jnp.int32),
  }


def _abstract(size: int = 64):
  return ckpt_lib.abstract_like(_state(0.0, size))


def _largest_file(folder: str) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _saved(workdir, steps, size=64, best=None):
  c = ckpt_lib.Checkpointer(str(workdir), keep=2)
  for step in steps:
    c.save(
      step,
      _state(float(step), size),
      {"epoch": step},
      best_metrics=None if best is None else {"test/accuracy": best[step]},
    )
  return c


def test_keeps_last_n_and_best(tmp_path):
  c = _saved(tmp_path, [1, 2, 3, 4], best={1: 0.5, 2: 0.9, 3: 0.7, 4: 0.8})
  assert c.steps() == [3, 4]
  assert c.best_path() == os.path.join(str(tmp_path), workdir_lib.BEST_DIR, "2")
  state, meta = ckpt_lib.restore(c.best_path(), _abstract())
  assert meta == {"epoch": 2} and float(state["params"]["w"][0]) == 2.0
  state, meta, path = c.restore_latest(_abstract())
  assert path.endswith(os.path.join(workdir_lib.LAST_DIR, "4")) and int(state["step"]) == 4
  c.close()


def test_truncated_latest_errors_clearly_and_previous_restores(tmp_path, capsys):
  c = _saved(tmp_path, [1, 2], size=4096)
  latest = c.latest_path()
  victim = _largest_file(os.path.join(latest, "state"))
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as e:
    ckpt_lib.restore(latest, _abstract(4096))
  message = str(e.value)
  assert "\n" not in message and latest in message and "is damaged" in message
  assert isinstance(e.value, errors.UserError)
  # Resuming warns in one line, moves the damaged one aside and restores the previous one.
  state, meta, path = c.restore_latest(_abstract(4096))
  assert path == c.step_path(1) and meta == {"epoch": 1}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full(4096, 1.0, np.float32))
  warning = capsys.readouterr().err.strip().splitlines()
  assert (
    len(warning) == 1 and warning[0].startswith("warning: checkpoint ") and latest in warning[0]
  )
  assert c.steps() == [1]
  assert os.path.isdir(os.path.join(str(tmp_path), workdir_lib.CORRUPT_DIR, "2", "state"))
  # The next save of that step works (the damaged folder no longer blocks it).
  c.save(2, _state(2.0, 4096), {"epoch": 2})
  assert c.restore_latest(_abstract(4096))[1] == {"epoch": 2}
  c.close()


def test_only_checkpoint_corrupt_is_an_error(tmp_path):
  c = _saved(tmp_path, [1], size=4096)
  os.remove(os.path.join(c.latest_path(), "meta", "metadata"))
  with pytest.raises(errors.CheckpointError, match=r"checkpoint .*/1 is damaged.*no earlier"):
    c.restore_latest(_abstract(4096))
  c.close()


def test_another_configs_checkpoint_is_refused_not_skipped(tmp_path):
  c = _saved(tmp_path, [1, 2])
  with pytest.raises(errors.CheckpointError) as e:
    c.restore_latest(_abstract(size=128))
  assert not isinstance(e.value, ckpt_lib.CorruptCheckpointError)
  assert (
    "belongs to another model or config (2 arrays, 65 values; this config's train state "
    "has 2 arrays, 129 values)" in str(e.value)
  )
  assert c.steps() == [1, 2]  # nothing moved aside
  with pytest.raises(errors.CheckpointError, match="has no 'state' folder"):
    ckpt_lib.restore(str(tmp_path), _abstract())
  c.close()


def test_interrupted_save_leftover_is_ignored_and_cleaned(tmp_path):
  c = _saved(tmp_path, [1])
  c.close()
  # What a kill during orbax's save of step 2 leaves: a temporary folder, never renamed into place.
  leftover = os.path.join(str(tmp_path), workdir_lib.LAST_DIR, "2.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(leftover, "state"))
  with open(os.path.join(leftover, "state", "partial"), "wb") as f:
    f.write(b"\0" * 100)
  c = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  assert c.steps() == [1]
  assert c.restore_latest(_abstract())[1] == {"epoch": 1}
  c.save(2, _state(2.0), {"epoch": 2})  # the interrupted step saves normally on the rerun
  c.close()  # orbax removes the leftover in the background; closing waits for it
  assert not os.path.exists(leftover)
  assert ckpt_lib.Checkpointer(str(tmp_path), keep=2).restore_latest(_abstract())[1] == {"epoch": 2}


def test_failed_save_raises_and_keeps_earlier_checkpoints(tmp_path):
  """A real write failure: RLIMIT_FSIZE makes the kernel refuse the large array file (EFBIG),
  as a full disk refuses it with ENOSPC."""
  size = 1 << 18  # 1 MiB of float32
  c = _saved(tmp_path, [1], size=size)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
  try:
    with pytest.raises(errors.CheckpointError) as e:
      noise = jax.random.uniform(jax.random.PRNGKey(0), (size,))  # incompressible
      c.save(2, {"params": {"w": noise}, "step": jnp.asarray(2, jnp.int32)}, {"epoch": 2})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)
  message = str(e.value)
  assert "\n" not in message and "saving checkpoint step 2" in message
  assert "earlier checkpoints are intact" in message
  c.close()
  c = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  assert c.steps() == [1]
  state, meta, _ = c.restore_latest(_abstract(size))
  assert meta == {"epoch": 1} and float(jax.device_get(state["params"]["w"]).sum()) == size
  c.close()
