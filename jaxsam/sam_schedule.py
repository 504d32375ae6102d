"""When SAM takes its ascent: the one answer to "is this optimizer step a SAM step?".

Count-based (every k-th step, from a start step on: late-phase SAM, SAM-every-k, LookSAM's period)
and adaptive (AE-SAM: only where the clean gradient's squared norm is large against its running
statistics). The same object answers on the host (the loop picks the SAM or the base program from
the step number) and inside the compiled step (a traced predicate). Pure: no config, no flax.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsam.errors import ConfigError


class AdaptiveState(NamedTuple):
  """AE-SAM's running statistics of the squared clean-gradient norm (fp32 scalars)."""

  mean: jax.Array
  var: jax.Array


def _is_real(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class AdaptiveRule:
  """AE-SAM (Jiang et al. 2023): SAM iff ||g||^2 >= its running mean + c_t running std.

  `decay` is the EMA decay of the statistics; c_t goes linearly from `c_start` at step 0 to
  `c_end` at the schedule's total_steps (the paper's CIFAR setting: 0.9, -1, 1).
  """

  decay: float = 0.9
  c_start: float = -1.0
  c_end: float = 1.0

  def __post_init__(self):
    if not (_is_real(self.decay) and 0 <= self.decay < 1):
      raise ConfigError(f"sam adaptive_decay={self.decay!r} is invalid; accepted: 0 <= d < 1")
    c = (self.c_start, self.c_end)
    if not all(_is_real(x) and not math.isnan(x) for x in c):
      raise ConfigError(
        f"sam adaptive_c={c!r} is invalid; accepted: two floats (-inf and inf allowed)"
      )

  def init(self) -> AdaptiveState:
    return AdaptiveState(mean=jnp.zeros((), jnp.float32), var=jnp.zeros((), jnp.float32))

  def threshold(self, opt_step: jax.Array, total_steps: int) -> jax.Array:
    """c_t: linear in the optimizer step from c_start to c_end at total_steps, then c_end."""
    c_start, c_end = float(self.c_start), float(self.c_end)
    if c_end == c_start:
      return jnp.asarray(c_start, jnp.float32)
    frac = jnp.clip(opt_step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return jnp.where(frac >= 1, c_end, c_start + (c_end - c_start) * frac)

  def update(
    self, stats: AdaptiveState, sq_norm: jax.Array, c: jax.Array
  ) -> tuple[AdaptiveState, jax.Array]:
    """Folds ||g||^2 into the running mean and variance; SAM iff ||g||^2 >= mean + c*std.

    A multiplier c = -inf always takes SAM, +inf never (c * std is not formed when std = 0, so
    the first steps are not NaN).
    """
    mean = self.decay * stats.mean + (1 - self.decay) * sq_norm
    var = self.decay * stats.var + (1 - self.decay) * jnp.square(sq_norm - mean)
    std = jnp.sqrt(var)
    margin = jnp.where(std > 0, c * jnp.where(std > 0, std, 1.0), jnp.where(jnp.isinf(c), c, 0.0))
    return AdaptiveState(mean=mean, var=var), sq_norm >= mean + margin


@dataclasses.dataclass(frozen=True)
class AscentSchedule:
  """SAM on optimizer steps start_step, start_step + every, ...; with `adaptive`, only on those of
  them whose clean gradient passes AE-SAM's rule. Every other step is a base step.

  `accum_steps` updates of the transform form one optimizer step (gradient accumulation), so the
  transform's update count is divided by it; `total_steps` is the run's optimizer steps (the
  adaptive threshold's schedule).

  >>> s = AscentSchedule(every=3, start_step=2)
  >>> [s(step) for step in range(7)]
  [False, False, True, False, False, True, False]
  """

  every: int = 1
  start_step: int = 0
  total_steps: int = 0
  accum_steps: int = 1
  adaptive: AdaptiveRule | None = None

  def __post_init__(self):
    for name, low in (("every", 1), ("start_step", 0), ("total_steps", 0), ("accum_steps", 1)):
      value = getattr(self, name)
      if not _is_int(value) or value < low:
        raise ConfigError(f"sam {name}={value!r} is invalid; accepted: an integer >= {low}")

  @property
  def always(self) -> bool:
    """Every step is a SAM step, known before tracing: no predicate, no branch."""
    return self.every == 1 and self.start_step == 0 and self.adaptive is None

  @property
  def host_decides(self) -> bool:
    """The answer depends on the step number alone and varies: the host can pick the program."""
    return self.adaptive is None and not self.always

  def opt_step(self, count: jax.Array) -> jax.Array:
    """The optimizer step of the transform's `count`-th update."""
    return count // self.accum_steps

  def __call__(self, opt_step: Any) -> Any:
    """The count-based answer: a Python bool for an int step (host), a bool[] for a traced one."""
    take = opt_step >= self.start_step
    if self.every > 1:
      take = take & ((opt_step - self.start_step) % self.every == 0)
    return take

  def init(self) -> Any:
    """What the rule carries between steps: AE-SAM's statistics, else nothing."""
    return () if self.adaptive is None else self.adaptive.init()

  def decide(self, opt_step: jax.Array, clean_norm: jax.Array, stats: Any) -> tuple[Any, Any]:
    """(SAM on this step?, new statistics) inside the step: Python True where every step is,
    else a bool[] that is the same on every device (`clean_norm` is of the averaged gradient)."""
    if self.always:
      return True, stats
    take = self(opt_step)
    if self.adaptive is not None:
      c = self.adaptive.threshold(opt_step, self.total_steps)
      stats, adaptive_take = self.adaptive.update(stats, jnp.square(clean_norm), c)
      take = take & adaptive_take
    return take, stats
