"""jaxsam.state: the one TrainState / StepConfig and how a state is made, without TensorFlow."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from jaxsam import errors, models
from jaxsam import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_state_and_stepcost_import_without_tensorflow():
  code = (
    "import sys\n"
    "for name in ('tensorflow', 'tensorflow_datasets'): sys.modules[name] = None\n"
    "import jaxsam.state, jaxsam.stepcost, jaxsam.steps\n"
    "print(sorted(m for m in sys.modules if m.startswith('tensorflow') and sys.modules[m]))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout
  assert out.strip() == "[]"


def test_compute_dtype_names_the_known_ones():
  assert state_lib.compute_dtype("bfloat16") == jax.numpy.bfloat16
  with pytest.raises(errors.ConfigError, match=r"dtype='fp8' is unknown; known: float32, bfloat16"):
    state_lib.compute_dtype("fp8")


def _model_config():
  from configs import common  # pylint: disable=import-outside-toplevel

  model = common.get_base_config().model
  model.name = "resnet8"
  return model


def test_create_train_state_is_a_function_of_the_seed():
  model = models.create_model(_model_config(), num_classes=3)
  cfg = state_lib.StepConfig(image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
  tx = optax.sgd(0.1, momentum=0.9)
  a, b = (state_lib.create_train_state(model, tx, cfg, seed=3) for _ in range(2))
  c = state_lib.create_train_state(model, tx, cfg, seed=4)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert int(a.step) == 0
  # The step key is the third of the seed's split: the keys a resumed run re-derives.
  np.testing.assert_array_equal(a.rng, jax.random.split(jax.random.PRNGKey(3), 3)[2])
  assert not np.array_equal(a.params["conv1"]["kernel"], c.params["conv1"]["kernel"])


def test_create_train_state_loads_a_weight_file_over_the_fresh_init(tmp_path):
  from jaxsam.models import weight_files  # pylint: disable=import-outside-toplevel

  model_config = _model_config()
  model = models.create_model(model_config, num_classes=3)
  cfg = state_lib.StepConfig(image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
  tx = optax.sgd(0.1, momentum=0.9)
  donor = state_lib.create_train_state(model, tx, cfg, seed=7)
  path = str(tmp_path / "donor.safetensors")
  weight_files.save_variables(
    path, {"params": donor.params, "batch_stats": donor.batch_stats}, model_config
  )
  loaded = state_lib.create_train_state(
    model, tx, cfg, seed=0, weights_file=path, model_ref=model_config
  )
  for x, y in zip(jax.tree.leaves(donor.params), jax.tree.leaves(loaded.params), strict=True):
    np.testing.assert_array_equal(x, y)
  # The step key is still the run's own seed's, not the donor's.
  np.testing.assert_array_equal(loaded.rng, jax.random.split(jax.random.PRNGKey(0), 3)[2])
