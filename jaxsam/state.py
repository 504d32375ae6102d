"""The train state and the step's static settings, and how a state is created: concrete or abstract.

The one definition the training loop, evaluation, analysis and the benchmarks share. Nothing
here imports TensorFlow, so a bare GPU box (JAX, flax, optax) can build and size a state.

  >>> state = create_train_state(model, tx, cfg, seed=config.seed)  # on the host
  >>> target = abstract_state(model, tx, cfg, mesh)  # shapes and shardings, nothing allocated
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxsam import errors, parallel
from jaxsam.models import pretrained as pretrained_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  """The jnp dtype named by `config.dtype`; one line naming the known ones otherwise."""
  if name not in DTYPES:
    raise errors.ConfigError(f"dtype={name!r} is unknown; known: {', '.join(DTYPES)}")
  return DTYPES[name]


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; replicated over devices, saved whole in checkpoints."""

  step: jax.Array  # int32 scalar: train steps taken
  params: Any
  batch_stats: Any  # BN running statistics (empty for models without BN)
  opt_state: Any  # SAMState around the base optimizer state
  rng: jax.Array  # uint32[2] raw key; per-step keys are folded from it and the step


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static settings a compiled step closes over (hashable, read once from the config)."""

  image_size: int  # resolution the model sees; uint8 batches arrive at native size
  mean: tuple[float, float, float]  # per-channel, 0-1 scale, in the model's channel order
  std: tuple[float, float, float]
  bgr: bool = False  # feed channels in BGR order (Keras' caffe preprocessing); batches are RGB
  dtype: Any = jnp.float32  # compute dtype of the input; params stay fp32
  label_smoothing: float = 0.0
  # Examples per group with its own SAM ascent and batch-norm statistics (sam.m, or
  # model.ghost_batch_size without SAM); 0 = the per-device (micro-)batch.
  group_size: int = 0
  accum_steps: int = 1  # micro-batches per optimizer step, run one after the other
  msam_rho: float = 0.0  # Momentum-SAM: take the one gradient at sam.msam_point with this rho
  msam_start_step: int = 0  # Momentum-SAM: plain gradients before this optimizer step


def create_train_state(
  model, tx, cfg: StepConfig, *, seed: int = 0, weights_file: str | None = None, model_ref=None
) -> TrainState:
  """A fresh train state on the host: `model` initialised from `seed`, or its variables replaced
  by a local pretrained `weights_file`, laid out as `model_ref` says (`config.model`, a registered
  name, or None: the module itself).

  The seed is split into (init, dropout, step) keys in that order; a resumed run depends on it.
  """
  init_rng, dropout_rng, step_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
  dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), cfg.dtype)
  variables = jax.jit(lambda r, d: model.init({"params": r, "dropout": d}, dummy, train=False))(
    init_rng, dropout_rng
  )
  if weights_file:
    layout = model if model_ref is None else model_ref
    variables = pretrained_lib.load_pretrained(weights_file, layout, variables)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=step_rng,
  )


def abstract_state(model, tx, cfg: StepConfig, mesh) -> TrainState:
  """`create_train_state`'s shapes, dtypes and replicated shardings, computed without allocating.

  The restore target of checkpoints (pretrained weights are not read: a checkpoint replaces them).
  """
  shapes = jax.eval_shape(lambda: create_train_state(model, tx, cfg))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
