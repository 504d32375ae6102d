"""Tests for jaxsam.data.device_augment: for the same seeds the jax.numpy batch equals the tf.data
one (RNG, every op, crop / flip / Cutout, whole RandAugment and AutoAugment batches), every op
matches PIL as the tf ops do, batches shard, and the module runs with TensorFlow absent.

Tolerance: integer, LUT and blend ops must be bitwise equal. Affine ops may differ on at most
AFFINE_BOUND of pixels: both paths evaluate the same float32 coordinates (TF's float64 matrices
cast to float32, each product rounded once) and round them alike, but the float64 cos / sin of a
rotation come from numpy's libm here and Eigen's there, and one ulp can move a float32 matrix
entry; only a coordinate within ~1e-6 of a half-pixel can then round to the neighbour, a
boundary pixel of the map. Measured on this CPU: 0 differing pixels in every comparison.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

from jaxsam.data import augment, augment_spec, device_augment
from jaxsam.errors import ConfigError
from support import pil_reference
from support.augment_configs import augment_config
from support.paths import ROOT
from support.runs import failure

AFFINE_BOUND = 0.001  # one pixel in 1,000 (see the module docstring)
SIZE = 32


@pytest.fixture(scope="module")
def cifar_like():
  """16 real photos at 32 x 32 (the CIFAR size), two seeds' worth of variety."""
  images = np.concatenate([pil_reference.photos(SIZE, SIZE)] * 6)[:16]
  # Different content per copy: shift each copy so no two images are the same.
  return np.stack([np.roll(im, 3 * i, axis=(0, 1)) for i, im in enumerate(images)])


def _seeds(n, seed=-7, offset=2**33):
  """int64 (seed, position) pairs with a negative seed and positions past 2**32."""
  return np.stack([np.full(n, seed), np.arange(n) + offset], 1).astype(np.int64)


def _differing(a, b) -> float:
  return float(np.mean(np.any(np.asarray(a) != np.asarray(b), axis=-1)))


def test_uniform_and_randint_equal_tf_for_any_int64_seed():
  rng = np.random.default_rng(0)
  seeds = np.concatenate([_seeds(8), rng.integers(-(2**62), 2**62, (56, 2))]).astype(np.int64)
  words = jnp.asarray(device_augment.seed_words(seeds))
  for stream in (0, 4, 11, 100, 103, 241):
    np.testing.assert_array_equal(
      np.asarray(device_augment.uniform(words, stream)),
      augment.uniform(tf.constant(seeds), stream).numpy(),
    )
    np.testing.assert_array_equal(
      np.asarray(device_augment._randint(words, stream, 14)),
      augment._randint(tf.constant(seeds), stream, 14).numpy(),
    )


def test_example_seeds_are_the_pipelines_seed_and_position():
  """Row r of global step s is at position s * B + r of the run (pipeline's stream), past 2**32."""
  global_batch, rows = 4096, np.array([0, 1, 2047, 4095], np.int32)
  for seed, step in ((0, 0), (42, 7), (-3, 1_500_000), (2**40 + 5, 2**31 - 1)):
    got = jax.jit(device_augment.example_seeds, static_argnums=(0, 2))(
      seed, jnp.int32(step), global_batch, rows
    )
    position = step * global_batch + rows.astype(np.int64)
    expected = np.stack([np.full_like(position, seed), position], -1)
    np.testing.assert_array_equal(np.asarray(got), device_augment.seed_words(expected))


def _op_args(name):
  if name == "posterize":
    return [0.0, 1.0, 2.0, 3.0, 4.0, 8.0]
  return pil_reference.op_args(name)


@pytest.mark.parametrize("name", sorted(augment_spec.KINDS))
def test_op_equals_tf_op(name, cifar_like):
  """Each op, jitted, on 16 photos per argument RandAugment / AutoAugment can give it."""
  for arg in _op_args(name):
    args = np.full(len(cifar_like), arg, np.float32)
    tf_out = augment.OPS[name](cifar_like, args).numpy()
    ours = jax.jit(device_augment.OPS[name])(cifar_like, jnp.asarray(args))
    host_arg = device_augment.OPS[name](cifar_like, args)  # affine: TF's float64 matrix
    for out, how in ((ours, "jit, traced arg"), (host_arg, "host arg")):
      if augment_spec.KINDS[name] == "affine":
        assert _differing(out, tf_out) <= AFFINE_BOUND, f"{name}({arg}) {how}"
      else:
        np.testing.assert_array_equal(np.asarray(out), tf_out, err_msg=f"{name}({arg}) {how}")


@pytest.mark.slow  # ~6 s on 2 CPU cores
def test_single_image_with_a_scalar_argument(cifar_like):
  for name, arg in (("rotate", 27.0), ("contrast", 1.72), ("equalize", 0.0)):
    np.testing.assert_array_equal(
      np.asarray(device_augment.OPS[name](cifar_like[3], arg)),
      augment.OPS[name](cifar_like[3], arg).numpy(),
    )


@pytest.mark.parametrize("name", sorted(augment_spec.KINDS))
def test_op_matches_pil(name, photos):
  """tests/data/test_augment.py's PIL parity, run on the jnp ops (jitted, one argument per
  example)."""
  images, batch_args, expected = pil_reference.op_cases(name, photos)
  ours = np.asarray(jax.jit(device_augment.OPS[name])(images, batch_args))
  for i, arg in enumerate(batch_args):
    pil_reference.assert_matches_pil(name, ours[i], expected[i], f"{name}({arg}) photo {i % 3}")


def test_posterize_zero_bits_is_black(photos):
  np.testing.assert_array_equal(np.asarray(device_augment.OPS["posterize"](photos, 0)), 0)


def test_autocontrast_reproduces_pils_float64_table():
  """Every (lo, hi) pair: PIL's double-precision table, not the exact quotient it rounds from."""
  lo, hi = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
  keep = hi > lo
  lo, hi = lo[keep][::7], hi[keep][::7]  # 4,663 pairs, every lo and hi
  # One 1 x 2 "image" per pair whose single channel spans [lo, hi]; channels 1-2 constant.
  images = np.zeros((len(lo), 1, 2, 3), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = lo, hi
  table = jax.jit(lambda x: device_augment._autocontrast_lut(device_augment._Stats(x), 0.0))
  lut = np.asarray(table(images))[:, 0]
  i = np.arange(256)[None]
  scale = 255.0 / (hi - lo)[:, None]
  pil = np.clip(np.floor(i * scale + (-lo[:, None] * scale)), 0, 255)
  np.testing.assert_array_equal(lut, pil)


@pytest.mark.parametrize(
  "overrides",
  [
    *({"crop_padding": 4, "crop_fill": f, "cutout_size": 16} for f in augment_spec.CROP_FILLS),
    {},  # the flip alone: the host takes its own route (no gather)
  ],
  ids=[*(f"crop_{fill}_cutout" for fill in augment_spec.CROP_FILLS), "flip_only"],
)
def test_crop_flip_cutout_equals_tf(overrides, cifar_like):
  config = augment_config(flip=True, **overrides)
  seeds = _seeds(len(cifar_like))
  expected = augment.make_train_augment(config)(cifar_like, seeds).numpy()
  ours = jax.jit(device_augment.make_device_augment(config))(
    cifar_like, device_augment.seed_words(seeds)
  )
  np.testing.assert_array_equal(np.asarray(ours), expected)
  assert _differing(expected, cifar_like) > 0.2  # the comparison is not of untouched images


@pytest.mark.parametrize(
  "overrides",
  [
    # ~18 s and ~11 s on 2 CPU cores; every op is compared in the fast tier (test_op_equals_tf_op)
    pytest.param({"randaugment__num_ops": 2, "randaugment__magnitude": 9}, marks=pytest.mark.slow),
    pytest.param({"autoaugment": "cifar10"}, marks=pytest.mark.slow),
  ],
  ids=["randaugment_2_9", "autoaugment_cifar10"],
)
def test_whole_train_batch_equals_tf(overrides, cifar_like):
  """crop + flip + Cutout after RandAugment(2, 9) / AutoAugment: two batches of 16 per config."""
  config = augment_config(crop_padding=4, flip=True, cutout_size=8, **overrides)
  tf_fn = augment.make_train_augment(config)
  ours = jax.jit(device_augment.make_device_augment(config))
  for offset in (0, 10_000):
    seeds = _seeds(len(cifar_like), offset=offset)
    expected = tf_fn(cifar_like, seeds).numpy()
    got = np.asarray(ours(cifar_like, device_augment.seed_words(seeds)))
    assert _differing(got, expected) <= AFFINE_BOUND, f"{overrides}, offset {offset}"
    # Whole examples equal, bar at most one boundary pixel each.
    per_example = np.any(got != expected, axis=-1).sum(axis=(1, 2))
    assert per_example.max() <= 1, per_example


@pytest.mark.slow
def test_randaugment_batch_at_224_px_equals_tf():
  """The ImageNet size: 50,176 pixels per image in the LUT statistics, 223-px affine products."""
  images = pil_reference.photos(224, 224)
  images = np.concatenate([images, images[:, ::-1], images[:, :, ::-1]])
  config = augment_config(
    crop_padding=16, flip=True, cutout_size=32, randaugment__num_ops=2, randaugment__magnitude=9
  )
  seeds = _seeds(len(images))
  expected = augment.make_train_augment(config, (224, 224, 3))(images, seeds).numpy()
  got = jax.jit(device_augment.make_device_augment(config, (224, 224, 3)))(
    images, device_augment.seed_words(seeds)
  )
  assert _differing(got, expected) <= AFFINE_BOUND


def test_batch_sharded_over_devices_equals_one_device(cifar_like):
  """The loop shards the batch axis: every example is independent of the others."""
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices (conftest forces 8 CPU devices)")
  mesh = jax.sharding.Mesh(np.array(devices[:8]), ("data",))
  config = augment_config(crop_padding=4, flip=True, cutout_size=8, autoaugment="cifar10")
  fn = device_augment.make_device_augment(config)
  seeds = device_augment.seed_words(_seeds(len(cifar_like)))
  whole = np.asarray(jax.jit(fn)(cifar_like, seeds))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  sharded = jax.jit(fn, out_shardings=sharding)(
    jax.device_put(cifar_like, sharding), jax.device_put(seeds, sharding)
  )
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), whole)


def test_to_model_input_resizes_and_normalises():
  images = np.full((2, 32, 32, 3), 255, np.uint8)
  out = device_augment.to_model_input(images, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
  assert out.shape == (2, 64, 64, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), 2.0, rtol=1e-6)


def test_bad_config_is_the_same_one_line_error_as_tf():
  with pytest.raises(ConfigError, match=r"magnitude=11; expected a number in \[0, 10\]") as info:
    device_augment.make_device_augment(augment_config(randaugment__magnitude=11))
  assert "\n" not in str(info.value)
  with pytest.raises(ConfigError, match="are both set"):
    device_augment.make_device_augment(
      augment_config(autoaugment="cifar10", randaugment__num_ops=2)
    )


def test_runs_with_tensorflow_tfds_and_wandb_blocked():
  """A bare accelerator image has none of the three: import and run a jitted RandAugment."""
  code = (
    "import sys\n"
    "for name in ('tensorflow', 'tensorflow_datasets', 'wandb'):\n"
    "  sys.modules[name] = None\n"
    "import numpy as np, jax\n"
    "from configs import common\n"
    "from jaxsam.data import device_augment as da\n"
    "cfg = common.get_base_config().augment\n"
    "cfg.randaugment.num_ops, cfg.cutout_size = 2, 8\n"
    "fn = jax.jit(da.make_device_augment(cfg, (16, 16, 3)))\n"
    "images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)\n"
    "seeds = da.example_seeds(1, 3, 4, np.arange(4))\n"
    "out = np.asarray(fn(images, seeds))\n"
    "assert out.shape == images.shape and (out != images).any()\n"
    "assert not any(m.startswith(('tensorflow', 'wandb')) for m in sys.modules\n"
    "               if sys.modules[m] is not None)\n"
    "print('ok')\n"
  )
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
  done = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.slow
def test_bench_device_only_prints_both_sizes_without_tensorflow(tmp_path):
  """bench/device_augment.py --device_only is what gpu_suite runs on a machine with no TF."""
  out = tmp_path / "augment.json"
  code = (
    "import runpy, sys\n"
    "for name in ('tensorflow', 'tensorflow_datasets', 'wandb'):\n"
    "  sys.modules[name] = None\n"
    f"sys.argv = ['device_augment.py', '--quick', '--device_only', '--json={out}']\n"
    "runpy.run_path('bench/device_augment.py', run_name='__main__')\n"
  )
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
  done = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert done.returncode == 0, failure(done)
  rows = json.loads(out.read_text())["rows"]
  assert [(r["path"], r["image_size"]) for r in rows] == [("device", 32), ("device", 64)]
  assert all(r["images_per_s"] > 0 and len(r["passes"]) == 2 for r in rows)
