"""config.dtype = bfloat16: bf16 convolutions, fp32 parameters, optimizer and SAM state, fp32 loss.

Built the way `train_and_evaluate` builds a run (build_setup, setup_optimizer, create_train_state,
the compiled step), on the quickstart's model and data at 8 px, on a 2-device mesh.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from jaxsam import losses, parallel, run_setup, steps
from jaxsam import state as state_lib

STEPS = 8


def build(dtype: str):
  """The compiled step, its state on a 2-device mesh and one fixed batch of 16 digits."""
  config = quickstart.get_config()
  config.dtype = dtype
  config.model.image_size = 8
  config.batch_size = 16
  config.sam.rho = 0.05  # SAM: its ascent norm must stay fp32 too
  config.schedule.name = "constant"
  config.schedule.warmup_epochs = 0
  config.optimizer.learning_rate = 0.05
  mesh = parallel.make_mesh(jax.devices()[:2])
  setup = run_setup.build_setup(config, mesh=mesh)
  tx, lr = run_setup.setup_optimizer(config, setup)
  state = parallel.replicate(
    state_lib.create_train_state(setup.model, tx, setup.step_config, seed=config.seed), mesh
  )
  step = steps.compile_train_step(
    mesh, model=setup.model, tx=tx, lr_schedule=lr, cfg=setup.step_config
  )
  images, labels = setup.data.arrays.train.images[:16], setup.data.arrays.train.labels[:16]
  batch = parallel.shard_batch({"image": images, "label": labels.astype(np.int32)}, mesh)
  return step, state, batch, (setup, images, labels.astype(np.int32))


@pytest.fixture(scope="module")
def bf16_run():
  step, state, batch, (setup, images, labels) = build("bfloat16")
  hlo = step.lower(state, batch).as_text()
  state0 = parallel.fetch(state)  # the step donates its input state
  history, metrics = [], None
  for _ in range(STEPS):  # the same batch again and again: the loss must go down
    state, metrics = step(state, batch)
    history.append(float(metrics["train/loss"]))
  return {
    "hlo": hlo,
    "losses": history,
    "state": state,
    "metrics": metrics,
    "fp32_inputs": (setup, state0, images, labels),
  }


@pytest.mark.slow
def test_bf16_loss_decreases(bf16_run):
  losses = bf16_run["losses"]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses


def test_bf16_keeps_fp32_params_optimizer_state_and_loss(bf16_run):
  state = bf16_run["state"]
  for part in (state.params, state.batch_stats, state.opt_state):
    for leaf in jax.tree.leaves(part):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, leaf.dtype
  for name in ("train/loss", "sam/grad_norm", "sam/clean_grad_norm", "sam/perturbed_loss"):
    assert bf16_run["metrics"][name].dtype == jnp.float32, name


def test_bf16_convolutions_compute_in_bf16(bf16_run):
  convs = [l for l in bf16_run["hlo"].splitlines() if "stablehlo.convolution" in l]
  assert convs and all("bf16" in l for l in convs)


@pytest.mark.slow
def test_bf16_first_loss_matches_fp32_forward(bf16_run):
  """Same parameters and batch: the bf16 step's first loss differs from fp32's by rounding only."""
  setup, state0, images, labels = bf16_run["fp32_inputs"]
  model = setup.model.clone(dtype=jnp.float32)
  cfg = dataclasses.replace(setup.step_config, dtype=jnp.float32)
  x = steps.preprocess(jnp.asarray(images), cfg)
  # Each device normalises BN with its own half of the batch: average the two halves' losses.
  halves = [
    jnp.mean(
      losses.cross_entropy(
        model.apply(
          {"params": state0.params, "batch_stats": state0.batch_stats},
          x[i : i + 8],
          train=True,
          mutable=["batch_stats"],
        )[0],
        labels[i : i + 8],
      )
    )
    for i in (0, 8)
  ]
  fp32_loss = float(np.mean(halves))
  np.testing.assert_allclose(bf16_run["losses"][0], fp32_loss, rtol=2e-2)
  assert bf16_run["losses"][0] != fp32_loss  # the step did compute in bf16
