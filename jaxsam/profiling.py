"""`launch.py --profile_steps=START:END`: a `jax.profiler` trace of some train steps.

Each process traces into its own folder, `<workdir>/profile/process_<N>/` (`workdir.PROFILE_DIR`,
N = `jax.process_index()`), so that the processes of a multi-process run, which share the workdir,
do not write into one another's trace; inside it the layout is TensorBoard's profile plugin's
(`plugins/profile/<run>/<host>.xplane.pb`), with a `perfetto_trace.json.gz` next to it that
ui.perfetto.dev opens. Light on purpose: JAX is imported only once a trace starts, so that
`parse_steps` can vet the flag before anything runs.
"""

import os
import re
import sys
from typing import Any, Self

from jaxsam import errors

_RANGE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_steps(text: str | None) -> tuple[int, int] | None:
  """(START, END) from "START:END", steps START to END - 1; None for no flag or an empty one."""
  if text is None or not text.strip():
    return None
  match = _RANGE.fullmatch(text)
  if not match or int(match[1]) >= int(match[2]):
    raise errors.UserError(
      f"--profile_steps={text} must be START:END with 0 <= START < END, e.g. 10:20"
    )
  return int(match[1]), int(match[2])


def process_dir(profile_dir: str, process_index: int) -> str:
  """The trace folder of one process: `<profile_dir>/process_<process_index>`."""
  return os.path.join(profile_dir, f"process_{process_index}")


class Profile:
  """The loop's profile action: traces steps START to END - 1 into
  `process_dir(log_dir, jax.process_index())`.

  `begin(step)` before each step starts the trace just before step START (or the first step of a
  resume inside the range); `due(step)` after a step says whether that was END - 1 (or the run's
  last step), and `stop(wait_for)` then waits for it on the device: the one host synchronisation a
  profile costs, and only there. Used as a context manager, it stops a trace that an exception or
  a preemption cut short.
  """

  def __init__(self, steps: tuple[int, int] | None, log_dir: str, total_steps: int):
    self._steps = steps
    self._log_dir = log_dir
    self._last = None if steps is None else min(steps[1], total_steps) - 1
    self._active = False
    if steps is not None and steps[1] > total_steps:
      traced = (
        f"tracing steps {steps[0]} to {total_steps - 1}"
        if steps[0] < total_steps
        else "no step is traced"
      )
      print(
        f"warning: --profile_steps={steps[0]}:{steps[1]} goes past the run's {total_steps} "
        f"steps; {traced}",
        file=sys.stderr,
        flush=True,
      )

  def begin(self, step: int) -> None:
    """Starts the trace when `step`, about to run, is the first traced one."""
    if self._steps is None or self._active or not self._steps[0] <= step <= self._last:
      return
    import jax  # pylint: disable=import-outside-toplevel

    log_dir = process_dir(self._log_dir, jax.process_index())
    os.makedirs(log_dir, exist_ok=True)
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    self._active = True

  def due(self, step: int) -> bool:
    """Whether the trace ends after `step`, just run (the last traced step)."""
    return self._active and step >= self._last

  def stop(self, wait_for: Any = None) -> None:
    """Ends the trace (if one runs), after `wait_for`'s arrays are computed."""
    if not self._active:
      return
    import jax  # pylint: disable=import-outside-toplevel

    jax.block_until_ready(wait_for)
    jax.profiler.stop_trace()
    self._active = False

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
