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
from collections.abc import Callable
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


class StepTrace:
  """Wraps the train step: traces the calls for steps START to END - 1 into
  `process_dir(log_dir, jax.process_index())`.

  The trace starts just before step START and stops once step END - 1 (or the run's last step)
  is done on the device: the one host synchronisation a profile costs, and only there. Used as a
  context manager, it stops a trace that an exception or a preemption cut short.
  """

  def __init__(
    self, train_step: Callable, steps: tuple[int, int] | None, log_dir: str, total_steps: int
  ):
    self._step_fn = train_step
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

  def __call__(self, state, batch, step: int) -> Any:
    if self._steps is None:
      return self._step_fn(state, batch, step)
    import jax  # pylint: disable=import-outside-toplevel

    if not self._active and self._steps[0] <= step <= self._last:
      log_dir = process_dir(self._log_dir, jax.process_index())
      os.makedirs(log_dir, exist_ok=True)
      jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
      self._active = True
    out = self._step_fn(state, batch, step)
    if self._active and step >= self._last:
      self.stop(out)
    return out

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
