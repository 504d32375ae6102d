"""optim: peer checks against torch (SGD, AdamW, clipping, cosine lr), GSAM's rho, config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import common
from jaxsam import errors, optim

SHAPES = {"conv": (3, 3, 4, 8), "bias": (8,), "dense": (8, 5)}
NUM_STEPS = 6
# Params are ~N(0, 1), |w| < 5: one fp32 rounding of w + update is up to 2 ** -21 ~ 4.8e-7 absolute,
# which is a large relative error where the update nearly cancels w, hence the absolute floor.
ATOL = 1e-6


def make_config(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False, clip=0.0):
  config = common.get_base_config()
  config.optimizer.name = name
  config.optimizer.learning_rate = lr
  config.optimizer.momentum = momentum
  config.optimizer.weight_decay = weight_decay
  config.optimizer.nesterov = nesterov
  config.optimizer.grad_clip_norm = clip
  config.schedule.name = "constant"
  return config


def random_problem(grad_scale=1.0, seed=0):
  """fp32 params and NUM_STEPS gradients per leaf (the same numbers go to jax and torch)."""
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [
    {k: (grad_scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    for _ in range(NUM_STEPS)
  ]
  return params, grads


def run_ours(tx, params, grads):
  """Per-step params of the optax transform fed the given gradients (no jit: eager fp32 ops)."""
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  history = []
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
    history.append(jax.tree.map(np.asarray, p))
  return history


def run_torch(make_opt, params, grads, clip=0.0):
  """Per-step params of a torch optimizer; `clip` > 0 applies clip_grad_norm_ before each step."""
  tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
  opt = make_opt(list(tp.values()))
  history = []
  for g in grads:
    for k, p in tp.items():
      p.grad = torch.from_numpy(g[k].copy())
    if clip:
      torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
    opt.step()
    history.append({k: p.detach().numpy().copy() for k, p in tp.items()})
  return history


def assert_histories_close(ours, theirs, rtol, atol):
  for step, (a, b) in enumerate(zip(ours, theirs)):
    for k in SHAPES:
      np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"step {step} {k}")


def constant_lr(config):
  return optim.make_schedule(config, steps_per_epoch=10)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_equals_torch_sgd_with_coupled_weight_decay(nesterov):
  config = make_config(nesterov=nesterov)
  params, grads = random_problem()
  ours = run_ours(optim.make_base_optimizer(config, constant_lr(config)), params, grads)
  theirs = run_torch(
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=nesterov),
    params,
    grads,
  )
  assert_histories_close(ours, theirs, rtol=1e-6, atol=ATOL)
  # Not vacuous: the parameters moved by far more than the tolerance.
  assert np.max(np.abs(ours[-1]["dense"] - params["dense"])) > 0.1


def test_weight_decay_is_coupled_not_decoupled():
  """With zero gradients SGD still decays: momentum carries lr * wd * w, as torch's L2 does."""
  config = make_config(weight_decay=0.1)
  params, grads = random_problem()
  zeros = [jax.tree.map(np.zeros_like, g) for g in grads]
  ours = run_ours(optim.make_base_optimizer(config, constant_lr(config)), params, zeros)
  theirs = run_torch(
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1), params, zeros
  )
  assert_histories_close(ours, theirs, rtol=1e-6, atol=ATOL)
  assert np.all(np.abs(ours[-1]["bias"]) < np.abs(params["bias"]))


def test_clipping_acts_before_weight_decay_as_torch_clip_grad_norm():
  """Big gradients: torch's clip_grad_norm_(1.0) then SGD(wd) step == our chain."""
  config = make_config(clip=1.0, weight_decay=1e-2)
  params, grads = random_problem(grad_scale=10.0)
  ours = run_ours(optim.make_base_optimizer(config, constant_lr(config)), params, grads)
  theirs = run_torch(
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2), params, grads, clip=1.0
  )
  # torch divides by (norm + 1e-6): a relative difference of ~1e-6 / norm (norm ~ 100 here).
  assert_histories_close(ours, theirs, rtol=1e-6, atol=ATOL)
  # Clipping after the decay (the wrong order) would give a measurably different trajectory.
  wrong = optax.chain(
    optax.add_decayed_weights(1e-2), optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)
  )
  wrong_hist = run_ours(wrong, params, grads)
  assert np.max(np.abs(wrong_hist[-1]["conv"] - theirs[-1]["conv"])) > 1e-4


def test_adamw_equals_torch_adamw_with_no_decay_on_biases():
  """timm's param groups: decay on the conv and dense kernels, none on the bias."""
  config = make_config(name="adamw", lr=1e-2, weight_decay=0.05)
  params, grads = random_problem()
  ours = run_ours(optim.make_base_optimizer(config, constant_lr(config)), params, grads)

  def torch_adamw(ps):
    conv, bias, dense = ps  # SHAPES' order
    groups = [{"params": [conv, dense]}, {"params": [bias], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05, eps=1e-8)

  theirs = run_torch(torch_adamw, params, grads)
  assert_histories_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_adamw_decay_mask_of_a_vit_is_kernels_only():
  """Hand-listed: on ViT's variables the decay takes every kernel and nothing else."""
  from jaxsam.models import vit  # here: the other tests need no model

  module = vit.ViT(num_classes=3, patch=4, width=12, depth=1, heads=2, mlp=8)
  shapes = jax.eval_shape(
    lambda: module.init({"params": jax.random.key(0)}, jnp.zeros((1, 8, 8, 3)), train=False)
  )
  mask = optim.decay_mask(shapes["params"])
  flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  block = "Transformer/encoderblock_0"
  attn = f"{block}/MultiHeadDotProductAttention_1"
  decayed = {
    "embedding/kernel",
    f"{attn}/query/kernel",
    f"{attn}/key/kernel",
    f"{attn}/value/kernel",
    f"{attn}/out/kernel",
    f"{block}/MlpBlock_3/Dense_0/kernel",
    f"{block}/MlpBlock_3/Dense_1/kernel",
    "head/kernel",
  }
  not_decayed = {
    "cls",
    "embedding/bias",
    "Transformer/posembed_input/pos_embedding",
    *(f"{attn}/{p}/bias" for p in ("query", "key", "value", "out")),
    *(f"{block}/{ln}/{p}" for ln in ("LayerNorm_0", "LayerNorm_2") for p in ("scale", "bias")),
    f"{block}/MlpBlock_3/Dense_0/bias",
    f"{block}/MlpBlock_3/Dense_1/bias",
    "Transformer/encoder_norm/scale",
    "Transformer/encoder_norm/bias",
    "head/bias",
  }
  assert set(flat) == decayed | not_decayed
  assert {k for k, v in flat.items() if v} == decayed
  # And the chain honours it: with a zero gradient only the kernels move.
  params = jax.tree.map(lambda s: jnp.ones(s.shape), shapes["params"])
  tx = optim.make_base_optimizer(make_config(name="adamw", lr=0.1, weight_decay=0.5), lambda s: 0.1)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  moved = {
    "/".join(k.key for k in path)
    for path, u in jax.tree_util.tree_leaves_with_path(updates)
    if float(jnp.abs(u).max()) > 0
  }
  assert moved == decayed


def torch_lrs(make_scheduler, peak, steps):
  """lr used at each step 0..steps-1 by a torch scheduler stepped once per optimizer step."""
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
  scheduler = make_scheduler(opt)
  lrs = []
  for _ in range(steps):
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    scheduler.step()
  return np.array(lrs)


def test_cosine_schedule_equals_torch_cosine_annealing():
  config = make_config(lr=0.1)
  config.schedule.name = "cosine"
  config.num_epochs = 3
  steps_per_epoch = 17
  total = 3 * steps_per_epoch
  schedule = optim.make_schedule(config, steps_per_epoch)
  ours = np.array([float(schedule(s)) for s in range(total)])
  theirs = torch_lrs(
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total), 0.1, total
  )
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-8)
  assert float(schedule(total)) == pytest.approx(0.0, abs=1e-8)


def test_warmup_is_linear_from_zero_then_cosine_as_torch():
  config = make_config(lr=0.2)
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 1.0
  config.num_epochs = 4
  steps_per_epoch = 10
  warmup, total = 10, 40
  schedule = optim.make_schedule(config, steps_per_epoch)
  ours = np.array([float(schedule(s)) for s in range(total)])

  def torch_schedule(opt):
    # torch's LinearLR refuses start_factor 0, so the linear warmup from 0 is a LambdaLR.
    ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warmup)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup)
    return torch.optim.lr_scheduler.SequentialLR(opt, [ramp, cosine], milestones=[warmup])

  theirs = torch_lrs(torch_schedule, 0.2, total)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-8)
  assert ours[0] == 0.0 and ours[warmup] == pytest.approx(0.2, rel=1e-6)


def test_constant_schedule_is_constant():
  schedule = optim.make_schedule(make_config(lr=0.3), steps_per_epoch=5)
  assert [float(schedule(s)) for s in (0, 7, 10_000)] == pytest.approx([0.3] * 3)


def test_unknown_optimizer_lists_known_names():
  config = make_config(name="lamb")
  with pytest.raises(errors.ConfigError, match=r"'lamb'.*adamw, sgd"):
    optim.make_base_optimizer(config, constant_lr(config))


def test_unknown_schedule_lists_known_names():
  config = make_config()
  config.schedule.name = "polynomial"
  with pytest.raises(errors.ConfigError, match=r"'polynomial'.*constant, cosine"):
    optim.make_schedule(config, steps_per_epoch=10)


def test_negative_clip_norm_is_a_config_error():
  config = make_config(clip=-1.0)
  with pytest.raises(errors.ConfigError, match="grad_clip_norm"):
    optim.make_base_optimizer(config, constant_lr(config))


def test_gsam_rho_follows_the_lr_from_rho_to_rho_min():
  config = make_config(lr=0.1)
  config.schedule.name = "cosine"
  config.num_epochs = 2
  config.sam.variant = "gsam"
  config.sam.rho = 0.05
  config.sam.rho_min = 0.01
  steps_per_epoch = 25
  lr = optim.make_schedule(config, steps_per_epoch)
  rho = optim.make_rho(config, lr, steps_per_epoch)
  for s in range(0, 51, 5):
    expected = 0.01 + (0.05 - 0.01) * float(lr(s)) / 0.1
    assert float(rho(s)) == pytest.approx(expected, rel=1e-5, abs=1e-7)
  assert float(rho(0)) == pytest.approx(0.05) and float(rho(50)) == pytest.approx(0.01)


def test_plain_sam_rho_is_a_constant_float():
  config = make_config()
  config.sam.rho = 0.05
  rho = optim.make_rho(config, constant_lr(config), steps_per_epoch=10)
  assert isinstance(rho, float) and rho == 0.05
  config.sam.variant = "gsam"
  config.sam.rho = 0.0
  assert optim.make_rho(config, constant_lr(config), steps_per_epoch=10) == 0.0


def test_make_optimizer_with_rho_zero_is_the_base_sgd():
  """The full chain at rho = 0 steps like torch SGD (SAM compiles away to its base)."""
  config = make_config(nesterov=True)
  params, grads = random_problem(seed=3)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=10, axis_name=None)
  ours = run_ours(tx, params, grads)
  theirs = run_torch(
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True),
    params,
    grads,
  )
  assert_histories_close(ours, theirs, rtol=1e-6, atol=ATOL)
  assert math.isfinite(float(tx.init(jax.tree.map(jnp.asarray, params)).clean_grad_norm))
