"""Preemption and exact resume, end to end through `launch.py` subprocesses on a tiny config.

One uninterrupted run (A) and one run (B) that is killed with SIGKILL mid-epoch, rerun, stopped with
SIGTERM mid-epoch, and rerun to the end: B's final train state and metrics.jsonl (all but the
TIME_KEYS) must equal A's bit for bit on CPU. Both use LookSAM with a SAM step every 3rd step
(11 steps per epoch, so every resume lands mid-period) and RandAugment, so the host-side SAM
schedule, LookSAM's stored direction, the step RNG and the per-example augmentation seeds all
take part; wandb logs offline.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxsam import workdir as workdir_lib
from jaxsam import writers
from support.paths import ROOT
from support.runs import launch_env, load_state, without_time

pytestmark = pytest.mark.slow  # four launch.py runs

STEPS_PER_EPOCH = 11  # 1,437 digits // 128
NUM_EPOCHS = 3
TOTAL = STEPS_PER_EPOCH * NUM_EPOCHS
TINY = [
  "--config=configs/quickstart.py",
  f"--config.num_epochs={NUM_EPOCHS}",
  "--config.model.image_size=8",
  "--config.model.width=4",
  "--config.batch_size=128",
  "--config.eval_batch_size=128",
  "--config.sam.rho=0.05",
  "--config.sam.variant=looksam",
  "--config.sam.every=3",
  "--config.augment.randaugment.num_ops=1",
  "--config.log_every_steps=1",
  "--config.checkpoint_every_epochs=1",
  "--config.checkpoint_keep=2",
  "--config.progress_bar=false",
  "--config.wandb.mode=offline",
]


def _launch(workdir: str, tmp: str, log: str) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "launch.py", f"--workdir={workdir}", *TINY],
    cwd=ROOT,
    env=launch_env(tmp),
    stdout=open(log, "w"),
    stderr=subprocess.STDOUT,
  )


def _interrupt_mid_epoch(proc: subprocess.Popen, workdir: str, after_step: int, sig: int) -> int:
  """Sends `sig` once a train record past `after_step` that is not an epoch end is logged, with a
  checkpoint on disk; returns that step. Waits up to 10 minutes (a loaded CI machine)."""
  metrics = workdir_lib.RunDir(workdir).metrics
  deadline = time.time() + 600
  while time.time() < deadline:
    assert proc.poll() is None, f"run ended (rc {proc.returncode}) before it could be interrupted"
    steps = [r["step"] for r in writers.read_metrics(metrics) if "train/loss" in r]
    has_checkpoint = os.path.isdir(os.path.join(workdir, workdir_lib.LAST_DIR)) and any(
      n.isdigit() for n in os.listdir(os.path.join(workdir, workdir_lib.LAST_DIR))
    )
    if steps and steps[-1] > after_step and steps[-1] % STEPS_PER_EPOCH and has_checkpoint:
      proc.send_signal(sig)
      return steps[-1]
    time.sleep(0.005)
  raise AssertionError("no mid-epoch step logged in time")


def _output(log: str) -> str:
  with open(log) as f:
    return f.read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("resume"))
  a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
  logs = {k: os.path.join(tmp, f"{k}.log") for k in ("a", "b1", "b2", "b3")}
  run_a = _launch(a, tmp, logs["a"])  # runs alongside the B chain
  b1 = _launch(b, tmp, logs["b1"])
  killed_at = _interrupt_mid_epoch(b1, b, STEPS_PER_EPOCH, signal.SIGKILL)
  assert b1.wait(timeout=60) == -signal.SIGKILL
  info = {
    "killed_at": killed_at,
    "wandb_ids": [writers.read_wandb_run_id(workdir_lib.RunDir(b).wandb_id)],
  }
  info["checkpoints_after_kill"] = sorted(
    int(n) for n in os.listdir(os.path.join(b, workdir_lib.LAST_DIR)) if n.isdigit()
  )
  b2 = _launch(b, tmp, logs["b2"])
  info["sigterm_at"] = _interrupt_mid_epoch(b2, b, killed_at, signal.SIGTERM)
  info["b2_rc"] = b2.wait(timeout=300)
  info["checkpoints_after_sigterm"] = sorted(
    int(n) for n in os.listdir(os.path.join(b, workdir_lib.LAST_DIR)) if n.isdigit()
  )
  info["wandb_ids"].append(writers.read_wandb_run_id(workdir_lib.RunDir(b).wandb_id))
  b3 = _launch(b, tmp, logs["b3"])
  assert b3.wait(timeout=600) == 0, _output(logs["b3"])[-3000:]
  assert run_a.wait(timeout=600) == 0, _output(logs["a"])[-3000:]
  info["wandb_ids"].append(writers.read_wandb_run_id(workdir_lib.RunDir(b).wandb_id))
  return {"a": a, "b": b, "logs": {k: _output(v) for k, v in logs.items()}, **info}


def test_kill9_and_sigterm_resume_equals_uninterrupted(runs):
  a_state = load_state(os.path.join(runs["a"], workdir_lib.LAST_DIR, str(TOTAL)))
  b_state = load_state(os.path.join(runs["b"], workdir_lib.LAST_DIR, str(TOTAL)))
  flat_a = jax.tree_util.tree_flatten_with_path(a_state)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b_state)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b] and len(flat_a) > 50
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path), strict=True)
  assert int(a_state["step"]) == TOTAL
  a_metrics = writers.read_metrics(workdir_lib.RunDir(runs["a"]).metrics)
  b_metrics = writers.read_metrics(workdir_lib.RunDir(runs["b"]).metrics)
  assert len(a_metrics) == TOTAL + NUM_EPOCHS  # a train record per step, an eval per epoch
  assert without_time(b_metrics) == without_time(a_metrics)
  with open(os.path.join(runs["a"], workdir_lib.SUMMARY_FILE)) as f:
    a_summary = json.load(f)
  with open(os.path.join(runs["b"], workdir_lib.SUMMARY_FILE)) as f:
    b_summary = json.load(f)
  for key in (
    "final_test_accuracy",
    "best_test_accuracy",
    "best_epoch",
    "steps",
    "completed",
    "sam_fraction",
  ):
    assert a_summary[key] == b_summary[key], key
  assert a_summary["completed"] and a_summary["steps"] == TOTAL
  assert a_summary["sam_fraction"] == pytest.approx(11 / TOTAL)  # steps 0, 3, ..., 30


def test_kill9_mid_epoch_loses_only_steps_after_the_checkpoint(runs):
  killed_at = runs["killed_at"]
  assert killed_at % STEPS_PER_EPOCH and killed_at > STEPS_PER_EPOCH
  last = max(runs["checkpoints_after_kill"])
  assert last < killed_at and last % STEPS_PER_EPOCH == 0
  assert f"resuming at step {last}" in runs["logs"]["b2"]


def test_sigterm_saves_exits_zero_and_rerun_continues(runs):
  step = runs["sigterm_at"]
  assert runs["b2_rc"] == 0, runs["logs"]["b2"][-3000:]
  # The handler lets the current step finish, so the save is at the step logged or one later.
  saved = max(runs["checkpoints_after_sigterm"])
  assert saved in (step, step + 1) and saved % STEPS_PER_EPOCH
  assert f"jaxsam: preempted at step {saved}; checkpoint saved" in runs["logs"]["b2"]
  assert f"resuming at step {saved}" in runs["logs"]["b3"]
  assert "Traceback" not in runs["logs"]["b2"] + runs["logs"]["b3"]


def test_resumed_runs_continue_one_wandb_run(runs):
  ids = runs["wandb_ids"]
  assert ids[0] and ids == [ids[0]] * 3
  offline = [d for d in os.listdir(os.path.join(runs["b"], "wandb")) if d.startswith("offline-run")]
  assert len(offline) == 3 and all(d.endswith(ids[0]) for d in offline)


def test_curves_png_written(runs):
  from PIL import Image

  with Image.open(os.path.join(runs["a"], "curves.png")) as image:
    assert image.format == "PNG" and image.size[0] > 500
