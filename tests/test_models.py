"""Model registry and architectures: shapes, dtypes, parameter counts, and the registry's errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsam import models
from jaxsam.errors import ConfigError


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """A config.model with the keys of configs/common.py."""
  from configs.common import get_base_config

  cfg = get_base_config().model
  cfg.name = name
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def param_count(module, image_size: int) -> int:
  """Number of parameters (not BN statistics), from shapes only."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, jnp.zeros(x.shape), train=False))
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"]))


def test_unknown_name_lists_known_names():
  with pytest.raises(ConfigError, match=r"unknown config.model.name 'resnet51'.*resnet50"):
    models.create_model(model_config("resnet51"), num_classes=10)


@pytest.mark.parametrize(
  "name, classes, expected",
  [
    ("resnet50", 1000, 25_557_032),  # torchvision resnet50
    ("resnet18", 1000, 11_689_512),  # torchvision resnet18
    ("resnet20", 10, 269_722),  # He et al. 2016 table 6 ("0.27M"), option-A shortcuts
  ],
)
def test_parameter_counts(name, classes, expected):
  module = models.create_model(model_config(name), num_classes=classes)
  assert param_count(module, 32 if name == "resnet20" else 64) == expected


@pytest.mark.parametrize("name, size", [("resnet20", 32), ("resnet18", 32), ("resnet50", 32)])
def test_forward_and_train_step_shapes(name, size):
  module = models.create_model(model_config(name, cifar_stem=name == "resnet18"), num_classes=7)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(2)}, x, train=False)
  logits, state = module.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
