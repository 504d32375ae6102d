"""SAM on a tiny ViT: the compiled train step's ascent groups (sam.m) and micro-batches
(accum_steps) compute the per-group SAM of a hand-written reference, as for the conv nets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsam import optim, steps
from jaxsam.models import vit
from support.tiny_steps import (
  MESH_1,
  NUM_CLASSES,
  assert_trees_close,
  init_state,
  make_batch,
  make_config,
  run_steps,
  step_cfg,
)


def tiny_vit():
  """Patch 4 on 8 px images: 4 tokens + class token, one block; LayerNorm, no BN."""
  return vit.ViT(num_classes=NUM_CLASSES, patch=4, width=16, depth=1, heads=2, mlp=32)


def _loss(model, params, images, labels):
  logits = model.apply({"params": params}, images, train=False)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def test_vit_sam_groups_match_a_per_group_reference():
  """sam.m = 4 on a batch of 16: each group of 4 ascends along its own gradient; the SAM gradients
  are averaged and SGD steps once."""
  rho, lr, m = 0.05, 0.1, 4
  batch = make_batch(n=16)
  config = make_config(rho=rho, lr=lr, m=m)
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 0.0
  model = tiny_vit()
  got, metrics, _ = run_steps(config, MESH_1(), model, [batch], group=m)
  params = init_state(model, optax.sgd(lr)).params
  images = steps.preprocess(jnp.asarray(batch["image"]), step_cfg())
  grad = jax.grad(lambda p, x, y: _loss(model, p, x, y))
  sam_grads = []
  for g0 in range(0, 16, m):
    x, y = images[g0 : g0 + m], batch["label"][g0 : g0 + m]
    g = grad(params, x, y)
    norm = optax.global_norm(g)
    perturbed = jax.tree.map(lambda p, gi, norm=norm: p + rho * gi / norm, params, g)
    sam_grads.append(grad(perturbed, x, y))
  mean_grad = jax.tree.map(lambda *g: sum(g) / len(g), *sam_grads)
  expected = jax.tree.map(lambda p, g: p - lr * g, params, mean_grad)
  assert_trees_close(got.params, expected)
  assert metrics[0]["sam/grad_norm"] > 0


@pytest.mark.slow  # compiles two train steps of the ViT
def test_vit_accum_steps_equal_sam_m_of_the_micro_batch_with_adamw():
  """AdamW + SAM: accum_steps = 2 on a per-device batch of 16 is sam.m = 8 (one AdamW step on the
  mean of the two micro-batches' SAM gradients)."""
  batches = [make_batch(n=16, seed=s) for s in range(2)]

  def config(**kw):
    c = make_config(rho=0.05, lr=1e-2)
    c.optimizer.name = "adamw"
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip_norm = 1.0
    c.num_epochs = 1
    for k, v in kw.items():
      c[k] = v
    return c

  results = []
  # accum_steps = 2; sam.m = 8; and, as a control that the comparison can tell groupings apart,
  # one ascent over the whole batch of 16 (sam.m = 0, no accumulation).
  for cfg in (config(accum_steps=2), config(), config()):
    if cfg.accum_steps == 1 and len(results) == 1:
      cfg.sam.m = 8
    settings = optim.step_sam_settings(cfg, 16, steps_per_epoch=10)
    group = settings["group_size"] if settings["group_size"] < 16 // cfg.accum_steps else 0
    state, _, _ = run_steps(
      cfg,
      MESH_1(),
      tiny_vit(),
      batches,
      group=group,
      cfg=dataclasses.replace(step_cfg(), **settings),
    )
    results.append(state.params)
  # Except the key bias: softmax is shift-invariant, so q . b_k adds the same score to every key
  # and its gradient is zero in exact arithmetic; Adam scales the two computations' rounding noise
  # (~1e-9) to steps of about lr, of either sign. Elsewhere Adam divides each gradient by its own
  # RMS (its first step is about lr * sign(g)), so where a component's gradient is small the two
  # summation orders' rounding still shows: every weight must agree to 1 % of one step (lr =
  # 1e-2), while the whole-batch ascent moves some weight by more than 10 % of a step.
  for got in results:
    got["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"].pop("key")
  accum, grouped, whole = results
  assert_trees_close(accum, grouped, rtol=0, atol=1e-4)
  diffs = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(accum), jax.tree.leaves(whole))]
  assert max(diffs) > 1e-3
