"""Sharpness-Aware Minimization as an optax transform: one `update` call is one whole SAM step.

Pure: no config, no flax, no devices beyond an optional collective axis name. The second
(perturbed) gradient comes in through the `grad_fn` extra argument, so the clean pass, the ascent,
the perturbed pass and the base optimizer all live in one jit-compiled train step.

Cheaper variants share the same transform: SAM every k-th step (`every`), SAM only after a start
step (late phase), LookSAM's reuse of the stored SAM direction, AE-SAM's adaptive switching, and
Momentum-SAM's one-gradient step (`variant="msam"`, with the caller taking its gradient at
`msam_point`). A step that skips the ascent does not compute it: the choice is a `lax.cond` whose
predicate is the same on every device and ascent group (see `update_fn`).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsam.errors import ConfigError

GradFn = Callable[[optax.Params], tuple[jax.Array, optax.Updates]]


class SAMState(NamedTuple):
  """State of the transform returned by `sam`; the diagnostics describe the last step.

  Attributes:
    count: int32 number of `update` calls so far (the step a rho schedule is evaluated at).
    base_state: state of the wrapped base optimizer.
    rho: fp32 perturbation radius used by the last step (the schedule's value at that step).
    clean_grad_norm: fp32 global L2 norm of the clean gradient (averaged over `axis_name` when
      set). Also kept with a static rho = 0: its 2 flops per weight are the only cost over `base`.
    sam_grad_norm: fp32 global L2 norm of the perturbed-pass gradient, averaged over `axis_name`
      when set, before the GSAM decomposition. With a static rho = 0 it is `clean_grad_norm`.
    cosine: fp32 cos(g_clean, g_sam) of the two averaged gradients; 1 with a static rho = 0.
      Near 1 means the perturbation barely changes the gradient (SAM is close to the base step).
    perturbed_loss: fp32 loss of the perturbed pass (`grad_fn`'s loss), averaged over `axis_name`
      when set; NaN with a static rho = 0, where there is no perturbed pass (the clean loss is the
      caller's to log), and on steps that skip the ascent (then sam_grad_norm and cosine are NaN).
    active: fp32 1 when the last step took SAM's ascent (always for plain SAM, and for MSAM, whose
      every step is perturbed), 0 when it was a base-optimizer (or LookSAM reuse) step.
    policy_state: what a variant carries between steps: LookSAMState, AdaptiveState, or ().
  """

  count: jax.Array
  base_state: optax.OptState
  rho: jax.Array
  clean_grad_norm: jax.Array
  sam_grad_norm: jax.Array
  cosine: jax.Array
  perturbed_loss: jax.Array
  active: jax.Array
  policy_state: Any


class LookSAMState(NamedTuple):
  """LookSAM's memory: the part of the last SAM gradient orthogonal to its clean gradient (fp32)."""

  direction: Any


class AdaptiveState(NamedTuple):
  """AE-SAM's running statistics of the squared clean-gradient norm (fp32 scalars)."""

  mean: jax.Array
  var: jax.Array


def global_norm(tree: Any) -> jax.Array:
  """Global L2 norm of every leaf of `tree` together, accumulated in fp32 (bf16 sums lose bits)."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def tree_vdot(a: Any, b: Any) -> jax.Array:
  """Inner product of two trees of the same structure, in fp32."""
  parts = jax.tree.leaves(
    jax.tree.map(lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)), a, b)
  )
  return sum(parts)


def _as_device_local(tree: Any, axis_name: str | tuple[str, ...]) -> Any:
  """Marks every leaf as varying over the mesh axes among `axis_name` (shard_map's check_vma types).

  Autodiff sums the gradient of a value that is the same on every device over the axis; after a
  synchronised ascent the perturbed weights are such a value, so without this the perturbed-pass
  gradient would be a sum over devices, not the device-local gradient that is then averaged.
  Under check_vma=False nothing is tracked and the cast is a no-op; vmap axes (ascent groups)
  carry no varying-ness and are skipped.
  """
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)

  def one(x):
    aval = jax.typeof(x)
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    mesh_axes = getattr(getattr(getattr(aval, "sharding", None), "mesh", None), "axis_names", ())
    missing = tuple(n for n in names if n not in varying and n in mesh_axes)
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(one, tree)


def _default_asam_mask(params: Any) -> Any:
  """Kernels (ndim > 1) are rescaled by ASAM; biases and BN scale/bias keep T = 1."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _sam_ascent(grads, params, rho, *, eps, eta, mask):
  """SAM (Foret et al. 2021): eps = rho * g / ||g||."""
  del params, eta, mask
  scale = rho / (global_norm(grads) + eps)
  return jax.tree.map(lambda g: g.astype(jnp.float32) * scale, grads)


def _asam_ascent(grads, params, rho, *, eps, eta, mask):
  """ASAM, published form (Kwon et al. 2021): eps = rho * T^2 g / ||T g||, T = |w| + eta on mask."""

  def t_of(p, m):
    t = jnp.abs(p.astype(jnp.float32)) + eta
    if isinstance(m, bool):  # static mask (the default): no select in the graph
      return t if m else jnp.ones_like(t)
    return jnp.where(m, t, 1.0)

  t_w = jax.tree.map(t_of, params, mask)
  t_g = jax.tree.map(lambda t, g: t * g.astype(jnp.float32), t_w, grads)
  scale = rho / (global_norm(t_g) + eps)
  return jax.tree.map(lambda t, tg: t * tg * scale, t_w, t_g)


# Registry of ascent rules; GSAM ascends as SAM and differs only in the descent gradient. LookSAM
# and AE-SAM ascend as SAM and differ in when (and, for LookSAM, what) they descend; MSAM has no
# ascent pass (its perturbation comes from the momentum buffer, see msam_point).
_ASCENTS = {
  "sam": _sam_ascent,
  "asam": _asam_ascent,
  "gsam": _sam_ascent,
  "looksam": _sam_ascent,
  "aesam": _sam_ascent,
}
VARIANTS = (*_ASCENTS, "msam")
# LookSAM's reuse weight alpha (Liu et al. 2022 use 0.7); AE-SAM's EMA decay and the threshold
# multiplier c_t, linear in the step from C_START to C_END (Jiang et al. 2023's CIFAR setting).
LOOKSAM_REUSE_WEIGHT = 0.7
AESAM_DECAY = 0.9
AESAM_C_START = -1.0
AESAM_C_END = 1.0


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


def takes_ascent(opt_step: int, *, every: int = 1, start_step: int = 0) -> bool:
  """Whether optimizer step `opt_step` is a SAM step of the count-based schedules (host side).

  >>> [takes_ascent(s, every=3, start_step=2) for s in range(7)]
  [False, False, True, False, False, True, False]
  """
  return opt_step >= start_step and (opt_step - start_step) % every == 0


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


def adaptive_update(
  stats: AdaptiveState, sq_norm: jax.Array, c: jax.Array, decay: float
) -> tuple[AdaptiveState, jax.Array]:
  """AE-SAM: fold ||g||^2 into the running mean and variance; SAM iff ||g||^2 >= mean + c*std.

  A threshold multiplier c = -inf always takes SAM, +inf never (c * std is not formed when std = 0,
  so the first steps are not NaN).
  """
  mean = decay * stats.mean + (1 - decay) * sq_norm
  var = decay * stats.var + (1 - decay) * jnp.square(sq_norm - mean)
  std = jnp.sqrt(var)
  margin = jnp.where(std > 0, c * jnp.where(std > 0, std, 1.0), jnp.where(jnp.isinf(c), c, 0.0))
  return AdaptiveState(mean=mean, var=var), sq_norm >= mean + margin


def find_momentum(base_state: Any) -> Any:
  """The momentum buffer (optax's `trace`) inside a base optimizer's state; ValueError if none."""
  traces = [x.trace for x in jax.tree.leaves(base_state, is_leaf=_is_trace) if _is_trace(x)]
  if len(traces) != 1:
    raise ConfigError(
      f"sam variant='msam' needs a base optimizer with one momentum buffer (SGD "
      f"with momentum > 0); found {len(traces)}"
    )
  return traces[0]


def _is_trace(x) -> bool:
  return isinstance(x, optax.TraceState)


def msam_point(
  params: Any,
  state: "SAMState",
  rho: float,
  *,
  eps: float = 1e-12,
  start_step: int = 0,
  accum_steps: int = 1,
) -> Any:
  """Where Momentum-SAM takes its one gradient: w - rho * v / ||v||, v the momentum buffer.

  Becker et al. 2024 perturb along the negative momentum direction (v accumulates gradients, and
  the base step moves along -v). The reference implementation keeps the weights stored perturbed to
  save an add; here the stored weights stay the clean ones and this point is formed inside the
  compiled step (one fused elementwise pass), so evaluation, checkpoints and resume see the clean
  weights with nothing to undo. Before `start_step` the point is the weights themselves.
  """
  velocity = find_momentum(state.base_state)
  scale = rho / (global_norm(velocity) + eps)
  if start_step:
    scale = jnp.where(state.count // accum_steps >= start_step, scale, 0.0)
  return jax.tree.map(lambda p, v: p - (scale * v).astype(p.dtype), params, velocity)


def gsam_rho_schedule(
  lr_schedule: optax.Schedule | float, lr_max: float, lr_min: float, rho_max: float, rho_min: float
) -> optax.Schedule:
  """GSAM's rho that follows the learning rate (Zhuang et al. 2022, Sec. 5).

  rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min), so rho decays with
  the lr. A constant lr (lr_max == lr_min) gives a constant rho_max.

  >>> import optax
  >>> lr = optax.cosine_decay_schedule(0.1, 100)
  >>> rho = gsam_rho_schedule(lr, lr_max=0.1, lr_min=0.0, rho_max=0.05, rho_min=0.01)
  >>> round(float(rho(0)), 4), round(float(rho(100)), 4)
  (0.05, 0.01)
  """
  bounds = {"lr_max": lr_max, "lr_min": lr_min, "rho_max": rho_max, "rho_min": rho_min}
  for name, value in bounds.items():
    if not _is_real(value) or not math.isfinite(value) or value < 0:
      raise ConfigError(
        f"gsam_rho_schedule {name}={value!r} is invalid; accepted: a finite float >= 0"
      )
  for hi, lo in (("lr_max", "lr_min"), ("rho_max", "rho_min")):
    if bounds[hi] < bounds[lo]:
      raise ConfigError(
        f"gsam_rho_schedule {hi}={bounds[hi]!r} < {lo}={bounds[lo]!r}; accepted: {hi} >= {lo}"
      )
  lr_fn = lr_schedule if callable(lr_schedule) else (lambda step: lr_schedule)
  span = lr_max - lr_min

  def schedule(step):
    if span == 0:
      return jnp.asarray(rho_max, jnp.float32)
    frac = (jnp.asarray(lr_fn(step), jnp.float32) - lr_min) / span
    return jnp.asarray(rho_min, jnp.float32) + (rho_max - rho_min) * frac

  return schedule


def _is_real(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_nonneg(name: str, value) -> None:
  if not _is_real(value) or not math.isfinite(value) or value < 0:
    raise ConfigError(f"sam {name}={value!r} is invalid; accepted: a finite float >= 0")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_schedule_args(
  variant: str,
  *,
  every,
  start_step,
  reuse_weight,
  adaptive_decay,
  adaptive_c,
  total_steps,
  accum_steps,
) -> None:
  """One-line errors for the cheaper-SAM arguments, and for an option the variant would ignore."""
  for name, value, low in (
    ("every", every, 1),
    ("start_step", start_step, 0),
    ("total_steps", total_steps, 0),
    ("accum_steps", accum_steps, 1),
  ):
    if not _is_int(value) or value < low:
      raise ConfigError(f"sam {name}={value!r} is invalid; accepted: an integer >= {low}")
  if every > 1 and variant in ("aesam", "msam"):
    raise ConfigError(
      f"sam every={every} is not used by variant={variant!r} (it decides its own "
      "steps); set every=1, or use variant 'sam'/'looksam'"
    )
  if reuse_weight != LOOKSAM_REUSE_WEIGHT:
    if variant != "looksam":
      raise ConfigError(
        f"sam reuse_weight={reuse_weight!r} is only used by variant='looksam' "
        f"(got {variant!r}); leave it at {LOOKSAM_REUSE_WEIGHT}"
      )
    _check_nonneg("reuse_weight", reuse_weight)
  adaptive_set = adaptive_decay != AESAM_DECAY or tuple(adaptive_c) != (AESAM_C_START, AESAM_C_END)
  if adaptive_set and variant != "aesam":
    raise ConfigError(
      f"sam adaptive_decay/adaptive_c are only used by variant='aesam' (got "
      f"{variant!r}); leave them at {AESAM_DECAY}/{(AESAM_C_START, AESAM_C_END)}"
    )
  if not (_is_real(adaptive_decay) and 0 <= adaptive_decay < 1):
    raise ConfigError(f"sam adaptive_decay={adaptive_decay!r} is invalid; accepted: 0 <= d < 1")
  if len(adaptive_c) != 2 or not all(_is_real(c) and not math.isnan(c) for c in adaptive_c):
    raise ConfigError(
      f"sam adaptive_c={adaptive_c!r} is invalid; accepted: two floats (-inf and inf allowed)"
    )


def sam(
  base: optax.GradientTransformation,
  rho: float | optax.Schedule,
  *,
  variant: str = "sam",
  eta: float = 0.01,
  alpha: float = 0.0,
  eps: float = 1e-12,
  sync: bool = False,
  axis_name: str | tuple[str, ...] | None = None,
  ascent_weight_decay: float = 0.0,
  asam_mask: Any = None,
  every: int = 1,
  start_step: int = 0,
  reuse_weight: float = LOOKSAM_REUSE_WEIGHT,
  adaptive_decay: float = AESAM_DECAY,
  adaptive_c: tuple[float, float] = (AESAM_C_START, AESAM_C_END),
  total_steps: int = 0,
  accum_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization wrapping any optax `base` optimizer; one update = one SAM step.

  Each `update(grads, state, params, grad_fn=grad_fn)`:
    1. takes the clean gradient `grads` at `params` (device-local under `axis_name`), adds
       `ascent_weight_decay * params` to it for the ascent, averages it over `axis_name` when
       `sync` (else every device ascends with its own gradient: the paper's m-sharpness);
    2. perturbs the weights by eps(w) (SAM: rho g/||g||; ASAM: rho T^2 g/||T g||);
    3. calls `grad_fn(params + eps)` -> (loss, grads) on the same batch, averages that gradient
       over `axis_name` (GSAM: then subtracts alpha times the part of the averaged clean gradient
       orthogonal to it);
    4. feeds the result to `base`. Clipping, momentum and weight decay in `base` see the averaged
       gradient. The returned updates have the params' dtypes.

  Inside `jax.shard_map` (whose default check_vma=True), differentiate with respect to
  `jax.lax.pcast(params, axis_name, to="varying")`: a gradient with respect to the replicated
  params is already summed over the axis by JAX's autodiff, so it is neither device-local nor a
  mean, and the per-device ascent would silently become a synchronised one. `grad_fn` receives
  perturbed params that are already device-varying: differentiate them directly.

  Cheaper schedules (none changes a plain SAM step when left at its default):
    * `every=k`: the ascent on optimizer steps start_step, start_step + k, ...; the others are
      base steps on the clean gradient (LookSAM: on the clean gradient plus the stored direction).
      rho is not rescaled with k: Composer's periodic SAM and LookSAM keep SAM's rho, since each
      SAM step is a full SAM step and the in-between steps are plain descent.
    * `start_step=s`: base steps before optimizer step s, the schedule above after (late phase).
    * variant "aesam": the ascent only on steps whose squared clean-gradient norm is at least its
      running mean plus c_t running standard deviations (c_t linear from adaptive_c[0] at step 0
      to adaptive_c[1] at total_steps).
    * variant "msam": no ascent pass at all; the caller takes `grads` at `msam_point(...)`, and
      this transform feeds them to `base` (one gradient per step).
  For the count-based schedules (every, start_step, LookSAM) the caller should pass
  `ascent=takes_ascent(step, ...)` from the host and compile one step per value: the branch not
  taken is then absent from the program. XLA:CPU runs a program with a `lax.cond` around the
  passes several times slower even on the steps that skip them (measured: bench/sam_overhead.py),
  and a host-side choice costs nothing on any backend. Without `ascent` (and always for AE-SAM,
  whose predicate exists only on the device) the skip is a `lax.cond` on a predicate computed
  from the step count or from pmean-ed norms, so it is the same on every device and every vmapped
  ascent group: the cond stays a real branch (vmap keeps an unbatched predicate as a cond, not a
  select that runs both sides) and a skipped step never computes the perturbed pass.
  `accum_steps=n` says that n consecutive updates form one optimizer step (gradient accumulation
  in `base`, e.g. optax.MultiSteps): the schedules and a rho schedule then count optimizer steps.

  A Python float rho == 0.0 is resolved at trace time: no perturbation, `grad_fn` is never called
  and the updates are bit for bit those of `base` on the (averaged) clean gradient.

  Norms and inner products are global over the whole tree, in fp32, with `eps` added to norms.

  >>> import jax, jax.numpy as jnp, optax
  >>> loss = lambda w: 0.5 * jnp.sum(w ** 2)
  >>> tx = sam(optax.sgd(0.1), rho=0.05)
  >>> w = jnp.array([1.0, 2.0])
  >>> state = tx.init(w)
  >>> updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.value_and_grad(loss))
  >>> w = optax.apply_updates(w, updates)
  >>> [round(float(x), 4) for x in w]
  [0.8978, 1.7955]

  Args:
    base: the optimizer applied to the SAM gradient (e.g. SGD + momentum + weight decay).
    rho: perturbation radius, a float >= 0 or an optax schedule of the step count.
    variant: "sam", "asam", "gsam", "looksam", "aesam" or "msam".
    eta: ASAM's offset in T_w = |w| + eta.
    alpha: GSAM's weight of the orthogonal ascent term (must be 0 unless variant="gsam").
    eps: added to every global norm, so a zero gradient gives a zero perturbation, not NaN.
    sync: average the ascent gradient over `axis_name` (no m-sharpness). No effect without one.
    axis_name: the data-parallel axis when called inside `shard_map`, or a tuple of axes, e.g.
      (devices, ascent groups) with the groups of `sam.m` examples vmapped inside each device
      (JAX 0.10 mixes vmap-axis collectives with shard_map only under check_vma=False); None on
      a single device.
    ascent_weight_decay: adds this times w (every leaf) to the ascent gradient only, i.e. the L2
      term enters the ascent; the descent's weight decay is the base optimizer's business.
    asam_mask: ASAM only: a pytree of bools like params, or a callable params -> such a tree,
      marking the leaves that get T_w = |w| + eta (the others get T_w = 1). Default: leaves with
      ndim > 1 (kernels); biases and BatchNorm scale/bias are excluded.
    every: the ascent on every k-th optimizer step (sam, asam, gsam, looksam); 1 = every step.
    start_step: optimizer steps before this one are base steps (any variant).
    reuse_weight: LookSAM's alpha, the weight of the stored direction on in-between steps.
    adaptive_decay: AE-SAM's EMA decay of the gradient-norm statistics.
    adaptive_c: AE-SAM's threshold multiplier at step 0 and at total_steps (linear between).
    total_steps: optimizer steps of the run (AE-SAM's c_t schedule; unused otherwise).
    accum_steps: updates per optimizer step (gradient accumulation in base).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose update takes `grad_fn` as keyword argument
    and whose state is a `SAMState`.

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving Generalization, ICLR 2021
    (https://arxiv.org/abs/2010.01412; code: github.com/google-research/sam).
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep
    Neural Networks, ICML 2021 (https://arxiv.org/abs/2102.11600).
    Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization, ICLR 2022
    (https://arxiv.org/abs/2203.08065).
    Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization (LookSAM), CVPR 2022
    (https://arxiv.org/abs/2203.02714).
    Jiang et al., An Adaptive Policy to Employ Sharpness-Aware Minimization (AE-SAM), ICLR 2023
    (https://arxiv.org/abs/2304.14647).
    Becker et al., Momentum-SAM: Sharpness Aware Minimization without Computational Overhead, 2024
    (https://arxiv.org/abs/2401.12033).
    `optax.contrib.sam` (the opaque mode with sync_period=2 is this transform's plain SAM).
  """
  if not (hasattr(base, "init") and hasattr(base, "update")):
    raise ConfigError(f"sam base={base!r} is not an optax GradientTransformation")
  if not callable(rho) and (not _is_real(rho) or not math.isfinite(rho) or rho < 0):
    raise ConfigError(
      f"sam rho={rho!r} is invalid; accepted: a finite float >= 0 or an optax schedule"
    )
  if variant not in VARIANTS:
    raise ConfigError(f"sam variant={variant!r} is unknown; known: {', '.join(VARIANTS)}")
  _check_nonneg("eta", eta)
  _check_nonneg("alpha", alpha)
  _check_nonneg("eps", eps)
  _check_nonneg("ascent_weight_decay", ascent_weight_decay)
  if alpha != 0 and variant != "gsam":
    raise ConfigError(
      f"sam alpha={alpha!r} is only used by variant='gsam' (got {variant!r}); set alpha=0"
    )
  if asam_mask is not None and variant != "asam":
    raise ConfigError(
      f"sam asam_mask is only used by variant='asam' (got {variant!r}); leave it None"
    )
  if not isinstance(sync, bool):
    raise ConfigError(f"sam sync={sync!r} is invalid; accepted: True or False")
  _check_schedule_args(
    variant,
    every=every,
    start_step=start_step,
    reuse_weight=reuse_weight,
    adaptive_decay=adaptive_decay,
    adaptive_c=adaptive_c,
    total_steps=total_steps,
    accum_steps=accum_steps,
  )
  names_ok = isinstance(axis_name, str) or (
    isinstance(axis_name, tuple) and axis_name and all(isinstance(a, str) for a in axis_name)
  )
  if axis_name is not None and not names_ok:
    raise ConfigError(
      f"sam axis_name={axis_name!r} is invalid; accepted: None, an axis name or a tuple of names"
    )

  base = optax.with_extra_args_support(base)
  ascent = _ASCENTS.get(variant)
  static_zero = not callable(rho) and rho == 0
  # Whether every optimizer step takes the ascent, known at trace time: then there is no cond and
  # the graph is plain SAM's, bit for bit.
  always = every == 1 and start_step == 0 and variant not in ("aesam",)
  c_start, c_end = (float(c) for c in adaptive_c)
  f32 = jnp.float32
  nan = jnp.full((), jnp.nan, f32)

  def pmean(tree):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

  def init_policy(params):
    if variant == "looksam" and not static_zero:
      return LookSAMState(direction=jax.tree.map(lambda p: jnp.zeros(p.shape, f32), params))
    if variant == "aesam" and not static_zero:
      return AdaptiveState(mean=jnp.zeros((), f32), var=jnp.zeros((), f32))
    return ()

  def init_fn(params):
    # A fresh array per field: a train state whose leaves share one buffer cannot be donated.
    zero = lambda: jnp.zeros((), f32)
    return SAMState(
      count=jnp.zeros((), jnp.int32),
      base_state=base.init(params),
      rho=zero(),
      clean_grad_norm=zero(),
      sam_grad_norm=zero(),
      cosine=zero(),
      perturbed_loss=jnp.full((), jnp.nan, f32),
      active=zero(),
      policy_state=init_policy(params),
    )

  def to_param_dtype(updates, params):
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)  # no-op when equal

  def finish(g_final, state, params, extra_args, **diagnostics):
    updates, base_state = base.update(g_final, state.base_state, params, **extra_args)
    new_state = SAMState(
      count=optax.safe_int32_increment(state.count), base_state=base_state, **diagnostics
    )
    return to_param_dtype(updates, params), new_state

  def take_ascent(opt_step, clean_norm, policy_state):
    """(take the ascent?, new policy state): a Python True when every step does, else a bool[]."""
    if always:
      return True, policy_state
    take = opt_step >= start_step
    if every > 1:
      take = take & ((opt_step - start_step) % every == 0)
    if variant == "aesam":
      frac = jnp.clip(opt_step.astype(f32) / max(total_steps, 1), 0.0, 1.0)
      c = (
        jnp.where(frac >= 1, c_end, c_start + (c_end - c_start) * frac)
        if c_end != c_start
        else jnp.asarray(c_start, f32)
      )
      policy_state, adaptive_take = adaptive_update(
        policy_state, jnp.square(clean_norm), c, adaptive_decay
      )
      take = take & adaptive_take
    return take, policy_state

  def ascent_pass(grads, g_clean, clean_norm, params, rho_t, grad_fn, policy_state):
    """SAM's perturbed pass: (descent gradient, its norm, cosine, perturbed loss, policy state)."""
    # Per-device ascent (m-sharpness) unless sync; replicated params make pmean(g + wd*w) equal
    # pmean(g) + wd*w, so the averaged clean gradient is reused.
    g_ascent = g_clean if sync else grads
    if ascent_weight_decay:
      wd = ascent_weight_decay
      g_ascent = jax.tree.map(lambda g, p: g + wd * p.astype(g.dtype), g_ascent, params)
    mask = None
    if variant == "asam":
      mask = asam_mask(params) if callable(asam_mask) else asam_mask
      mask = _default_asam_mask(params) if mask is None else mask
    e_w = ascent(g_ascent, params, rho_t, eps=eps, eta=eta, mask=mask)
    perturbed = jax.tree.map(lambda p, e: p + e.astype(p.dtype), params, e_w)
    if axis_name is not None:
      perturbed = _as_device_local(perturbed, axis_name)

    loss_p, g_p = grad_fn(perturbed)
    g_sam = pmean(g_p)
    loss_p = pmean(jnp.asarray(loss_p, f32))
    sam_norm = global_norm(g_sam)
    cosine = tree_vdot(g_clean, g_sam) / (clean_norm * sam_norm + eps)

    g_final = g_sam
    if variant == "gsam" and alpha:
      # Decompose with the averaged gradients, even under per-device ascent: g_perp must be
      # orthogonal to the gradient actually descended (the averaged g_sam) for GSAM's alpha-term to
      # lower the clean loss without raising the surrogate; averaging per-device orthogonal parts
      # (big_vision's order) gives a vector that is not. With sync it also equals the
      # single-device full-batch step. g_clean is averaged for the diagnostics anyway.
      g_final = gsam_orthogonal_correction(g_clean, g_sam, alpha, eps)
    if variant == "looksam":
      policy_state = LookSAMState(direction=looksam_direction(g_clean, g_sam, eps))
    return g_final, sam_norm, cosine, loss_p, policy_state

  def skip_pass(g_clean, policy_state):
    """A step without the ascent: the clean gradient (LookSAM: plus the stored direction)."""
    g_final = g_clean
    if variant == "looksam":
      g_final = looksam_reuse(g_clean, policy_state.direction, reuse_weight, eps)
    return g_final, nan, nan, nan, policy_state

  def update_fn(
    grads,
    state,
    params=None,
    *,
    grad_fn: GradFn | None = None,
    ascent: bool | None = None,
    **extra_args,
  ):
    if params is None:
      raise TypeError("sam.update needs params (the weights to perturb)")
    g_clean = pmean(grads)
    clean_norm = global_norm(g_clean)
    zero, one = jnp.zeros((), f32), jnp.ones((), f32)

    if static_zero:
      # Plain one-pass step: the base on the averaged clean gradient, nothing else in the graph.
      return finish(
        g_clean,
        state,
        params,
        extra_args,
        rho=zero,
        clean_grad_norm=clean_norm,
        sam_grad_norm=clean_norm,
        cosine=one,
        perturbed_loss=nan,
        active=zero,
        policy_state=state.policy_state,
      )

    opt_step = state.count // accum_steps
    rho_t = jnp.asarray(rho(opt_step) if callable(rho) else rho, f32)
    if variant == "msam":
      # The caller took `grads` at msam_point: one gradient, no second pass.
      active = one if not start_step else (opt_step >= start_step).astype(f32)
      return finish(
        g_clean,
        state,
        params,
        extra_args,
        rho=rho_t * active,
        clean_grad_norm=clean_norm,
        sam_grad_norm=clean_norm,
        cosine=one,
        perturbed_loss=nan,
        active=active,
        policy_state=state.policy_state,
      )
    if grad_fn is None:
      raise TypeError("sam.update needs grad_fn=params -> (loss, grads) when rho is not a static 0")

    if ascent is not None and not always and variant != "aesam":
      take, policy_state = bool(ascent), state.policy_state  # the caller's host-side schedule
    else:
      take, policy_state = take_ascent(opt_step, clean_norm, state.policy_state)
    sam_side = lambda ps: ascent_pass(grads, g_clean, clean_norm, params, rho_t, grad_fn, ps)
    if take is True:
      g_final, sam_norm, cosine, loss_p, policy_state = sam_side(policy_state)
    elif take is False:
      g_final, sam_norm, cosine, loss_p, policy_state = skip_pass(g_clean, policy_state)
    else:
      g_final, sam_norm, cosine, loss_p, policy_state = jax.lax.cond(
        take, sam_side, lambda ps: skip_pass(g_clean, ps), policy_state
      )
    active = jnp.asarray(float(take), f32) if isinstance(take, bool) else take.astype(f32)
    return finish(
      g_final,
      state,
      params,
      extra_args,
      rho=rho_t,
      clean_grad_norm=clean_norm,
      sam_grad_norm=sam_norm,
      cosine=cosine,
      perturbed_loss=loss_p,
      active=active,
      policy_state=policy_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
