"""SAM variants as policies, registered by name: how each perturbs, which gradient it descends,
what it carries between steps, and when it ascends.

`jaxsam.sam.sam(base, rho, variant=NAME, **options)` looks NAME up in `POLICIES` and builds the
policy from the options it declares (dataclass fields). Adding a variant is one subclass of
`Policy` with `@register_policy("name")`: it overrides only what differs from plain SAM, and no
other variant or the transform changes. Pure: no config, no flax.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsam.errors import ConfigError
from jaxsam.sam_schedule import AdaptiveRule, AscentSchedule

Tree = Any


def global_norm(tree: Tree) -> jax.Array:
  """Global L2 norm of every leaf of `tree` together, accumulated in fp32 (bf16 sums lose bits)."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def tree_vdot(a: Tree, b: Tree) -> jax.Array:
  """Inner product of two trees of the same structure, in fp32."""
  parts = jax.tree.leaves(
    jax.tree.map(lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)), a, b)
  )
  return sum(parts)


def is_real(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_nonneg(name: str, value) -> None:
  """One-line ConfigError unless `value` is a finite real >= 0."""
  if not is_real(value) or not math.isfinite(value) or value < 0:
    raise ConfigError(f"sam {name}={value!r} is invalid; accepted: a finite float >= 0")


@dataclasses.dataclass(frozen=True)
class Policy:
  """A SAM variant. The defaults are plain SAM (Foret et al. 2021); a subclass overrides only
  what differs. Its options are its dataclass fields, each with a default.

  A step of the transform, with g the clean gradient (device-averaged where the ascent is
  synchronised) and state what `init` made:
    * a SAM step: e = `perturb(g, w, rho)`, g_sam = the gradient at w + e, then
      `descent(g, g_sam, state)` -> (the gradient the base optimizer gets, new state);
    * a base step (the schedule skips the ascent): `between(g, state)` is the gradient.
  Which steps are SAM steps is the `schedule` (an AscentSchedule); a policy adds an adaptive rule
  through `adaptive`, and then its state is that rule's statistics (the schedule updates them).
  A one-pass policy (`two_pass = False`) has no perturbed pass: the caller takes its one gradient
  at a point of its own (MSAM's `msam_point`).
  """

  name: ClassVar[str] = ""  # set by register_policy
  two_pass: ClassVar[bool] = True  # False: no perturbed pass; the caller moves the gradient point
  decides_steps: ClassVar[bool] = False  # True: it chooses its SAM steps itself (every must be 1)
  rho_follows_lr: ClassVar[bool] = False  # the config's rho decays with the lr (GSAM)
  needs_momentum: ClassVar[bool] = False  # perturbs along the base optimizer's momentum (MSAM)
  # Options other variants accept and ignore (still checked), where that has always been so.
  quiet_options: ClassVar[tuple[str, ...]] = ()

  @property
  def adaptive(self) -> AdaptiveRule | None:
    """An adaptive rule for the schedule (AE-SAM), or None for the count-based one alone."""
    return None

  def schedule(self, *, every=1, start_step=0, total_steps=0, accum_steps=1) -> AscentSchedule:
    """This variant's ascent schedule from the run's count-based settings."""
    schedule = AscentSchedule(every, start_step, total_steps, accum_steps, self.adaptive)
    if every > 1 and self.decides_steps:
      raise ConfigError(
        f"sam every={every} is not used by variant={self.name!r} (it decides its own "
        "steps); set every=1, or use variant 'sam'/'looksam'"
      )
    return schedule

  def init(self, params: Tree) -> Any:
    """What the variant carries between steps (checkpointed with the optimizer state)."""
    return () if self.adaptive is None else self.adaptive.init()

  def perturb(self, grads: Tree, params: Tree, rho: jax.Array, eps: float) -> Tree:
    """SAM's ascent, in fp32: e = rho * g / ||g||."""
    del params
    scale = rho / (global_norm(grads) + eps)
    return jax.tree.map(lambda g: g.astype(jnp.float32) * scale, grads)

  def descent(self, g_clean: Tree, g_sam: Tree, state: Any, eps: float) -> tuple[Tree, Any]:
    """(The gradient the base optimizer gets on a SAM step, the new state): SAM's g_sam."""
    del g_clean, eps
    return g_sam, state

  def between(self, g_clean: Tree, state: Any, eps: float) -> Tree:
    """The gradient on a step without the ascent: the clean one."""
    del state, eps
    return g_clean


POLICIES: dict[str, type[Policy]] = {}


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
  """Class decorator: `variant=name` builds this Policy subclass (a name is registered once)."""

  def register(cls: type[Policy]) -> type[Policy]:
    if name in POLICIES:
      raise ValueError(f"SAM variant {name!r} is already registered ({POLICIES[name].__name__})")
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
      raise TypeError(f"SAM variant {name!r}: {cls!r} is not a subclass of Policy")
    cls.name = name
    POLICIES[name] = cls
    return cls

  return register


def policy_class(variant: str) -> type[Policy]:
  """The registered Policy class of `variant`; a one-line ConfigError naming the known ones."""
  if variant not in POLICIES:
    raise ConfigError(f"sam variant={variant!r} is unknown; known: {', '.join(POLICIES)}")
  return POLICIES[variant]


def _option_defaults(cls: type[Policy]) -> dict[str, Any]:
  return {f.name: f.default for f in dataclasses.fields(cls)}


def _is_default(value, default) -> bool:
  if default is None:
    return value is None
  if isinstance(default, tuple):
    return isinstance(value, (tuple, list)) and tuple(value) == default
  return is_real(value) and value == default


def make_policy(variant: str, **options) -> Policy:
  """The policy of `variant` with its own options; another variant's option must stay at its
  default (a value it would silently ignore is a one-line ConfigError naming its variant)."""
  cls = policy_class(variant)
  own = _option_defaults(cls)
  for key, value in options.items():
    if key in own:
      continue
    owners = [c for c in POLICIES.values() if key in _option_defaults(c)]
    if not owners:
      raise TypeError(f"sam() got an unexpected keyword argument {key!r}")
    owner, default = owners[0], _option_defaults(owners[0])[key]
    if key in owner.quiet_options:
      owner(**{key: value})  # checked as its own variant checks it, then ignored
    elif not _is_default(value, default):
      raise ConfigError(
        f"sam {key}={value!r} is only used by variant={owner.name!r} (got {variant!r}); "
        f"leave it at {default!r}"
      )
  return cls(**{k: v for k, v in options.items() if k in own})


# --- the variants -------------------------------------------------------------------------------


@register_policy("sam")
@dataclasses.dataclass(frozen=True)
class SAM(Policy):
  """Plain SAM (Foret et al. 2021): ascend along rho g/||g||, descend the gradient there."""


@register_policy("asam")
@dataclasses.dataclass(frozen=True)
class ASAM(Policy):
  """ASAM, published form (Kwon et al. 2021): e = rho * T^2 g / ||T g||, T = |w| + eta on `mask`.

  `asam_mask`: a pytree of bools like params, or a callable params -> such a tree, marking the
  leaves that get T = |w| + eta (the others T = 1). None: leaves with ndim > 1 (kernels); biases
  and BatchNorm scale/bias are excluded.
  """

  eta: float = 0.01
  asam_mask: Any = None
  quiet_options: ClassVar[tuple[str, ...]] = ("eta",)

  def __post_init__(self):
    check_nonneg("eta", self.eta)

  def perturb(self, grads, params, rho, eps):
    mask = self.asam_mask(params) if callable(self.asam_mask) else self.asam_mask
    mask = jax.tree.map(lambda p: p.ndim > 1, params) if mask is None else mask

    def t_of(p, m):
      t = jnp.abs(p.astype(jnp.float32)) + self.eta
      if isinstance(m, bool):  # static mask (the default): no select in the graph
        return t if m else jnp.ones_like(t)
      return jnp.where(m, t, 1.0)

    t_w = jax.tree.map(t_of, params, mask)
    t_g = jax.tree.map(lambda t, g: t * g.astype(jnp.float32), t_w, grads)
    scale = rho / (global_norm(t_g) + eps)
    return jax.tree.map(lambda t, tg: t * tg * scale, t_w, t_g)


def gsam_orthogonal_correction(g_clean, g_sam, alpha: float, eps: float):
  """GSAM descent gradient g_sam - alpha * g_perp, g_perp = g_clean minus its projection on g_sam.

  Computed in fp32 and cast back to g_sam's dtypes. Zhuang et al. 2022, Algorithm 1.
  """
  coef = tree_vdot(g_clean, g_sam) / (tree_vdot(g_sam, g_sam) + eps)

  def one(gc, gs):
    gs32 = gs.astype(jnp.float32)
    g_perp = gc.astype(jnp.float32) - coef * gs32
    return (gs32 - alpha * g_perp).astype(gs.dtype)

  return jax.tree.map(one, g_clean, g_sam)


@register_policy("gsam")
@dataclasses.dataclass(frozen=True)
class GSAM(Policy):
  """GSAM (Zhuang et al. 2022): SAM's ascent; descends g_sam - alpha * (the part of the clean
  gradient orthogonal to g_sam); its rho follows the lr (`jaxsam.sam.gsam_rho_schedule`)."""

  alpha: float = 0.0
  rho_follows_lr: ClassVar[bool] = True

  def __post_init__(self):
    check_nonneg("alpha", self.alpha)

  def descent(self, g_clean, g_sam, state, eps):
    # Decompose with the averaged gradients, even under per-device ascent: g_perp must be
    # orthogonal to the gradient actually descended (the averaged g_sam) for GSAM's alpha-term to
    # lower the clean loss without raising the surrogate; averaging per-device orthogonal parts
    # (big_vision's order) gives a vector that is not. With sync it also equals the single-device
    # full-batch step. g_clean is averaged for the diagnostics anyway.
    if not self.alpha:
      return g_sam, state
    return gsam_orthogonal_correction(g_clean, g_sam, self.alpha, eps), state


class LookSAMState(NamedTuple):
  """LookSAM's memory: the part of the last SAM gradient orthogonal to its clean gradient (fp32)."""

  direction: Any


def looksam_direction(g_clean, g_sam, eps: float):
  """g_v = g_sam minus its projection on g_clean, in fp32: what LookSAM stores on a SAM step."""
  coef = tree_vdot(g_clean, g_sam) / (tree_vdot(g_clean, g_clean) + eps)
  return jax.tree.map(
    lambda gc, gs: gs.astype(jnp.float32) - coef * gc.astype(jnp.float32), g_clean, g_sam
  )


def looksam_reuse(g_clean, direction, weight: float, eps: float):
  """LookSAM's in-between gradient g + alpha * (||g|| / ||g_v||) * g_v, cast to g's dtypes."""
  scale = weight * global_norm(g_clean) / (global_norm(direction) + eps)
  return jax.tree.map(
    lambda g, v: (g.astype(jnp.float32) + scale * v).astype(g.dtype), g_clean, direction
  )


@register_policy("looksam")
@dataclasses.dataclass(frozen=True)
class LookSAM(Policy):
  """LookSAM (Liu et al. 2022): on SAM steps stores g_v (the SAM gradient's part orthogonal to
  the clean one); in between descends g + reuse_weight * ||g|| / ||g_v|| * g_v (their alpha 0.7)."""

  reuse_weight: float = 0.7

  def __post_init__(self):
    check_nonneg("reuse_weight", self.reuse_weight)

  def init(self, params):
    return LookSAMState(direction=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def descent(self, g_clean, g_sam, state, eps):
    return g_sam, LookSAMState(direction=looksam_direction(g_clean, g_sam, eps))

  def between(self, g_clean, state, eps):
    return looksam_reuse(g_clean, state.direction, self.reuse_weight, eps)


@register_policy("aesam")
@dataclasses.dataclass(frozen=True)
class AESAM(Policy):
  """AE-SAM (Jiang et al. 2023): SAM's step, taken only where ||g||^2 >= running mean + c_t std
  (c_t linear from adaptive_c[0] to adaptive_c[1] over the run); carries the statistics."""

  adaptive_decay: float = 0.9
  adaptive_c: tuple[float, float] = (-1.0, 1.0)
  decides_steps: ClassVar[bool] = True

  def __post_init__(self):
    _ = self.adaptive  # checks the options at construction

  @property
  def adaptive(self) -> AdaptiveRule:
    c = tuple(self.adaptive_c)
    if len(c) != 2:
      raise ConfigError(
        f"sam adaptive_c={self.adaptive_c!r} is invalid; accepted: two floats (-inf and inf "
        "allowed)"
      )
    return AdaptiveRule(self.adaptive_decay, *c)


def find_momentum(base_state: Any) -> Any:
  """The momentum buffer (optax's `trace`) inside a base optimizer's state; ConfigError if none."""
  is_trace = lambda x: isinstance(x, optax.TraceState)
  traces = [x.trace for x in jax.tree.leaves(base_state, is_leaf=is_trace) if is_trace(x)]
  if len(traces) != 1:
    raise ConfigError(
      f"sam variant='msam' needs a base optimizer with one momentum buffer (SGD "
      f"with momentum > 0); found {len(traces)}"
    )
  return traces[0]


@register_policy("msam")
@dataclasses.dataclass(frozen=True)
class MSAM(Policy):
  """Momentum-SAM (Becker et al. 2024): one gradient per step, at w - rho * v / ||v|| (v the
  momentum buffer), which the caller takes (`point`); the transform feeds it to the base."""

  two_pass: ClassVar[bool] = False
  decides_steps: ClassVar[bool] = True
  needs_momentum: ClassVar[bool] = True

  def point(self, params, base_state, rho, eps: float, on: jax.Array | None = None):
    """w - rho * v / ||v||; where `on` (a bool[]) is False, the weights themselves."""
    velocity = find_momentum(base_state)
    scale = rho / (global_norm(velocity) + eps)
    if on is not None:
      scale = jnp.where(on, scale, 0.0)
    return jax.tree.map(lambda p, v: p - (scale * v).astype(p.dtype), params, velocity)
