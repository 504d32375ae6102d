"""One writer per run folder: the lock, its refusals (launch, eval, analyze) and its death with
its holder, on real processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxsam import errors
from jaxsam import workdir as workdir_lib
from support import devices
from support.paths import ROOT
from support.runs import failure

ENV = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=devices.xla_flags(2))
HOLD = (
  "import sys, time\n"
  "from jaxsam import workdir\n"
  "workdir.RunLock(sys.argv[1], 'a test holder').acquire()\n"
  "print('held', flush=True)\n"
  "time.sleep(600)\n"
)


@pytest.fixture
def holder(tmp_path):
  """A live process (not this one) holding `tmp_path/run`'s lock; killed -9 at the end."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(workdir)], env=ENV, stdout=subprocess.PIPE, text=True
  )
  assert proc.stdout.readline().strip() == "held"
  yield workdir, proc
  proc.kill()
  proc.wait()


def listing(path):
  return {
    os.path.relpath(os.path.join(d, f), path): os.stat(os.path.join(d, f)).st_mtime_ns
    for d, _, files in os.walk(path)
    for f in files
  }


def test_a_held_folder_is_refused_naming_the_holder_and_nothing_is_written(holder):
  workdir, proc = holder
  before = listing(workdir)
  with pytest.raises(workdir_lib.WorkdirInUseError) as info:
    workdir_lib.check_not_held(str(workdir))
  with pytest.raises(workdir_lib.WorkdirInUseError) as info2:
    workdir_lib.RunLock(str(workdir), "a second writer").acquire()
  for message in (str(info.value), str(info2.value)):
    assert "\n" not in message and isinstance(info.value, errors.UserError)
    assert f"pid {proc.pid}" in message and f"host {socket.gethostname()}" in message
    assert "a test holder" in message and "UTC" in message
  assert listing(workdir) == before


def test_the_lock_dies_with_its_holder_on_kill_9(holder):
  workdir, proc = holder
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  workdir_lib.check_not_held(str(workdir))
  with workdir_lib.RunLock(str(workdir), "the rerun"):
    holder_file = json.loads((workdir / workdir_lib.LOCK_HOLDER_FILE).read_text())
    assert holder_file["pid"] == os.getpid() and holder_file["what"] == "the rerun"
    with pytest.raises(workdir_lib.WorkdirInUseError, match=f"pid {os.getpid()}"):
      workdir_lib.RunLock(str(workdir), "another").acquire()  # another fd of this process
  # Released: the holder file is gone, the lock file stays (removing it could admit two).
  assert sorted(os.listdir(workdir)) == [workdir_lib.LOCK_FILE]
  workdir_lib.RunLock(str(workdir), "again").acquire().release()


def test_a_folder_never_held_is_not_touched_by_the_probe(tmp_path):
  workdir_lib.check_not_held(str(tmp_path / "absent"))
  assert not os.path.exists(tmp_path / "absent")
  (tmp_path / "old").mkdir()
  workdir_lib.check_not_held(str(tmp_path / "old"))
  assert os.listdir(tmp_path / "old") == []


def test_eval_and_analyze_refuse_a_held_folder(holder):
  """In process: both check the config, then the lock, before they read a checkpoint."""
  from configs import quickstart
  from jaxsam import analyze, evaluate

  workdir, proc = holder
  (workdir / workdir_lib.CONFIG_FILE).write_text(
    workdir_lib.config_to_json(quickstart.get_config())
  )
  before = listing(workdir)
  with pytest.raises(workdir_lib.WorkdirInUseError, match=f"pid {proc.pid}"):
    evaluate.evaluate_checkpoint(None, str(workdir))
  with pytest.raises(workdir_lib.WorkdirInUseError, match=f"pid {proc.pid}"):
    analyze.analyze(str(workdir))
  assert listing(workdir) == before


def launch(workdir, *extra):
  return [
    sys.executable,
    os.path.join(ROOT, "launch.py"),
    "--config=configs/quickstart.py",
    f"--workdir={workdir}",
    "--config.progress_bar=False",
    "--config.wandb.mode=disabled",
    "--config.augment.randaugment.num_ops=0",
    *extra,
  ]


def check_consistent(workdir, total_steps):
  """metrics.jsonl holds each step once, in order, to the last checkpoint's step."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r["step"] for r in records if "train/loss" in r]
  tests = [r["step"] for r in records if "test/accuracy" in r]
  assert train == sorted(set(train)) and tests == sorted(set(tests))
  assert train[-1] == tests[-1] == total_steps
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert steps[-1] == total_steps
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["completed"] and summary["steps"] == total_steps


@pytest.mark.slow
def test_two_concurrent_launches_one_refused_the_other_complete(tmp_path):
  """The same command twice into one --workdir, 3 s apart: exactly one exits 2 naming the other
  (host and pid) and the other's log and checkpoints are whole."""
  workdir = tmp_path / "run"
  args = launch(workdir, "--config.num_epochs=4", "--config.checkpoint_every_epochs=2")
  first = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  time.sleep(3)
  second = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  outs = {}
  for p in (first, second):
    out, err = p.communicate(timeout=900)
    outs[p.pid] = (p.returncode, out.decode(), err.decode())
  codes = sorted(code for code, _, _ in outs.values())
  assert codes == [0, 2], {pid: (c, err[-2000:]) for pid, (c, _, err) in outs.items()}
  (winner,) = [pid for pid, (code, _, _) in outs.items() if code == 0]
  (loser,) = [pid for pid, (code, _, _) in outs.items() if code == 2]
  err = outs[loser][2].strip()
  line = err.splitlines()[-1]  # TF/absl may print start-up noise before it
  assert "Traceback" not in err and line.startswith("error: --workdir=")
  assert f"pid {winner}" in line and f"host {socket.gethostname()}" in line
  assert "jaxsam: done" in outs[winner][1]
  check_consistent(workdir, 4 * 22)  # 1,437 train digits // 64 = 22 steps per epoch


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes(tmp_path):
  workdir = tmp_path / "run"
  args = launch(workdir, "--config.num_epochs=4", "--config.checkpoint_every_epochs=1")
  proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while not (workdir / "checkpoints").is_dir() or not any(
    n.isdigit() for n in os.listdir(workdir / "checkpoints")
  ):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
  assert (workdir / workdir_lib.LOCK_HOLDER_FILE).exists()  # left behind by the killed holder
  rerun = subprocess.run(
    args, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
  )
  assert rerun.returncode == 0, failure(rerun)
  assert "resuming at step" in rerun.stdout
  check_consistent(workdir, 4 * 22)
  assert not (workdir / workdir_lib.LOCK_HOLDER_FILE).exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "analyze"])
def test_eval_and_analyze_processes_exit_2_on_a_held_folder(holder, mode):
  from configs import quickstart

  workdir, proc = holder
  (workdir / workdir_lib.CONFIG_FILE).write_text(
    workdir_lib.config_to_json(quickstart.get_config())
  )
  before = listing(workdir)
  argv = (
    [os.path.join(ROOT, "launch.py"), "--mode=eval", f"--workdir={workdir}"]
    if mode == "eval"
    else ["-m", "jaxsam.analyze", f"--workdir={workdir}"]
  )
  result = subprocess.run(
    [sys.executable, *argv],
    check=False,
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert "Traceback" not in result.stderr and line.startswith("error: --workdir=")
  assert f"pid {proc.pid}" in line and "in use by a test holder" in line
  assert listing(workdir) == before
