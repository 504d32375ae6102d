"""jaxsam.stepcost: the benchmarks' compiled step, its donated state and SAM's memory."""

import jax
import numpy as np
import pytest

from configs import common
from jaxsam import errors, parallel, stepcost
from jaxsam import state as state_lib


def small_config(rho: float, batch: int = 8, size: int = 32):
  config = common.get_base_config()
  config.model.name = "resnet8"
  config.model.image_size = size
  config.batch_size = batch
  config.sam.rho = rho
  return config


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh(jax.devices()[:1])


def compiled_step(config, mesh):
  step, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=10)
  state = state_lib.abstract_state(model, tx, cfg, mesh)
  batch = stepcost.synthetic_batch(config.batch_size, cfg.image_size, 10, mesh)
  return step.lower(state, batch).compile(), state


@pytest.fixture(scope="module")
def sgd_sam(mesh):
  return {
    name: compiled_step(small_config(rho), mesh) for name, rho in (("sgd", 0.0), ("sam", 0.05))
  }


def test_abstract_state_matches_the_real_one(mesh):
  config = small_config(0.05)
  _, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=10)
  real = state_lib.create_train_state(model, tx, cfg)
  abstract = state_lib.abstract_state(model, tx, cfg, mesh)
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
    assert (r.shape, r.dtype) == (a.shape, a.dtype)
    assert a.sharding == parallel.replicated(mesh)


@pytest.mark.parametrize("name", ["sgd", "sam"])
def test_train_step_donates_the_whole_state(sgd_sam, name):
  compiled, state = sgd_sam[name]
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  mem = stepcost.memory(compiled)
  # The state is updated in place: every weight, BN and optimizer buffer aliases its output
  # (XLA may return a few scalars, such as the step counter, in fresh 4-byte buffers).
  assert state_bytes - 64 <= mem["alias"] <= state_bytes
  assert mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]


def test_donated_input_buffers_are_freed_after_a_step(mesh):
  config = small_config(0.05, size=8)
  step, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=10)
  state = parallel.replicate(state_lib.create_train_state(model, tx, cfg), mesh)
  batch = stepcost.synthetic_batch(config.batch_size, cfg.image_size, 10, mesh)
  new_state, _ = step(state, batch)
  jax.block_until_ready(new_state)
  assert all(x.is_deleted() for x in jax.tree.leaves(state.params))


def test_sam_keeps_no_second_copy_of_the_activations(sgd_sam):
  # ResNet-8, 32 px, batch 8: activations are ~95 % of SGD's 7.6 MiB of temporaries; SAM adds
  # parameter-sized buffers only (perturbed weights, a second gradient: ~0.3 MiB, +4 %). A second
  # copy of the clean pass's activations kept alive across the perturbed pass would make SAM's
  # temporaries ~1.9x SGD's; 1.5x sits between the two with room for XLA's scheduling.
  sgd = stepcost.memory(sgd_sam["sgd"][0])["temp"]
  sam = stepcost.memory(sgd_sam["sam"][0])["temp"]
  assert sam < 1.5 * sgd, (sam, sgd)


def test_flops_of_sam_are_twice_sgd(sgd_sam):
  ratio = stepcost.flops(sgd_sam["sam"][0]) / stepcost.flops(sgd_sam["sgd"][0])
  assert 1.95 < ratio < 2.1


def test_time_steps_runs_and_returns_the_new_state(mesh):
  config = small_config(0.0, size=8)
  step, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=10)
  state = parallel.replicate(state_lib.create_train_state(model, tx, cfg), mesh)
  batch = stepcost.synthetic_batch(config.batch_size, cfg.image_size, 10, mesh)
  state, seconds = stepcost.time_steps(step, state, batch, num_steps=2, repeats=2)
  assert int(state.step) == 4 and len(seconds) == 2 and all(s > 0 for s in seconds)


def test_peak_table_picks_the_most_specific_name():
  assert stepcost.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
  assert stepcost.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert stepcost.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 494.0
  assert stepcost.peak_tflops("cpu", "bfloat16") is None


def test_bad_settings_are_one_line_config_errors(mesh):
  config = small_config(0.0, size=0)
  with pytest.raises(errors.ConfigError, match=r"model.image_size=0 must be >= 1"):
    stepcost.build_step(config, mesh, num_classes=10)
  config = small_config(0.0)
  config.dtype = "float16"
  with pytest.raises(errors.ConfigError, match=r"dtype='float16' is unknown; known: float32"):
    stepcost.build_step(config, mesh, num_classes=10)


def test_synthetic_batch_is_uint8_images_and_int32_labels(mesh):
  batch = stepcost.synthetic_batch(4, 8, 10, mesh)
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 8, 8, 3)
  assert batch["label"].dtype == np.int32 and int(batch["label"].max()) < 10
