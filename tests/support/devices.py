"""XLA_FLAGS for runs on forced CPU devices."""

# XLA:CPU aborts the process (SIGABRT) when a device waits at a collective for more than
# 40 s for its peers. On 2 shared cores, with pytest's workers and their launch.py subprocesses
# all busy, a device can be late by tens of seconds; a longer limit keeps such runs alive. A real
# deadlock (see conftest.py's PJRT_NPROC) still ends the run, with XLA's message, well inside the
# tests' subprocess timeouts.
COLLECTIVE_TERMINATE_TIMEOUT_S = 300


def xla_flags(devices: int) -> str:
  """`devices` forced CPU devices, with collectives allowed to wait out a busy machine."""
  return (
    f"--xla_force_host_platform_device_count={devices} "
    f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TERMINATE_TIMEOUT_S}"
  )
