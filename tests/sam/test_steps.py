"""The compiled train step: SAM inside shard_map, BN-safe passes, device semantics, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsam import errors, optim, parallel, steps
from jaxsam import state as state_lib
from support.tiny_steps import (
  MESH_1,
  MESH_8,
  TinyBNNet,
  TinyNet,
  assert_trees_close,
  init_state,
  make_batch,
  make_config,
  run_steps,
  step_cfg,
)


@pytest.mark.parametrize("rho,sync", [(0.0, False), (0.05, True)])
def test_8_devices_equal_1_device_for_sgd_and_synced_sam(rho, sync):
  """Same global batch: averaging gradients (and a synchronised ascent) makes devices invisible."""
  batches = [make_batch(seed=s) for s in range(3)]
  config = make_config(rho=rho, sync=sync)
  s8, _, _ = run_steps(config, MESH_8(), TinyNet(), batches)
  s1, _, _ = run_steps(config, MESH_1(), TinyNet(), batches)
  assert_trees_close(s8.params, s1.params)


def _loss(model, params, images, labels):
  logits = model.apply({"params": params}, images, train=False)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def test_per_device_sam_matches_hand_computed_per_shard_reference():
  """m-sharpness: every device ascends along its own gradient; the SAM gradients are averaged."""
  rho, lr = 0.05, 0.1
  batch = make_batch()
  config = make_config(rho=rho, lr=lr)
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 0.0
  model = TinyNet()
  got, metrics, _ = run_steps(config, MESH_8(), model, [batch])
  params = init_state(model, optax.sgd(lr)).params
  images = steps.preprocess(jnp.asarray(batch["image"]), step_cfg())
  grad = jax.grad(lambda p, x, y: _loss(model, p, x, y))
  sam_grads = []
  for shard in range(8):
    x, y = images[shard * 4 : (shard + 1) * 4], batch["label"][shard * 4 : (shard + 1) * 4]
    g = grad(params, x, y)
    norm = optax.global_norm(g)
    perturbed = jax.tree.map(lambda p, gi, norm=norm: p + rho * gi / norm, params, g)
    sam_grads.append(grad(perturbed, x, y))
  mean_grad = jax.tree.map(lambda *g: sum(g) / 8, *sam_grads)
  expected = jax.tree.map(lambda p, g: p - lr * g, params, mean_grad)
  assert_trees_close(got.params, expected)
  assert metrics[0]["sam/grad_norm"] > 0 and -1 <= metrics[0]["sam/cosine"] <= 1


def test_sam_m_groups_on_one_device_equal_one_group_per_device():
  """sam.m = 4 on one device computes what 8 devices with 4 examples each compute."""
  batches = [make_batch(seed=s) for s in range(2)]
  config = make_config(rho=0.05)
  on_8, _, _ = run_steps(config, MESH_8(), TinyNet(), batches)
  config_m = make_config(rho=0.05, m=4)
  grouped, _, _ = run_steps(config_m, MESH_1(), TinyNet(), batches, group=4)
  assert_trees_close(grouped.params, on_8.params)


def test_bn_running_statistics_come_from_the_clean_pass_only():
  model = TinyBNNet()
  batch = make_batch()
  got, _, _ = run_steps(make_config(rho=0.5), MESH_1(), model, [batch])
  state = init_state(model, optax.sgd(0.1))
  images = steps.preprocess(jnp.asarray(batch["image"]), step_cfg())
  _, clean = model.apply(
    {"params": state.params, "batch_stats": state.batch_stats},
    images,
    train=True,
    mutable=["batch_stats"],
  )
  assert_trees_close(got.batch_stats, clean["batch_stats"], rtol=1e-5, atol=1e-6)
  # And the perturbed pass did move the weights differently from plain SGD.
  sgd, _, _ = run_steps(make_config(rho=0.0), MESH_1(), model, [batch])
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got.params, sgd.params)
  assert max(jax.tree.leaves(diff)) > 1e-6


def test_bn_statistics_are_averaged_over_devices():
  """Per-device running statistics, averaged, equal the mean of each device's clean update."""
  model = TinyBNNet()
  batch = make_batch()
  got, _, _ = run_steps(make_config(rho=0.05), MESH_8(), model, [batch])
  state = init_state(model, optax.sgd(0.1))
  images = steps.preprocess(jnp.asarray(batch["image"]), step_cfg())
  per_shard = [
    model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      images[i * 4 : (i + 1) * 4],
      train=True,
      mutable=["batch_stats"],
    )[1]
    for i in range(8)
  ]
  expected = jax.tree.map(lambda *s: sum(s) / 8, *[p["batch_stats"] for p in per_shard])
  assert_trees_close(got.batch_stats, expected, rtol=1e-5, atol=1e-6)


def test_step_compiles_once_and_logs_sam_diagnostics():
  batches = [make_batch(seed=s) for s in range(3)]
  _, metrics, step = run_steps(make_config(rho=0.05), MESH_8(), TinyNet(), batches)
  assert step._cache_size() == 1
  expected_keys = {
    "train/loss",
    "train/accuracy",
    "lr",
    "sam/rho",
    "sam/perturbed_loss",
    "sam/gap",
    "sam/clean_grad_norm",
    "sam/grad_norm",
    "sam/cosine",
  }
  assert expected_keys <= set(metrics[-1])
  assert metrics[-1]["sam/rho"] == pytest.approx(0.05)
  assert metrics[-1]["sam/gap"] == pytest.approx(
    metrics[-1]["sam/perturbed_loss"] - metrics[-1]["train/loss"], abs=1e-6
  )


def test_plain_step_logs_no_sam_diagnostics():
  """rho = 0 compiles the one-pass step: nothing SAM-specific to report, so no `sam/*` keys."""
  _, metrics, _ = run_steps(make_config(rho=0.0), MESH_1(), TinyNet(), [make_batch()])
  assert set(metrics[0]) == {"train/loss", "train/accuracy", "lr"}
  assert all(np.isfinite(v) for v in metrics[0].values())


def _flops(rho):
  batch = make_batch()
  mesh = MESH_1()
  config = make_config(rho=rho)
  tx, lr = optim.make_optimizer(config, steps_per_epoch=10, axis_name=parallel.DATA_AXIS)
  model = TinyBNNet()
  step = steps.compile_train_step(mesh, model=model, tx=tx, lr_schedule=lr, cfg=step_cfg())
  state = parallel.replicate(init_state(model, tx), mesh)
  cost = step.lower(state, parallel.shard_batch(batch, mesh)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"]


def test_sam_costs_two_passes_and_rho_zero_costs_one():
  ratio = _flops(0.05) / _flops(0.0)
  assert 1.8 < ratio < 2.2, ratio


def test_bf16_compute_keeps_fp32_params_and_finite_updates():
  model = TinyBNNet(dtype=jnp.bfloat16)
  cfg = step_cfg(dtype=jnp.bfloat16)
  state, metrics, _ = run_steps(
    make_config(rho=0.05), MESH_8(), model, [make_batch(seed=s) for s in range(2)], cfg=cfg
  )
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
  assert np.isfinite(metrics[-1]["train/loss"]) and np.isfinite(metrics[-1]["sam/grad_norm"])


def test_preprocess_upscales_like_torch_bilinear_resize():
  """On-device upscaling equals torch's bilinear interpolate (what torchvision's Resize does)."""
  torch = pytest.importorskip("torch")
  images = make_batch(n=2, size=8)["image"]
  cfg = state_lib.StepConfig(image_size=20, mean=(0.0,) * 3, std=(1.0,) * 3)
  ours = np.asarray(steps.preprocess(jnp.asarray(images), cfg))
  t = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(t, size=(20, 20), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_batch_not_divisible_by_devices_is_a_config_error():
  with pytest.raises(errors.ConfigError, match="batch_size=12 must be a positive multiple of"):
    parallel.per_process_batch_size(12, MESH_8())


def test_sam_m_must_divide_the_per_device_batch():
  with pytest.raises(errors.ConfigError, match="sam.m=3 must be 0"):
    steps.group_size(3, per_device_batch=4)
  assert steps.group_size(0, per_device_batch=4) == 4


def test_ghost_batch_norm_on_one_device_equals_sgd_on_8_devices_with_their_own_bn():
  """model.ghost_batch_size = 4 (SGD, no ascent) normalises per group of 4, as 8 devices with 4
  examples each do, and differs from batch norm over the whole batch."""
  batches = [make_batch(seed=s) for s in range(2)]
  config = make_config()
  config.model.ghost_batch_size = 4
  group = optim.step_sam_settings(config, per_device_batch=32, steps_per_epoch=10)
  assert group["group_size"] == 4
  ghost, _, _ = run_steps(config, MESH_1(), TinyBNNet(), batches, group=4)
  on_8, _, _ = run_steps(make_config(), MESH_8(), TinyBNNet(), batches)
  whole, _, _ = run_steps(make_config(), MESH_1(), TinyBNNet(), batches)
  assert_trees_close(ghost.params, on_8.params)
  assert not np.allclose(ghost.params["Dense_0"]["kernel"], whole.params["Dense_0"]["kernel"])


def test_ghost_batch_size_must_match_sams_group():
  config = make_config(rho=0.05, m=8)
  config.model.ghost_batch_size = 8
  assert optim.step_sam_settings(config, 32, steps_per_epoch=10)["group_size"] == 8
  config.model.ghost_batch_size = 4
  with pytest.raises(errors.ConfigError, match=r"model.ghost_batch_size=4 .* accepted: 0 or 8"):
    optim.step_sam_settings(config, 32, steps_per_epoch=10)


def test_ghost_batch_size_must_divide_the_per_device_batch():
  config = make_config()
  config.model.ghost_batch_size = 5
  with pytest.raises(errors.ConfigError, match=r"^model.ghost_batch_size=5 must be 0 .* batch 32$"):
    optim.step_sam_settings(config, 32, steps_per_epoch=10)
