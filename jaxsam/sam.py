"""Sharpness-Aware Minimization as an optax transform: one `update` call is one whole SAM step.

Pure: no config, no flax, no devices beyond an optional collective axis name. The second
(perturbed) gradient comes in through the `grad_fn` extra argument, so the clean pass, the ascent,
the perturbed pass and the base optimizer all live in one jit-compiled train step.

The variants are policies registered by name (`jaxsam.sam_policies`: how each perturbs, which
gradient it descends, what it carries); which steps take the ascent is one `AscentSchedule`
(`jaxsam.sam_schedule`: every k-th step, from a start step on, AE-SAM's adaptive rule). MSAM is a
one-gradient policy whose gradient the caller takes at `msam_point`. A step that skips the ascent
does not compute it: the choice is a `lax.cond` whose predicate is the same on every device and
ascent group, or a host-side choice between two programs (`ascent=`).
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsam.errors import ConfigError
from jaxsam.sam_policies import (  # noqa: F401 (re-exported: the variants' public names)
  POLICIES,
  LookSAMState,
  Policy,
  check_nonneg,
  global_norm,
  gsam_orthogonal_correction,
  is_real,
  looksam_direction,
  looksam_reuse,
  make_policy,
  policy_class,
  register_policy,
  tree_vdot,
)
from jaxsam.sam_schedule import AdaptiveRule, AdaptiveState, AscentSchedule  # noqa: F401

GradFn = Callable[[optax.Params], tuple[jax.Array, optax.Updates]]
VARIANTS = tuple(POLICIES)  # the built-in variants, in registration order


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
  schedule = AscentSchedule(start_step=start_step, accum_steps=accum_steps)
  on = None if schedule.always else schedule(schedule.opt_step(state.count))
  return POLICIES["msam"]().point(params, state.base_state, rho, eps, on=on)


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
    if not is_real(value) or not math.isfinite(value) or value < 0:
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


def _check_transform_args(base, rho, *, eps, sync, axis_name, ascent_weight_decay) -> None:
  """One-line ConfigErrors for the arguments every variant shares."""
  if not (hasattr(base, "init") and hasattr(base, "update")):
    raise ConfigError(f"sam base={base!r} is not an optax GradientTransformation")
  if not callable(rho) and (not is_real(rho) or not math.isfinite(rho) or rho < 0):
    raise ConfigError(
      f"sam rho={rho!r} is invalid; accepted: a finite float >= 0 or an optax schedule"
    )
  check_nonneg("eps", eps)
  check_nonneg("ascent_weight_decay", ascent_weight_decay)
  if not isinstance(sync, bool):
    raise ConfigError(f"sam sync={sync!r} is invalid; accepted: True or False")
  names_ok = isinstance(axis_name, str) or (
    isinstance(axis_name, tuple) and axis_name and all(isinstance(a, str) for a in axis_name)
  )
  if axis_name is not None and not names_ok:
    raise ConfigError(
      f"sam axis_name={axis_name!r} is invalid; accepted: None, an axis name or a tuple of names"
    )


def _pmean(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _fresh_state(base_state, policy_state) -> "SAMState":
  # A fresh array per field: a train state whose leaves share one buffer cannot be donated.
  zero = lambda: jnp.zeros((), jnp.float32)
  return SAMState(
    count=jnp.zeros((), jnp.int32),
    base_state=base_state,
    rho=zero(),
    clean_grad_norm=zero(),
    sam_grad_norm=zero(),
    cosine=zero(),
    perturbed_loss=jnp.full((), jnp.nan, jnp.float32),
    active=zero(),
    policy_state=policy_state,
  )


def _finish(base, g_final, state, params, extra_args, **diagnostics):
  """The base optimizer on the final gradient; updates in the params' dtypes, the new state."""
  updates, base_state = base.update(g_final, state.base_state, params, **extra_args)
  new_state = SAMState(
    count=optax.safe_int32_increment(state.count), base_state=base_state, **diagnostics
  )
  updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)  # no-op when equal
  return updates, new_state


def _one_pass(clean_norm, rho, active, policy_state, nan) -> dict:
  """The diagnostics of a step with no perturbed pass (rho = 0, or a one-gradient variant)."""
  return {
    "rho": rho,
    "clean_grad_norm": clean_norm,
    "sam_grad_norm": clean_norm,
    "cosine": jnp.ones((), jnp.float32),
    "perturbed_loss": nan,
    "active": active,
    "policy_state": policy_state,
  }


def _ascent_pass(
  grads,
  g_clean,
  clean_norm,
  params,
  rho,
  grad_fn,
  policy_state,
  *,
  policy,
  eps,
  sync,
  axis_name,
  weight_decay,
):
  """SAM's perturbed pass: (descent gradient, its norm, cosine, perturbed loss, policy state)."""
  # Per-device ascent (m-sharpness) unless sync; replicated params make pmean(g + wd*w) equal
  # pmean(g) + wd*w, so the averaged clean gradient is reused.
  g_ascent = g_clean if sync else grads
  if weight_decay:
    g_ascent = jax.tree.map(lambda g, p: g + weight_decay * p.astype(g.dtype), g_ascent, params)
  e_w = policy.perturb(g_ascent, params, rho, eps)
  perturbed = jax.tree.map(lambda p, e: p + e.astype(p.dtype), params, e_w)
  if axis_name is not None:
    perturbed = _as_device_local(perturbed, axis_name)
  loss_p, g_p = grad_fn(perturbed)
  g_sam = _pmean(g_p, axis_name)
  loss_p = _pmean(jnp.asarray(loss_p, jnp.float32), axis_name)
  sam_norm = global_norm(g_sam)
  cosine = tree_vdot(g_clean, g_sam) / (clean_norm * sam_norm + eps)
  g_final, policy_state = policy.descent(g_clean, g_sam, policy_state, eps)
  return g_final, sam_norm, cosine, loss_p, policy_state


def sam(
  base: optax.GradientTransformation,
  rho: float | optax.Schedule,
  *,
  variant: str = "sam",
  eps: float = 1e-12,
  sync: bool = False,
  axis_name: str | tuple[str, ...] | None = None,
  ascent_weight_decay: float = 0.0,
  every: int = 1,
  start_step: int = 0,
  total_steps: int = 0,
  accum_steps: int = 1,
  **options: Any,
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
  Which steps ascend is the variant's `AscentSchedule` (jaxsam.sam_schedule), the only place
  that rule lives. For the count-based schedules (every, start_step, LookSAM) the caller should
  pass `ascent=schedule(step)` from the host and compile one step per value: the branch not
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
    variant: a name in `POLICIES`: "sam", "asam", "gsam", "looksam", "aesam", "msam", or one
      registered with `register_policy`.
    eps: added to every global norm, so a zero gradient gives a zero perturbation, not NaN.
    sync: average the ascent gradient over `axis_name` (no m-sharpness). No effect without one.
    axis_name: the data-parallel axis when called inside `shard_map`, or a tuple of axes, e.g.
      (devices, ascent groups) with the groups of `sam.m` examples vmapped inside each device
      (JAX 0.10 mixes vmap-axis collectives with shard_map only under check_vma=False); None on
      a single device.
    ascent_weight_decay: adds this times w (every leaf) to the ascent gradient only, i.e. the L2
      term enters the ascent; the descent's weight decay is the base optimizer's business.
    every: the ascent on every k-th optimizer step (sam, asam, gsam, looksam); 1 = every step.
    start_step: optimizer steps before this one are base steps (any variant).
    total_steps: optimizer steps of the run (AE-SAM's c_t schedule; unused otherwise).
    accum_steps: updates per optimizer step (gradient accumulation in base).
    **options: the variant's own options (its policy's fields): eta and asam_mask (ASAM), alpha
      (GSAM: the weight of the orthogonal term), reuse_weight (LookSAM's alpha, the weight of the
      stored direction on in-between steps), adaptive_decay and adaptive_c (AE-SAM's EMA decay,
      and its threshold multiplier at step 0 and at total_steps). Another variant's option must
      stay at its default (eta excepted: always accepted, and ignored outside ASAM).

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
  _check_transform_args(
    base, rho, eps=eps, sync=sync, axis_name=axis_name, ascent_weight_decay=ascent_weight_decay
  )
  policy = make_policy(variant, **options)
  schedule = policy.schedule(
    every=every, start_step=start_step, total_steps=total_steps, accum_steps=accum_steps
  )
  base = optax.with_extra_args_support(base)
  static_zero = not callable(rho) and rho == 0  # resolved at trace time: the base step alone
  nan = jnp.full((), jnp.nan, jnp.float32)  # the diagnostics of a pass not taken
  ascent_pass = functools.partial(
    _ascent_pass,
    policy=policy,
    eps=eps,
    sync=sync,
    axis_name=axis_name,
    weight_decay=ascent_weight_decay,
  )

  def init_fn(params):
    return _fresh_state(base.init(params), () if static_zero else policy.init(params))

  def update_fn(grads, state, params=None, *, grad_fn: GradFn | None = None, ascent=None, **extra):
    if params is None:
      raise TypeError("sam.update needs params (the weights to perturb)")
    g_clean = _pmean(grads, axis_name)
    clean_norm = global_norm(g_clean)
    finish = functools.partial(_finish, base, state=state, params=params, extra_args=extra)
    if static_zero:  # plain one-pass step: the base on the averaged clean gradient
      zero = jnp.zeros((), jnp.float32)
      return finish(g_clean, **_one_pass(clean_norm, zero, zero, state.policy_state, nan))
    opt_step = schedule.opt_step(state.count)
    rho_t = jnp.asarray(rho(opt_step) if callable(rho) else rho, jnp.float32)
    if not policy.two_pass:  # the caller took `grads` at its point (msam_point): no second pass
      on = True if schedule.always else schedule(opt_step)
      active = jnp.ones((), jnp.float32) if on is True else on.astype(jnp.float32)
      diagnostics = _one_pass(clean_norm, rho_t * active, active, state.policy_state, nan)
      return finish(g_clean, **diagnostics)
    if grad_fn is None:
      raise TypeError("sam.update needs grad_fn=params -> (loss, grads) when rho is not a static 0")
    if ascent is not None and schedule.host_decides:  # the caller's host-side choice
      take, policy_state = bool(ascent), state.policy_state
    else:
      take, policy_state = schedule.decide(opt_step, clean_norm, state.policy_state)
    sam_side = lambda ps: ascent_pass(grads, g_clean, clean_norm, params, rho_t, grad_fn, ps)
    base_side = lambda ps: (policy.between(g_clean, ps, eps), nan, nan, nan, ps)
    if isinstance(take, bool):
      out = (sam_side if take else base_side)(policy_state)
    else:
      out = jax.lax.cond(take, sam_side, base_side, policy_state)
    g_final, sam_norm, cosine, loss_p, policy_state = out
    active = (
      jnp.asarray(float(take), jnp.float32) if isinstance(take, bool) else take.astype(jnp.float32)
    )
    return finish(
      g_final,
      rho=rho_t,
      clean_grad_norm=clean_norm,
      sam_grad_norm=sam_norm,
      cosine=cosine,
      perturbed_loss=loss_p,
      active=active,
      policy_state=policy_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
