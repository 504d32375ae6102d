"""The compiled train and eval steps: on-device preprocessing, SAM with BN-safe passes, metrics.

Each step runs per device inside `jax.shard_map` over the data axis, because SAM's semantics are
per device: every device (or every group of `sam.m` examples) ascends along its own gradient
(m-sharpness), BatchNorm normalises with its own batch statistics (as torch DDP without SyncBN),
and only the final SAM gradient, the BN running statistics and the metrics are averaged.
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from jaxsam import errors, losses
from jaxsam import sam as sam_lib
from jaxsam.data import sources
from jaxsam.parallel import DATA_AXIS
from jaxsam.state import StepConfig, TrainState

GROUP_AXIS = "sam_group"
IMAGENET_MEAN, IMAGENET_STD = sources.IMAGENET_MEAN, sources.IMAGENET_STD
# Keras' "caffe" input (its ResNet50 weights): BGR, the caffe mean subtracted on 0-255, no scaling;
# on the 0-1 scale that is this BGR mean and a std of 1/255.
CAFFE_MEAN_BGR = (103.939 / 255, 116.779 / 255, 123.68 / 255)
CAFFE_STD = (1 / 255,) * 3
# timm's "inception" mean/std (0-1 RGB to [-1, 1]): the ViT weights of timm, AugReg and SAM.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def group_size(size: int, per_device_batch: int, key: str = "sam.m") -> int:
  """Examples per group of a step (`sam.m` or `model.ghost_batch_size`, named by `key`), or the
  per-device batch when size = 0."""
  if size < 0 or (size and per_device_batch % size):
    raise errors.ConfigError(
      f"{key}={size} must be 0 (the per-device batch) or divide the per-device batch "
      f"{per_device_batch}"
    )
  return size or per_device_batch


def preprocess(images: jax.Array, cfg: StepConfig) -> jax.Array:
  """uint8 NHWC at native size -> normalised float at `image_size`, on device (bilinear upscale).

  Upscaling here instead of on the host moves 49x fewer bytes at 32 -> 224 px.
  """
  x = images.astype(jnp.float32) / 255.0
  n, h, w, c = x.shape
  if (h, w) != (cfg.image_size, cfg.image_size):
    x = jax.image.resize(x, (n, cfg.image_size, cfg.image_size, c), method="bilinear")
  if cfg.bgr:
    x = x[..., ::-1]
  x = (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)
  return x.astype(cfg.dtype)


def _loss_fn(
  params, batch_stats, images, labels, dropout_key, *, model: nn.Module, cfg: StepConfig
):
  """Mean cross-entropy of one forward pass in train mode; aux = (logits, new BN statistics)."""
  logits, new_vars = model.apply(
    {"params": params, "batch_stats": batch_stats},
    images,
    train=True,
    mutable=["batch_stats"],
    rngs={"dropout": dropout_key},
  )
  loss = jnp.mean(losses.cross_entropy(logits, labels, cfg.label_smoothing))
  return loss, (logits, new_vars.get("batch_stats", {}))


def _group_update(
  state: TrainState,
  opt_state,
  images,
  labels,
  dropout_key,
  *,
  model,
  tx,
  cfg,
  axis_names,
  perturbed: list,
  ascent: bool | None,
):
  """One `tx.update` from one ascent group: clean pass, SAM's perturbed pass (if taken), updates.

  Returns (updates, new BN statistics, optimizer state, metrics); the weights are not applied, so
  micro-batches of one accumulated step all see the same weights. `perturbed` gets an entry when
  tracing takes the perturbed pass (never with a static rho = 0 or MSAM).
  """
  loss_fn = functools.partial(_loss_fn, model=model, cfg=cfg)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  at = state.params
  if cfg.msam_rho:  # MSAM's one pass, at the weights moved against the momentum
    at = sam_lib.msam_point(
      state.params,
      opt_state,
      cfg.msam_rho,
      start_step=cfg.msam_start_step,
      accum_steps=cfg.accum_steps,
    )
  (loss, (logits, new_stats)), grads = grad_fn(at, state.batch_stats, images, labels, dropout_key)

  def perturbed_grad(params):
    # Same batch, same dropout key; batch statistics normalise this pass, but its BN running
    # statistics are discarded: only the clean pass updates them.
    perturbed.append(True)
    (p_loss, _), p_grads = grad_fn(params, state.batch_stats, images, labels, dropout_key)
    return p_loss, p_grads

  updates, opt_state = tx.update(
    grads, opt_state, state.params, grad_fn=perturbed_grad, ascent=ascent
  )
  batch_stats = jax.lax.pmean(new_stats, axis_names)
  metrics = {"train/loss": loss, "train/accuracy": jnp.mean(losses.correct_top1(logits, labels))}
  metrics = jax.lax.pmean(metrics, axis_names)
  # Already the same on every device and group; a host-scheduled base step logs them too (NaN
  # where there was no ascent), so that both programs return the same metrics.
  if cfg.msam_rho or perturbed or ascent is not None:
    metrics.update(sam_metrics(opt_state))
  return updates, batch_stats, opt_state, metrics


def _device_update(state: TrainState, opt_state, images, labels, key, *, cfg, **kwargs):
  """One `tx.update` on this device's (micro-)batch, split into sam.m ascent groups if set."""
  update = functools.partial(_group_update, cfg=cfg, **kwargs)
  per_device = images.shape[0]
  group = cfg.group_size or per_device
  if group == per_device:
    return update(state, opt_state, images, labels, key, axis_names=DATA_AXIS)
  # sam.m < per-device batch: each group of m examples acts as a device would (own ascent, own
  # BN batch statistics). vmap keeps one compiled step; it costs one copy of the perturbed
  # weights and gradients per group, and per-group weight gradients (grouped convolutions).
  num_groups = per_device // group
  split = lambda x: x.reshape((num_groups, group) + x.shape[1:])
  keys = jax.random.split(key, num_groups)
  vmapped = jax.vmap(
    lambda im, lb, k: update(state, opt_state, im, lb, k, axis_names=(DATA_AXIS, GROUP_AXIS)),
    axis_name=GROUP_AXIS,
  )
  outs = vmapped(split(images), split(labels), keys)
  return jax.tree.map(lambda x: x[0], outs)


def _accumulated_update(state: TrainState, images, labels, key, *, cfg, **kwargs):
  """`cfg.accum_steps` micro-batches in a lax.scan: each makes its own ascent and BN statistics.

  The optimizer (optax.MultiSteps inside SAM) emits the weight update on the last micro-batch;
  BN statistics and metrics are the mean over micro-batches. Only one micro-batch's activations
  are live at a time, which is the memory it saves.
  """
  n = cfg.accum_steps
  update = functools.partial(_device_update, cfg=cfg, **kwargs)
  if n == 1:
    return update(state, state.opt_state, images, labels, key)
  micro = lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:])
  xs = (micro(images), micro(labels), jax.random.split(key, n))
  shapes = jax.eval_shape(
    lambda im, lb, k: update(state, state.opt_state, im, lb, k), *jax.tree.map(lambda x: x[0], xs)
  )
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[1], shapes[3]))

  def body(carry, x):
    opt_state, (_, stats_sum, metrics_sum) = carry
    updates, stats, opt_state, metrics = update(state, opt_state, *x)
    sums = jax.tree.map(jnp.add, (stats_sum, metrics_sum), (stats, metrics))
    return (opt_state, (updates, *sums)), None

  (opt_state, (updates, stats_sum, metrics_sum)), _ = jax.lax.scan(
    body, (state.opt_state, zeros), xs
  )
  mean = lambda tree: jax.tree.map(lambda x: x / n, tree)
  return updates, mean(stats_sum), opt_state, mean(metrics_sum)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformationExtraArgs,
  lr_schedule: optax.Schedule,
  cfg: StepConfig,
  ascent: bool | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step (SAM, a cheaper variant, or plain when rho = 0) on this device's slice.

  `ascent`: a host-side choice for the count-based SAM schedules (see jaxsam.sam.sam); None lets
  the transform decide. Metrics: train loss and accuracy, lr, and SAM's `sam/*` diagnostics only
  when SAM is on (`sam/active`: the fraction of this step's updates that took the ascent).
  """
  images = preprocess(batch["image"], cfg)
  labels = batch["label"]
  device = jax.lax.axis_index(DATA_AXIS)
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device)
  perturbed = []
  updates, batch_stats, opt_state, metrics = _accumulated_update(
    state, images, labels, key, model=model, tx=tx, cfg=cfg, perturbed=perturbed, ascent=ascent
  )
  if perturbed or ascent is not None:
    metrics["sam/gap"] = metrics["sam/perturbed_loss"] - metrics["train/loss"]
  metrics["lr"] = lr_schedule(state.step)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  return new_state, metrics


def sam_metrics(opt_state) -> dict[str, jax.Array]:
  """SAM's diagnostics of the last update, as recorded in its state (see jaxsam.sam.SAMState).

  On a step that skipped the ascent, the perturbed loss, SAM gradient norm and cosine are NaN.
  """
  return {
    "sam/active": opt_state.active,
    "sam/rho": opt_state.rho,
    "sam/perturbed_loss": opt_state.perturbed_loss,
    "sam/clean_grad_norm": opt_state.clean_grad_norm,
    "sam/grad_norm": opt_state.sam_grad_norm,
    "sam/cosine": opt_state.cosine,
  }


def eval_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  totals: dict[str, jax.Array],
  *,
  model: nn.Module,
  cfg: StepConfig,
) -> dict[str, jax.Array]:
  """`totals` plus the masked sums (loss, top-1, top-5, per class) over the global batch; BN in
  inference mode.

  Carrying the totals through the step chains each batch's program to the one before, so no
  device runs ahead with several evaluations waiting at their all-reduce. On CPU devices such
  waits hold threads of XLA's intra-op pool (as many as the cores), which the other devices need
  to reach the all-reduce: independent programs in flight can deadlock there.
  """
  images = preprocess(batch["image"], cfg)
  logits = model.apply(
    {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
  )
  sums = jax.lax.psum(losses.eval_sums(logits, batch["label"], batch["mask"]), DATA_AXIS)
  return jax.tree.map(jnp.add, totals, sums)


def compile_train_step(mesh: Mesh, **kwargs):
  """jit(shard_map(train_step)): state replicated, batch sharded over the data axis, donated."""
  fn = functools.partial(train_step, **kwargs)
  sharded = jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
    out_specs=(PartitionSpec(), PartitionSpec()),
    check_vma=False,
  )
  return jax.jit(sharded, donate_argnums=0)


def compile_scheduled_train_step(
  mesh: Mesh, schedule: Callable[[int], bool] | None, wrap: Callable | None = None, **kwargs
):
  """A train step `(state, batch, step)` that runs, for step `step`, the compiled SAM step or the
  compiled base step as the host-side `schedule` says (an AscentSchedule, see
  optim.host_ascent_schedule: one program each, compiled on first use, neither with a branch);
  with no schedule, the one step of `compile_train_step`. `wrap`, when given, turns each jitted
  step into the program the loop calls (the device input fused in)."""
  wrap = wrap or (lambda step: step)
  if schedule is None:
    single = wrap(compile_train_step(mesh, **kwargs))
    return lambda state, batch, step: single(state, batch)
  compiled = {
    ascent: wrap(compile_train_step(mesh, ascent=ascent, **kwargs)) for ascent in (True, False)
  }
  return lambda state, batch, step: compiled[bool(schedule(step))](state, batch)


def compile_eval_step(mesh: Mesh, **kwargs):
  """jit(shard_map(eval_step)): (state, batch, totals) -> replicated totals; totals donated."""
  fn = functools.partial(eval_step, **kwargs)
  sharded = jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS), PartitionSpec()),
    out_specs=PartitionSpec(),
    check_vma=False,
  )
  return jax.jit(sharded, donate_argnums=2)
