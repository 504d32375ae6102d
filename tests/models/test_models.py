"""Model registry and architectures: shapes, dtypes, parameter counts, options, registry errors.

Numerical equality with torchvision and Keras is in test_pretrained.py; here every registered model
is traced (jax.eval_shape: shapes and dtypes without compiling) and one model per family runs a
real bfloat16 forward at a small input.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsam import models
from jaxsam.errors import ConfigError
from jaxsam.models import resnet, wide_resnet


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """A config.model with the keys of configs/common.py."""
  from configs.common import get_base_config

  cfg = get_base_config().model
  cfg.name = name
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def abstract_variables(module, size: int):
  x = jnp.zeros((1, size, size, 3))
  return jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, train=False))


def param_count(module, image_size: int = 64) -> int:
  """Number of parameters (not BN statistics), from shapes only."""
  shapes = abstract_variables(module, image_size)
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"]))


def random_variables(module, size: int, seed: int = 0):
  """Variables of the right structure with random values (BN variances positive), no init compile.

  Drawn with numpy in tree order: per-leaf jax.random calls would compile once per leaf shape
  (40 s for an EfficientNet on 2 cores).
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    value = 0.1 * rng.standard_normal(leaf.shape).astype(leaf.dtype)
    name = jax.tree_util.keystr(path[-1:])
    return jnp.asarray(np.abs(value) + 0.5 if ("var" in name or "scale" in name) else value)

  return jax.tree_util.tree_map_with_path(fill, abstract_variables(module, size))


def test_unknown_name_lists_known_names():
  with pytest.raises(
    ConfigError, match=r"unknown config.model.name 'resnet51'.*resnet50.*wrn28_10"
  ):
    models.create_model(model_config("resnet51"), num_classes=10)


def test_registry_holds_every_resnet_wrn_and_efficientnet_size():
  expected = {f"resnet{d}" for d in (18, 34, 50, 101, 152)} | {"wrn28_10"}
  expected |= {f"efficientnet_b{i}" for i in range(8)}
  assert expected <= set(models.MODELS)


@pytest.mark.parametrize(
  "name, classes, expected",
  [
    ("resnet50", 1000, 25_557_032),  # torchvision resnet50
    ("resnet18", 1000, 11_689_512),  # torchvision resnet18
    ("resnet101", 1000, 44_549_160),  # torchvision resnet101
    ("resnet20", 10, 269_722),  # He et al. 2016 table 6 ("0.27M"), option-A shortcuts
    ("wrn28_10", 10, 36_479_194),  # Zagoruyko & Komodakis' WRN-28-10 ("36.5M")
    ("efficientnet_b0", 1000, 5_288_548),  # Keras EfficientNetB0 / torchvision, trainable
    ("efficientnet_b7", 1000, 66_347_960),  # Keras EfficientNetB7, trainable
  ],
)
def test_parameter_counts(name, classes, expected):
  module = models.create_model(model_config(name), num_classes=classes)
  assert param_count(module) == expected


# EfficientNet-B1..B7 take 6-17 s each to trace on 2 cores: the full suite runs them, the fast
# tier keeps B0 of each layout.
LARGE_EFFICIENTNETS = {
  n for n in models.MODELS if n.startswith("efficientnet_b") and not n.startswith("efficientnet_b0")
}
# The ViTs differ only in their sizes: the fast tier traces the small two.
LARGE_VITS = {n for n in models.MODELS if n.startswith("vit_") and n not in ("vit_ti4", "vit_tiny")}


@pytest.mark.parametrize(
  "name",
  [
    pytest.param(n, marks=pytest.mark.slow) if n in LARGE_EFFICIENTNETS | LARGE_VITS else n
    for n in sorted(models.MODELS)
  ],
)
def test_every_model_traces_in_bfloat16(name):
  """Output shape and dtype, params fp32, of every registered model (traced, not compiled)."""
  module = models.create_model(model_config(name), num_classes=7, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 32, 32, 3))

  def init_and_apply():  # one trace for both (tracing the big EfficientNets dominates the cost)
    variables = module.init({"params": jax.random.key(0)}, x, train=False)
    rngs = {"dropout": jax.random.key(0)}
    return variables, module.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)

  variables, (logits, state) = jax.eval_shape(init_and_apply)
  assert logits.shape == (2, 7) and logits.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree.leaves(state)} <= {jnp.dtype(jnp.float32)}  # ViT: none


@pytest.mark.parametrize(
  "name, size",
  [("resnet8", 16), ("resnet18", 32), ("wrn28_10", 8), ("efficientnet_b0", 32), ("vit_tiny", 16)],
)
def test_bfloat16_forward(name, size):
  """One real bf16 forward per family (fp32 ones run in the parity tests): shape, dtype, finite."""
  module = models.create_model(model_config(name), num_classes=5, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  y = jax.jit(lambda v: module.apply(v, x, train=False))(random_variables(module, size))
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 5)
  assert np.isfinite(np.asarray(y, np.float32)).all() and np.asarray(y, np.float32).std() > 0


def test_init_and_train_step_of_the_quickstart_model():
  """The real init and a train-mode apply: BN statistics change, the structure is kept."""
  module = models.create_model(model_config("resnet8"), num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(2)}
  variables = jax.jit(lambda: module.init(rngs, x, train=False))()
  logits, state = jax.jit(
    lambda v: module.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}
    )
  )(variables)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  before = variables["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(state["batch_stats"]["bn1"]["mean"], before)


def test_freeze_bn_uses_running_statistics_when_training():
  module = models.create_model(model_config("resnet8", freeze_bn=True), num_classes=3)
  variables = random_variables(module, 16)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  train, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(train, module.apply(variables, x, train=False))
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
  unfrozen = models.create_model(model_config("resnet8"), num_classes=3)
  assert not np.allclose(
    unfrozen.apply(variables, x, train=True, mutable=["batch_stats"])[0], train
  )


def test_dropout_draws_from_the_dropout_rng():
  """A small WideResNet (the same module as wrn28_10): same key, same mask; another key differs."""
  module = wide_resnet.wide_resnet(10, 1, num_classes=3, dropout_rate=0.3)
  variables = random_variables(module, 8)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  apply = jax.jit(
    lambda k: module.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})[
      0
    ]
  )
  a, b, a2 = apply(jax.random.key(0)), apply(jax.random.key(1)), apply(jax.random.key(0))
  np.testing.assert_array_equal(a, a2)
  assert not np.allclose(a, b)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_zero_init_residual_zeroes_each_blocks_last_bn_scale(block):
  module = resnet.ResNet(
    stage_sizes=(2,),
    block=block,
    num_classes=3,
    widths=(4,),
    stem="cifar",
    stem_width=4,
    zero_init_residual=True,
  )
  params = module.init({"params": jax.random.key(0)}, jnp.zeros((1, 4, 4, 3)), train=False)[
    "params"
  ]
  last = "bn2" if block == "basic" else "bn3"
  for name in ("layer1_0", "layer1_1"):
    assert not params[name][last]["scale"].any() and params[name]["bn1"]["scale"].all()


def test_stems_and_stride_placement():
  """CIFAR stem keeps 32 px to the first stage; v1 moves the stride to the first 1x1 conv."""
  cifar = abstract_variables(models.create_model(model_config("resnet18", cifar_stem=True), 3), 32)
  assert cifar["params"]["conv1"]["kernel"].shape == (3, 3, 3, 64)
  x = jnp.zeros((1, 64, 64, 3))  # layer2_0 input: 16 x 16; which conv halves it?
  for v1 in (False, True):
    module = models.create_model(model_config("resnet50", resnet_v1=v1), 3)
    _, inter = jax.eval_shape(
      lambda v, module=module: module.apply(v, x, train=False, capture_intermediates=True),
      abstract_variables(module, 64),
    )
    block = inter["intermediates"]["layer2_0"]
    sizes = (block["conv1"]["__call__"][0].shape[1], block["conv2"]["__call__"][0].shape[1])
    assert sizes == ((8, 8) if v1 else (16, 8))


def test_width_scales_the_cifar_resnets():
  narrow = param_count(models.create_model(model_config("resnet20"), 10), 32)
  wide = param_count(models.create_model(model_config("resnet20", width=32), 10), 32)
  assert wide > 3.5 * narrow
