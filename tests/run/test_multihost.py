"""Multi-process training on one machine: 2 CPU processes (gloo) against 1 process with 2 devices.

The runs are real `launch.py` subprocesses on the quickstart config at tiny settings. The 2-process
run is preempted (SIGTERM to process 1 only: all processes must agree to save the same step) and
restarted; its end must equal the uninterrupted 1-process run with the same global batch.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxsam import distributed
from support.devices import xla_flags
from support.paths import ROOT

REPO = pathlib.Path(ROOT)
LAUNCH = str(REPO / "launch.py")
STEPS = 60  # < 89 steps per epoch at batch 16: one epoch-end (eval + checkpoint) at the last step
TINY = [
  f"--config={REPO / 'configs' / 'quickstart.py'}",
  "--config.model.image_size=8",
  "--config.batch_size=16",
  "--config.eval_batch_size=32",
  "--config.progress_bar=false",
  "--config.log_every_steps=2",
  f"--config.max_steps={STEPS}",
  # Plain SGD, no RandAugment: this file tests the process plumbing; SAM over devices is
  # checked against per-shard references in test_steps.py and test_sam.py.
  "--config.sam.rho=0.0",
  "--config.augment.randaugment.num_ops=0",
]
TIMEOUT = 400  # a hung run fails the test instead of blocking CI


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices: int) -> dict:
  """CPU only, `devices` devices per process, no SLURM variables leaking in from a CI job."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(
    XLA_FLAGS=xla_flags(devices),
    JAX_PLATFORMS="cpu",
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="2",
    WANDB_MODE="disabled",
    PYTHONUNBUFFERED="1",
  )
  return env


_STARTED = []  # every subprocess, so that a failing test leaves none behind


@pytest.fixture(autouse=True, scope="module")
def _kill_leftovers():
  yield
  for popen in _STARTED:
    if popen.poll() is None:
      popen.kill()
      popen.wait()


class Proc:
  """A launch.py subprocess with its output in files (pipes could fill and block it)."""

  def __init__(self, folder: pathlib.Path, name: str, args: list[str], devices: int):
    self.cwd = folder / f"cwd-{name}"  # each process's own working directory: must stay empty
    self.cwd.mkdir(parents=True, exist_ok=True)
    self.out_path, self.err_path = folder / f"{name}.out", folder / f"{name}.err"
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.popen = subprocess.Popen(
        [sys.executable, LAUNCH, *args],
        cwd=self.cwd,
        env=child_env(devices),
        stdout=out,
        stderr=err,
      )
    _STARTED.append(self.popen)

  def wait(self, timeout: float = TIMEOUT) -> int:
    try:
      return self.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      for popen in _STARTED:  # its peers would wait for it in their next collective
        popen.kill()
      raise

  @property
  def out(self) -> str:
    return self.out_path.read_text()

  @property
  def err(self) -> str:
    return self.err_path.read_text()


def start_processes(folder, name, args, *, num, devices, counts=None) -> list[Proc]:
  port = free_port()
  counts = counts or [num] * num
  return [
    Proc(
      folder,
      f"{name}{p}",
      [
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={counts[p]}",
        f"--process_id={p}",
        "--distributed_timeout_s=120",
      ],
      devices,
    )
    for p in range(num)
  ]


def read_records(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def load_state(step_dir) -> dict:
  """A saved train state as numpy, whatever devices saved it."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(str(step_dir / "state")).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(str(step_dir / "state"), restore_args=args)


def one_error_line(proc: Proc) -> str:
  """The run's single `error:` line; asserts there is no traceback."""
  assert "Traceback" not in proc.err, proc.err[-3000:]
  lines = [l for l in proc.err.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, proc.err[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Baseline (1 process x 2 devices) and, concurrently, 2 processes x 1 device preempted after
  a few logged steps, then restarted to the end."""
  folder = tmp_path_factory.mktemp("multihost")
  single_dir, multi_dir = folder / "single", folder / "multi"
  single = Proc(folder, "single", [*TINY, f"--workdir={single_dir}"], devices=2)
  first = start_processes(folder, "first", [*TINY, f"--workdir={multi_dir}"], num=2, devices=1)
  deadline = time.time() + TIMEOUT
  while len(read_records(multi_dir)) < 2 and time.time() < deadline:
    if any(p.popen.poll() is not None for p in first):
      break
    time.sleep(0.05)
  first[1].popen.send_signal(signal.SIGTERM)  # like a scheduler preempting one host
  first_rc = [p.wait() for p in first]
  checkpoints = sorted(
    int(d.name) for d in (multi_dir / "checkpoints").iterdir() if d.name.isdigit()
  )
  second = start_processes(folder, "second", [*TINY, f"--workdir={multi_dir}"], num=2, devices=1)
  return {
    "single": single,
    "single_rc": single.wait(),
    "single_dir": single_dir,
    "first": first,
    "first_rc": first_rc,
    "checkpoints_after_first": checkpoints,
    "second": second,
    "second_rc": [p.wait() for p in second],
    "multi_dir": multi_dir,
  }


@pytest.mark.slow
def test_preempted_two_process_run_saves_one_step_and_resumes(runs):
  assert runs["first_rc"] == [0, 0], runs["first"][0].err[-3000:] + runs["first"][1].err[-3000:]
  saved = runs["checkpoints_after_first"]
  assert len(saved) == 1 and 0 < saved[0] < STEPS, saved  # stopped early, one agreed step
  preempted_at = saved[0]
  assert preempted_at % 2 == 0  # processes agree at log steps (log_every_steps=2) only
  assert f"preempted at step {preempted_at}" in runs["first"][0].out
  assert runs["second_rc"] == [0, 0], runs["second"][0].err[-3000:]
  assert f"resuming at step {preempted_at}" in runs["second"][0].out
  summary = json.loads((runs["multi_dir"] / "summary.json").read_text())
  assert summary["completed"] and summary["num_processes"] == 2 and summary["steps"] == STEPS


@pytest.mark.slow
def test_two_processes_end_like_one_process_with_the_same_global_batch(runs):
  assert runs["single_rc"] == 0, runs["single"].err[-3000:]
  single = load_state(runs["single_dir"] / "checkpoints" / str(STEPS))
  multi = load_state(runs["multi_dir"] / "checkpoints" / str(STEPS))
  for part in ("params", "batch_stats", "opt_state", "step"):
    # NaN-equal: SAM's diagnostics are NaN while rho = 0.
    for a, b in zip(jax.tree.leaves(single[part]), jax.tree.leaves(multi[part]), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=part)
  timing = {"images_per_sec", "time/input_wait_ms"}
  records = [
    {k: v for k, v in r.items() if k not in timing} for r in read_records(runs["multi_dir"])
  ]
  expected = [
    {k: v for k, v in r.items() if k not in timing} for r in read_records(runs["single_dir"])
  ]
  assert len(records) == len(expected) == STEPS // 2 + 1  # every log step once, plus the eval
  for got, want in zip(records, expected):
    assert got.keys() == want.keys()
    for k in want:
      if isinstance(want[k], float):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
      else:
        assert got[k] == want[k], k


@pytest.mark.slow
def test_only_process_zero_writes(runs):
  for proc in [runs["first"][1], runs["second"][1]]:
    assert "jaxsam:" not in proc.out  # no console lines, no progress
    assert not any(proc.cwd.iterdir())
  steps = [r["step"] for r in read_records(runs["multi_dir"]) if "train/loss" in r]
  assert steps == list(range(2, STEPS + 1, 2))  # one writer: no duplicated records
  names = lambda folder: {p.name for p in folder.iterdir()}
  assert names(runs["multi_dir"]) == names(runs["single_dir"])  # no per-process extras


# --- Bad input: one line on stderr, non-zero exit, bounded time. ----------------------------------


@pytest.mark.slow
def test_each_process_traces_into_its_own_profile_folder(tmp_path):
  workdir = tmp_path / "w"
  args = [*TINY, "--config.max_steps=6", "--profile_steps=2:4", f"--workdir={workdir}"]
  procs = start_processes(tmp_path, "profile", args, num=2, devices=1)
  assert [p.wait() for p in procs] == [0, 0], procs[1].err[-3000:]
  assert sorted(os.listdir(workdir / "profile")) == ["process_0", "process_1"]
  for process in ("process_0", "process_1"):
    traces = [f.name for f in (workdir / "profile" / process / "plugins" / "profile").glob("*/*")]
    assert any(t.endswith(".xplane.pb") for t in traces), (process, traces)
    assert any(t.endswith("perfetto_trace.json.gz") for t in traces), (process, traces)


@pytest.mark.slow
def test_process_id_out_of_range_fails_before_any_network(tmp_path):
  proc = Proc(
    tmp_path,
    "bad",
    [*TINY, "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
    devices=1,
  )
  assert proc.wait(60) == 2
  assert "--process_id=2 must be in [0, 1]" in one_error_line(proc)


@pytest.mark.slow
def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
  start = time.time()
  proc = Proc(
    tmp_path,
    "lost",
    [
      *TINY,
      f"--coordinator_address=127.0.0.1:{free_port()}",
      "--num_processes=2",
      "--process_id=1",
      "--distributed_timeout_s=3",
    ],
    devices=1,
  )
  assert proc.wait(90) == 2
  assert "unreachable after 3s" in one_error_line(proc)
  assert time.time() - start < 60  # startup plus the 3 s wait, not a hang


@pytest.mark.slow
def test_processes_started_with_different_counts_all_fail(tmp_path):
  procs = start_processes(
    tmp_path, "mismatch", [*TINY, f"--workdir={tmp_path / 'w'}"], num=2, devices=1, counts=[2, 3]
  )
  assert [p.wait(120) for p in procs] == [2, 2]
  for p in procs:
    assert "process 1 was started with --num_processes=3" in one_error_line(p)


@pytest.mark.slow
def test_global_batch_not_divisible_by_all_devices(tmp_path):
  # 2 processes x 2 devices: 6 splits over one process's devices but not over all 4.
  procs = start_processes(
    tmp_path,
    "batch",
    [*TINY, "--config.batch_size=6", f"--workdir={tmp_path / 'w'}"],
    num=2,
    devices=2,
  )
  assert [p.wait(180) for p in procs] == [2, 2]
  for p in procs:
    assert "batch_size=6 is invalid; accepted: a multiple of the device count 4" in one_error_line(
      p
    )


# --- Process layout resolution (pure). ------------------------------------------------------------


SLURM = {
  "SLURM_JOB_ID": "4321",
  "SLURM_NTASKS": "8",
  "SLURM_PROCID": "5",
  "SLURM_LOCALID": "1",
  "SLURM_STEP_NODELIST": "gpu[07-08]",
  "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
}


def test_resolve_from_flags_and_single_process():
  assert distributed.resolve() is None
  assert distributed.resolve(env={}) is None
  spec = distributed.resolve("10.0.0.1:1234", 2, 1)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("10.0.0.1:1234", 2, 1)


def test_resolve_from_slurm_leaves_the_address_to_jax():
  spec = distributed.resolve(env=SLURM)
  assert spec.coordinator_address is None  # jax.distributed.initialize's SLURM detection finds it
  assert (spec.num_processes, spec.process_id, spec.local_device_ids) == (8, 5, (1,))
  one_per_node = {
    **SLURM,
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
  }
  assert distributed.resolve(env=one_per_node).local_device_ids is None  # all local GPUs
  bound = {**SLURM, "CUDA_VISIBLE_DEVICES": "3"}  # --gpus-per-task: SLURM bound one GPU already
  assert distributed.resolve(env=bound).local_device_ids is None
  assert distributed.resolve(env={**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
  assert distributed.resolve("h:99", env=SLURM).coordinator_address == "h:99"


@pytest.mark.parametrize(
  "node_list, first",
  [("node001", "node001"), ("a,b", "a"), ("n[003-005,9],m1", "n003"), ("gpu[1,7-9]", "gpu1")],
)
def test_jax_slurm_detection_picks_the_first_host_and_the_job_port(monkeypatch, node_list, first):
  from jax._src.clusters import SlurmCluster

  for key, value in {**SLURM, "SLURM_STEP_NODELIST": node_list}.items():
    monkeypatch.setenv(key, value)
  assert SlurmCluster.is_env_present()
  assert SlurmCluster.get_coordinator_address(None, None) == f"{first}:{4321 % 4096 + 61440}"


@pytest.mark.parametrize(
  "args, env, message",
  [
    (("h:1", 2, 2), None, "--process_id=2 must be in [0, 1]"),
    (("h:1", 0, 0), None, "--num_processes=0 must be >= 1"),
    (("h:1", None, 1), None, "needs --num_processes too"),
    ((None, 2, None), None, "needs --coordinator_address and --process_id too"),
    (("h", 2, 0), None, "is not host:port"),
    (("h:99999", 2, 0), None, "is not host:port"),
    ((None, 4, None), SLURM, "--num_processes=4 does not match SLURM_NTASKS=8"),
    ((None, None, 0), SLURM, "--process_id=0 does not match SLURM_PROCID=5"),
  ],
)
def test_resolve_rejects_inconsistent_input(args, env, message):
  with pytest.raises(distributed.DistributedError, match="^.*$") as e:
    distributed.resolve(*args, env=env)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_check_claims():
  spec = distributed.ProcessSpec("h:1", 2, 0)
  distributed.check_claims(spec, np.array([[2, 0], [2, 1]]), 2, 0)
  with pytest.raises(
    distributed.DistributedError,
    match="process 1 was started with --num_processes=3 --process_id=1",
  ):
    distributed.check_claims(spec, np.array([[2, 0], [3, 1]]), 2, 0)
  with pytest.raises(distributed.DistributedError, match="numbered this process 1"):
    distributed.check_claims(spec, np.array([[2, 0], [2, 1]]), 2, 1)
