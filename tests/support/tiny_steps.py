"""A tiny conv net (with and without batch norm), its configs, batches and compiled steps: what
the step, SAM-variant and ViT-SAM tests build on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from jaxsam import optim, parallel, steps
from jaxsam import state as state_lib

NUM_CLASSES = 5


class TinyNet(nn.Module):
  """A BN-free conv net: per-device and full-batch gradients are comparable exactly."""

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(NUM_CLASSES)(x)


class TinyBNNet(nn.Module):
  """Conv + BatchNorm + dense: the smallest model whose BN statistics a step must get right."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3), strides=2, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    x = nn.relu(x).reshape((x.shape[0], -1))
    return nn.Dense(NUM_CLASSES, dtype=self.dtype)(x)


def make_config(rho=0.0, sync=False, m=0, lr=0.1):
  config = common.get_base_config()
  config.optimizer.learning_rate = lr
  config.schedule.name = "constant"
  config.sam.rho = rho
  config.sam.sync = sync
  config.sam.m = m
  return config


def make_batch(n=32, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
    "label": rng.integers(0, NUM_CLASSES, (n,)).astype(np.int32),
  }


def step_cfg(size=8, group=0, dtype=jnp.float32):
  return state_lib.StepConfig(
    image_size=size, mean=(0.5,) * 3, std=(0.25,) * 3, dtype=dtype, group_size=group
  )


def init_state(model, tx, size=8):
  return state_lib.create_train_state(model, tx, step_cfg(size))


def run_steps(config, mesh, model, batches, group=0, cfg=None):
  axis = parallel.DATA_AXIS
  per_device = len(batches[0]["label"]) // mesh.devices.size
  if group and group < per_device:
    axis = (parallel.DATA_AXIS, steps.GROUP_AXIS)
  tx, lr = optim.make_optimizer(config, steps_per_epoch=10, axis_name=axis)
  cfg = cfg or step_cfg(group=group)
  step = steps.compile_train_step(mesh, model=model, tx=tx, lr_schedule=lr, cfg=cfg)
  state = parallel.replicate(init_state(model, tx, cfg.image_size), mesh)
  metrics = []
  for b in batches:
    state, m = step(state, parallel.shard_batch(b, mesh))
    metrics.append(parallel.fetch(m))
  return parallel.fetch(state), metrics, step


MESH_8 = lambda: parallel.make_mesh(jax.devices()[:8])
MESH_1 = lambda: parallel.make_mesh(jax.devices()[:1])


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)
