"""Sharpness-Aware Minimization as an optax transform: one `update` call is one whole SAM step.

Pure: no config, no flax, no devices beyond an optional collective axis name. The second
(perturbed) gradient comes in through the `grad_fn` extra argument, so the clean pass, the ascent,
the perturbed pass and the base optimizer all live in one jit-compiled train step.
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
      caller's to log).
  """

  count: jax.Array
  base_state: optax.OptState
  rho: jax.Array
  clean_grad_norm: jax.Array
  sam_grad_norm: jax.Array
  cosine: jax.Array
  perturbed_loss: jax.Array


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


# Registry of ascent rules; GSAM ascends as SAM and differs only in the descent gradient.
_ASCENTS = {"sam": _sam_ascent, "asam": _asam_ascent, "gsam": _sam_ascent}
VARIANTS = tuple(_ASCENTS)


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


def gsam_rho_schedule(
  lr_schedule: optax.Schedule | float,
  lr_max: float,
  lr_min: float,
  rho_max: float,
  rho_min: float,
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
    variant: "sam", "asam" or "gsam".
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
    `optax.contrib.sam` (the opaque mode with sync_period=2 is this transform's plain SAM).
  """
  if not (hasattr(base, "init") and hasattr(base, "update")):
    raise ConfigError(f"sam base={base!r} is not an optax GradientTransformation")
  if not callable(rho) and (not _is_real(rho) or not math.isfinite(rho) or rho < 0):
    raise ConfigError(
      f"sam rho={rho!r} is invalid; accepted: a finite float >= 0 or an optax schedule"
    )
  if variant not in _ASCENTS:
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
  names_ok = isinstance(axis_name, str) or (
    isinstance(axis_name, tuple) and axis_name and all(isinstance(a, str) for a in axis_name)
  )
  if axis_name is not None and not names_ok:
    raise ConfigError(
      f"sam axis_name={axis_name!r} is invalid; accepted: None, an axis name or a tuple of names"
    )

  base = optax.with_extra_args_support(base)
  ascent = _ASCENTS[variant]
  static_zero = not callable(rho) and rho == 0
  f32 = jnp.float32

  def pmean(tree):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

  def init_fn(params):
    zero = jnp.zeros((), f32)
    return SAMState(
      count=jnp.zeros((), jnp.int32),
      base_state=base.init(params),
      rho=zero,
      clean_grad_norm=zero,
      sam_grad_norm=zero,
      cosine=zero,
      perturbed_loss=jnp.full((), jnp.nan, f32),
    )

  def to_param_dtype(updates, params):
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)  # no-op when equal

  def update_fn(grads, state, params=None, *, grad_fn: GradFn | None = None, **extra_args):
    if params is None:
      raise TypeError("sam.update needs params (the weights to perturb)")
    g_clean = pmean(grads)
    clean_norm = global_norm(g_clean)
    count = optax.safe_int32_increment(state.count)

    if static_zero:
      # Plain one-pass step: the base on the averaged clean gradient, nothing else in the graph.
      updates, base_state = base.update(g_clean, state.base_state, params, **extra_args)
      new_state = SAMState(
        count=count,
        base_state=base_state,
        rho=jnp.zeros((), f32),
        clean_grad_norm=clean_norm,
        sam_grad_norm=clean_norm,
        cosine=jnp.ones((), f32),
        perturbed_loss=jnp.full((), jnp.nan, f32),
      )
      return to_param_dtype(updates, params), new_state

    if grad_fn is None:
      raise TypeError("sam.update needs grad_fn=params -> (loss, grads) when rho is not a static 0")
    rho_t = jnp.asarray(rho(state.count) if callable(rho) else rho, f32)

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

    updates, base_state = base.update(g_final, state.base_state, params, **extra_args)
    new_state = SAMState(
      count=count,
      base_state=base_state,
      rho=rho_t,
      clean_grad_norm=clean_norm,
      sam_grad_norm=sam_norm,
      cosine=cosine,
      perturbed_loss=loss_p,
    )
    return to_param_dtype(updates, params), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
