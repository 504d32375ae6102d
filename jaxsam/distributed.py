"""Multi-process start-up: who the processes are, and `jax.distributed` initialised from that.

A run spans several processes (one per host, or one per GPU) when launched under SLURM or given
`--coordinator_address`, `--num_processes` and `--process_id`. This is the one module that reads
the environment, and only when `launch.py` asks it to (`resolve(..., env=os.environ)`). Everything
after `initialize` is plain JAX: one global mesh over all processes' devices (see jaxsam.parallel).

Under SLURM, `jax.distributed.initialize` finds the coordinator itself (its cluster detection:
the step's first node, a port from the job id). What stays here is what JAX lacks:
- flags checked against SLURM's task count and rank before any network traffic (a contradiction
  would hang the job waiting for processes that never come), with one-line errors;
- a bounded wait for the coordinator, and JAX's rendezvous errors as one line;
- the cross-process check after start-up (every process told the same count, distinct ids);
- the local devices: JAX gives each SLURM task the GPU at its local rank, which is right for
  `--ntasks-per-node=G` only; one task per node takes every GPU, a GPU bound by SLURM stays bound.
"""

import dataclasses
import errno
import socket
import time
from collections.abc import Mapping

import jax
import numpy as np

from jaxsam import errors

DEFAULT_TIMEOUT_S = 300
# The SLURM variables that must all be present for a run to count as a SLURM job step.
_SLURM_REQUIRED = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)


class DistributedError(errors.UserError):
  """The processes of a multi-process run are inconsistent or cannot reach each other."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """Where this process sits in a multi-process run (what `jax.distributed.initialize` needs)."""

  coordinator_address: str | None  # host:port of process 0's service; None: JAX finds it
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None = None  # None: every local accelerator
  source: str = "flags"  # flags | slurm (for messages)


def parse_address(address: str) -> tuple[str, int]:
  """'host:port' (or '[v6]:port') -> (host, port); a malformed address is a DistributedError."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(
      f"--coordinator_address={address!r} is not host:port (e.g. 10.0.0.1:12345)"
    )
  return host.strip("[]"), int(port)


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
  """Tasks this job step runs per node; SLURM_STEP_TASKS_PER_NODE looks like '4(x2)' or '2,1'."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
  return max(int(part.split("(")[0]) for part in spec.split(","))


def slurm_spec(env: Mapping[str, str]) -> ProcessSpec | None:
  """The process layout of a SLURM job step (None outside SLURM or for a single task).

  The coordinator address is left to JAX's SLURM detection (None here). With several tasks on a
  node each task takes the GPU at its local rank; with one task per node, or a GPU SLURM bound
  to the task already (`--gpus-per-task`, then it is local device 0), every local device.
  """
  if not all(k in env for k in _SLURM_REQUIRED):
    return None
  try:
    num, pid, local = (int(env[k]) for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"))
  except ValueError as e:
    raise DistributedError(f"SLURM variables are not integers ({e})") from e
  if num <= 1:
    return None
  visible = env.get("CUDA_VISIBLE_DEVICES", "")
  one_gpu_bound = visible != "" and "," not in visible
  local_ids = (local,) if _slurm_tasks_on_node(env) > 1 and not one_gpu_bound else None
  return ProcessSpec(
    coordinator_address=None,
    num_processes=num,
    process_id=pid,
    local_device_ids=local_ids,
    source="slurm",
  )


def resolve(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  env: Mapping[str, str] | None = None,
) -> ProcessSpec | None:
  """The process layout from explicit flags, completed by SLURM's variables when `env` is given.

  Returns None for a single-process run. Explicit values win over SLURM's, but a count or id that
  contradicts SLURM's is an error (the job would hang waiting for processes that never come).

  >>> resolve("10.0.0.1:1234", 2, 1)
  ProcessSpec(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1, ...)
  """
  slurm = slurm_spec(env) if env is not None else None
  given = {
    "--coordinator_address": coordinator_address,
    "--num_processes": num_processes,
    "--process_id": process_id,
  }
  if slurm is None:
    if all(v is None for v in given.values()):
      return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
      have = ", ".join(f"{k}={v}" for k, v in given.items() if v is not None)
      raise DistributedError(
        f"{have} needs {' and '.join(missing)} too (or run under SLURM, which sets them)"
      )
    spec = ProcessSpec(coordinator_address, num_processes, process_id)
  else:
    for flag, value, slurm_value, var in (
      ("--num_processes", num_processes, slurm.num_processes, "SLURM_NTASKS"),
      ("--process_id", process_id, slurm.process_id, "SLURM_PROCID"),
    ):
      if value is not None and value != slurm_value:
        raise DistributedError(
          f"{flag}={value} does not match {var}={slurm_value}; drop the flag under SLURM"
        )
    spec = dataclasses.replace(
      slurm, coordinator_address=coordinator_address or slurm.coordinator_address
    )
  check(spec)
  return spec


def check(spec: ProcessSpec) -> None:
  """Static consistency: a positive count, an id in [0, count), a host:port address if given."""
  if spec.num_processes < 1:
    raise DistributedError(f"--num_processes={spec.num_processes} must be >= 1")
  if not 0 <= spec.process_id < spec.num_processes:
    raise DistributedError(
      f"--process_id={spec.process_id} must be in [0, {spec.num_processes - 1}] for "
      f"--num_processes={spec.num_processes}"
    )
  if spec.coordinator_address is not None:
    parse_address(spec.coordinator_address)


def _wait_for_coordinator(host: str, port: int, deadline: float) -> bool:
  """Polls a TCP connection to the coordinator until it accepts or the deadline passes."""
  while True:
    try:
      timeout = max(0.1, min(2.0, deadline - time.time()))
      with socket.create_connection((host, port), timeout=timeout):
        return True
    except OSError:
      if time.time() >= deadline:
        return False
      time.sleep(0.2)


def _check_port_free(port: int, spec: ProcessSpec) -> None:
  """Process 0 serves the coordinator: a taken port would otherwise abort deep inside XLA."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise DistributedError(
          f"coordinator port {port} of {spec.coordinator_address} is in use on process 0; "
          "pick another port"
        ) from e
      raise


def _wait_bounded(spec: ProcessSpec, timeout_s: int, deadline: float) -> None:
  """Process 0 checks its port is free; the others wait for it until the deadline."""
  host, port = parse_address(spec.coordinator_address)
  if spec.process_id == 0:
    _check_port_free(port, spec)
  elif not _wait_for_coordinator(host, port, deadline):
    raise DistributedError(
      f"coordinator {spec.coordinator_address} unreachable after {timeout_s}s (process "
      f"{spec.process_id} of {spec.num_processes}); is process 0 running there, the port open?"
    )


def initialize(spec: ProcessSpec | None, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
  """Initialises `jax.distributed` for `spec` (None: single process, nothing to do).

  Must run before anything touches a JAX backend. On CPU, cross-process collectives go through
  gloo. With a known coordinator address, process k > 0 first waits at most `timeout_s` for it
  and raises a one-line DistributedError if it never answers; JAX then bounds the rendezvous of
  all processes by the same timeout (under SLURM that is the only wait: JAX finds the address).

  Args:
    spec: from `resolve`.
    timeout_s: seconds to wait for the coordinator and the other processes (> 0).
  """
  if spec is None:
    return
  if timeout_s <= 0:
    raise DistributedError(f"--distributed_timeout_s={timeout_s} must be > 0")
  check(spec)
  deadline = time.time() + timeout_s
  if spec.coordinator_address is not None:
    _wait_bounded(spec, timeout_s, deadline)
  # CPU runs (tests, debugging) need a cross-process collectives backend; GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      coordinator_address=spec.coordinator_address,
      num_processes=spec.num_processes,
      process_id=spec.process_id,
      # [] = every local device; JAX's SLURM rule would give each task one GPU.
      local_device_ids=list(spec.local_device_ids or ()),
      cluster_detection_method=None if spec.source == "slurm" else "deactivate",
      initialization_timeout=max(1, int(deadline - time.time())),
    )
  except (RuntimeError, ValueError) as e:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise DistributedError(
      f"jax.distributed.initialize failed for process {spec.process_id} of "
      f"{spec.num_processes} ({spec.source}) within {timeout_s}s: {first}"
    ) from e
  verify(spec)


def verify(spec: ProcessSpec) -> None:
  """After initialisation: every process was told the same count, and the runtime agrees.

  All processes exchange what they were told first, so that all of them fail together with the
  same message instead of some failing and the others hanging in their first collective.
  """
  from jax.experimental import multihost_utils

  claims = multihost_utils.process_allgather(
    np.asarray([spec.num_processes, spec.process_id], np.int32)
  )
  check_claims(spec, np.asarray(claims).reshape(-1, 2), jax.process_count(), jax.process_index())


def check_claims(
  spec: ProcessSpec, claims: np.ndarray, process_count: int, process_index: int
) -> None:
  """`claims[k]` = (num_processes, process_id) that process k was started with."""
  for k, (count, pid) in enumerate(claims.tolist()):
    if count != process_count or pid != k:
      raise DistributedError(
        f"process {k} was started with --num_processes={count} --process_id={pid} but the "
        f"coordinator {spec.coordinator_address or '(from SLURM)'} runs {process_count} "
        "processes; start every process with the same --num_processes and a distinct "
        "--process_id"
      )
  if process_index != spec.process_id:
    raise DistributedError(
      f"--process_id={spec.process_id} but the coordinator numbered this process "
      f"{process_index}; give every process a distinct --process_id"
    )
