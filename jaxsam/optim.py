"""The one place that turns a config into an optax chain: schedule, base optimizer, SAM.

SGD follows torch.optim.SGD exactly (the original project's optimizer): weight decay is coupled L2
added to the gradient before momentum, clipping (when on) acts on the averaged loss gradient first.
AdamW follows torch.optim.AdamW with decay only on kernels (`decay_mask`), as timm and big_vision.
"""

import math
from collections.abc import Callable

import jax
import ml_collections
import optax

from jaxsam import errors, parallel, state, steps
from jaxsam import sam as sam_lib


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Learning rate per step: optional linear warmup from 0, then cosine to 0 or constant."""
  peak = config.optimizer.learning_rate
  total_steps = schedule_steps(config, steps_per_epoch)
  warmup_steps = int(config.schedule.warmup_epochs * steps_per_epoch)
  name = config.schedule.name
  if name not in SCHEDULES:
    raise errors.ConfigError(
      f"schedule.name={name!r} is unknown; known: {', '.join(sorted(SCHEDULES))}"
    )
  main = SCHEDULES[name](peak, max(1, total_steps - warmup_steps))
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


SCHEDULES: dict[str, Callable[[float, int], optax.Schedule]] = {
  "cosine": lambda peak, steps: optax.cosine_decay_schedule(peak, steps),
  "constant": lambda peak, steps: optax.constant_schedule(peak),
}


def _sgd(opt: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  # add_decayed_weights before sgd == torch's `d_p = d_p.add(p, alpha=weight_decay)`.
  return optax.chain(
    optax.add_decayed_weights(opt.weight_decay) if opt.weight_decay else optax.identity(),
    optax.sgd(lr, momentum=opt.momentum or None, nesterov=opt.nesterov),
  )


# Leaves AdamW never decays, by name: biases, norm scales, ViT's position embeddings and class
# token (as timm's `param.ndim <= 1 or no_weight_decay()` and big_vision's kernel-only decay).
NO_DECAY_NAMES = ("bias", "scale", "pos_embedding", "cls")


def decay_mask(params):
  """True for the leaves weight decay applies to: kernels (ndim >= 2) not named in NO_DECAY_NAMES.

  By name as well as rank: attention biases have shape (heads, head_dim)."""

  def decays(path, leaf) -> bool:
    name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
    return leaf.ndim >= 2 and name not in NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, params)


def _adamw(opt: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  # Decoupled decay (Loshchilov & Hutter; torch.optim.AdamW): p -= lr * (adam + wd * p), masked.
  return optax.adamw(lr, weight_decay=opt.weight_decay, mask=decay_mask)


OPTIMIZERS = {"sgd": _sgd, "adamw": _adamw}


def make_base_optimizer(
  config: ml_collections.ConfigDict, lr: optax.Schedule
) -> optax.GradientTransformation:
  """Clipping (optional) followed by the named optimizer, with the given lr schedule."""
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise errors.ConfigError(
      f"optimizer.name={opt.name!r} is unknown; known: {', '.join(sorted(OPTIMIZERS))}"
    )
  if opt.grad_clip_norm < 0:
    raise errors.ConfigError(f"optimizer.grad_clip_norm={opt.grad_clip_norm} must be >= 0")
  base = OPTIMIZERS[opt.name](opt, lr)
  if opt.grad_clip_norm:
    base = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), base)
  return base


def make_rho(
  config: ml_collections.ConfigDict, lr: optax.Schedule, steps_per_epoch: int
) -> float | optax.Schedule:
  """SAM's radius: constant, or (GSAM) following the lr schedule from rho down to sam.rho_min."""
  if not sam_lib.policy_class(config.sam.variant).rho_follows_lr or not config.sam.rho:
    return float(config.sam.rho)
  total_steps = max(1, int(config.num_epochs * steps_per_epoch))
  lr_values = [float(lr(s)) for s in range(0, total_steps + 1, max(1, total_steps // 1000))]
  return sam_lib.gsam_rho_schedule(
    lr,
    lr_max=max(lr_values),
    lr_min=min(lr_values),
    rho_max=config.sam.rho,
    rho_min=config.sam.rho_min,
  )


def schedule_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Optimizer steps the lr schedule spans (num_epochs of them; max_steps only stops early)."""
  return max(1, int(config.num_epochs * steps_per_epoch))


def sam_start_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The first optimizer step of late-phase SAM: ceil(sam.start_fraction * schedule steps)."""
  frac = config.sam.start_fraction
  if not isinstance(frac, (int, float)) or not 0 <= frac < 1:
    raise errors.ConfigError(f"sam.start_fraction={frac!r} is invalid; accepted: 0 <= f < 1")
  return math.ceil(frac * schedule_steps(config, steps_per_epoch))


def accum_steps(config: ml_collections.ConfigDict, per_device_batch: int) -> int:
  """Micro-batches per optimizer step; each must hold a whole number of examples per device."""
  n = config.accum_steps
  if not isinstance(n, int) or n < 1 or per_device_batch % n:
    raise errors.ConfigError(
      f"accum_steps={n!r} is invalid; accepted: an integer >= 1 that divides the per-device "
      f"batch {per_device_batch}"
    )
  return n


def _check_momentum(config: ml_collections.ConfigDict) -> None:
  opt, variant = config.optimizer, config.sam.variant
  needs = sam_lib.policy_class(variant).needs_momentum
  if needs and config.sam.rho and (opt.name != "sgd" or not opt.momentum):
    raise errors.ConfigError(
      f"sam.variant={variant!r} perturbs along SGD's momentum buffer; got optimizer.name="
      f"{opt.name!r} momentum={opt.momentum!r}; use optimizer.name='sgd' with momentum > 0"
    )


def sam_options(config: ml_collections.ConfigDict) -> dict:
  """The variants' own options from sam.* (each variant takes its own; the others stay at their
  defaults, which sam() checks)."""
  s = config.sam
  return {
    "eta": s.eta,
    "alpha": s.alpha,
    "reuse_weight": s.reuse_weight,
    "adaptive_decay": s.adaptive_decay,
    "adaptive_c": (s.adaptive_c_start, s.adaptive_c_end),
  }


def _schedule_args(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict:
  """The count-based schedule's settings: sam.every, sam.start_fraction, the run's length."""
  return {
    "every": config.sam.every,
    "start_step": sam_start_step(config, steps_per_epoch),
    "total_steps": schedule_steps(config, steps_per_epoch),
    "accum_steps": config.accum_steps,
  }


def make_optimizer(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  *,
  axis_name: str | tuple[str, ...] | None,
) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
  """The full optimizer: SAM around the base chain (rho = 0 compiles the plain one-pass step).

  With accum_steps = n the base is optax.MultiSteps: the compiled step calls `update` once per
  micro-batch, and the base optimizer steps once, on the mean of the n SAM gradients.
  """
  lr = make_schedule(config, steps_per_epoch)
  base = make_base_optimizer(config, lr)
  n = config.accum_steps
  if n > 1:
    base = optax.MultiSteps(base, every_k_schedule=n).gradient_transformation()
  s = config.sam
  _check_momentum(config)
  tx = sam_lib.sam(
    base,
    make_rho(config, lr, steps_per_epoch),
    variant=s.variant,
    eps=s.eps,
    sync=s.sync,
    axis_name=axis_name,
    ascent_weight_decay=config.optimizer.weight_decay if s.ascent_weight_decay else 0.0,
    **_schedule_args(config, steps_per_epoch),
    **sam_options(config),
  )
  return tx, lr


def ascent_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> sam_lib.AscentSchedule:
  """The config's AscentSchedule: which optimizer steps take SAM's ascent (the one rule; the
  transform built by make_optimizer uses the same)."""
  policy = sam_lib.make_policy(config.sam.variant, **sam_options(config))
  return policy.schedule(**_schedule_args(config, steps_per_epoch))


def host_ascent_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> sam_lib.AscentSchedule | None:
  """The AscentSchedule (step -> whether it is a SAM step) where the loop picks the SAM or the base
  program on the host: the count-based schedules (sam.every, start_fraction, LookSAM). None where
  every step is the same program (SGD, plain SAM, a one-gradient variant such as MSAM) or the
  choice is made on the device (an adaptive rule: AE-SAM)."""
  if not config.sam.rho or not sam_lib.policy_class(config.sam.variant).two_pass:
    return None
  schedule = ascent_schedule(config, steps_per_epoch)
  return schedule if schedule.host_decides else None


def _group_size(config: ml_collections.ConfigDict, micro: int, *, ascent: bool) -> int:
  """Examples per group of the step (own ascent and own batch-norm statistics): SAM's sam.m when
  it takes a per-group ascent, else model.ghost_batch_size (batch norm only); 0 = not split."""
  ghost = config.model.ghost_batch_size
  if not ascent:
    return steps.group_size(ghost, micro, key="model.ghost_batch_size") if ghost else 0
  group = steps.group_size(config.sam.m, micro)
  if ghost and ghost != group:
    raise errors.ConfigError(
      f"model.ghost_batch_size={ghost} differs from SAM's group of {group} (sam.m={config.sam.m}):"
      f" SAM's groups set batch norm's; accepted: 0 or {group}"
    )
  return group


def step_sam_settings(
  config: ml_collections.ConfigDict, per_device_batch: int, steps_per_epoch: int
) -> dict:
  """The SAM fields of state.StepConfig: ascent group size, micro-batches and, for a one-gradient
  variant (MSAM), where its gradient is taken.

  The group size (sam.m, default the micro-batch) is checked against the per-device micro-batch,
  since each micro-batch is split into groups the way a batch is without accumulation.
  """
  n = accum_steps(config, per_device_batch)
  micro = per_device_batch // n
  rho = config.sam.rho
  msam = not sam_lib.policy_class(config.sam.variant).two_pass and bool(rho)
  return {
    "group_size": _group_size(config, micro, ascent=bool(rho) and not msam),
    "accum_steps": n,
    "msam_rho": float(rho) if msam else 0.0,
    "msam_start_step": sam_start_step(config, steps_per_epoch) if msam else 0,
  }


def sam_axis_name(step_config: state.StepConfig, per_device_batch: int):
  """The collective axes SAM averages over: devices, plus the vmapped groups when sam.m splits a
  micro-batch."""
  micro = per_device_batch // step_config.accum_steps
  if step_config.group_size and step_config.group_size < micro:
    return (parallel.DATA_AXIS, steps.GROUP_AXIS)
  return parallel.DATA_AXIS
