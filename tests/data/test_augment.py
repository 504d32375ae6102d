"""Tests for jaxsam.data.augment: every op against PIL on real photos, eagerly and in Dataset.map;
crop / flip / Cutout geometry; RandAugment / AutoAugment composition; determinism; config errors."""

import ast
import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf

from jaxsam.data import augment, augment_spec
from jaxsam.errors import ConfigError
from support import pil_reference
from support.augment_configs import augment_config

HEIGHT, WIDTH = pil_reference.HEIGHT, pil_reference.WIDTH
_assert_matches_pil = pil_reference.assert_matches_pil


def test_registry_holds_randaugment_ops_and_the_policy_ops():
  assert set(augment.RANDAUGMENT_OPS) <= set(augment.OPS) and len(augment.RANDAUGMENT_OPS) == 14
  policy_ops = {op for sub in augment.AUTOAUGMENT_POLICIES["cifar10"] for op, _, _ in sub}
  assert policy_ops <= set(augment.OPS) and "invert" in policy_ops
  assert set(augment.OPS) == set(augment.RANDAUGMENT_ARGS) == set(augment.AUTOAUGMENT_ARGS)


@pytest.mark.parametrize("name", sorted(augment.OPS))
def test_op_matches_pil_eagerly_and_in_dataset_map(name, photos):
  images, batch_args, expected = pil_reference.op_cases(name, photos)
  # Eager: one HWC image with a scalar argument, and the whole batch, one argument per example.
  for i in (0, len(images) - 1):
    ours = augment.OPS[name](images[i], float(batch_args[i])).numpy()
    _assert_matches_pil(name, ours, expected[i], f"{name}({batch_args[i]}) single image")
  eager = augment.OPS[name](images, batch_args).numpy()
  # Graph mode: the batched op inside tf.data.
  dataset = tf.data.Dataset.from_tensor_slices((images, batch_args)).batch(len(images))
  (in_map,) = list(dataset.map(augment.OPS[name]).as_numpy_iterator())
  for i, arg in enumerate(batch_args):
    _assert_matches_pil(name, eager[i], expected[i], f"{name}({arg}) photo {i % 3} eager")
    _assert_matches_pil(name, in_map[i], expected[i], f"{name}({arg}) photo {i % 3} in map")


def test_posterize_zero_bits_is_black_as_tf(photos):
  np.testing.assert_array_equal(augment.OPS["posterize"](photos, 0).numpy(), 0)


def test_level_to_arg_follows_tf_mapping():
  def arg(mapping, name, level, negate=False):
    level = tf.constant([level], tf.float64)
    return float(mapping[name](level, tf.constant([negate]), (32, 32))[0])

  ra = augment.RANDAUGMENT_ARGS
  assert arg(ra, "rotate", 9.0) == pytest.approx(27.0)
  assert arg(ra, "rotate", 9.0, True) == pytest.approx(-27.0)
  assert arg(ra, "shear_x", 10.0) == pytest.approx(0.3)
  assert arg(ra, "translate_y", 9.0, True) == pytest.approx(-9.0)  # 10 px max at 32 px
  assert arg(ra, "color", 9.0) == pytest.approx(1.72)
  assert arg(ra, "sharpness", 0.0) == pytest.approx(0.1)
  assert arg(ra, "solarize", 9.0) == 230.0 and arg(ra, "posterize", 9.0) == 3.0
  aa = augment.AUTOAUGMENT_ARGS  # the CIFAR AutoAugment code's direction
  assert arg(aa, "solarize", 2.0) == 205.0 and arg(aa, "posterize", 7.0) == 2.0


def _torchvision_cifar10_policy():
  """torchvision's CIFAR-10 policy, read from its source without importing torch."""
  spec = importlib.util.find_spec("torchvision")
  if spec is None:
    pytest.skip("torchvision is not installed")
  path = os.path.join(os.path.dirname(spec.origin), "transforms", "autoaugment.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.If)
      and isinstance(node.test, ast.Compare)
      and ast.unparse(node.test).endswith("AutoAugmentPolicy.CIFAR10")
    ):
      return ast.literal_eval(node.body[0].value)
  pytest.fail("CIFAR-10 policy not found in torchvision's autoaugment.py")


def test_autoaugment_cifar10_policy_equals_torchvision():
  rename = {
    "Invert": "invert",
    "Contrast": "contrast",
    "Rotate": "rotate",
    "TranslateX": "translate_x",
    "TranslateY": "translate_y",
    "Sharpness": "sharpness",
    "ShearY": "shear_y",
    "AutoContrast": "autocontrast",
    "Equalize": "equalize",
    "Posterize": "posterize",
    "Color": "color",
    "Brightness": "brightness",
    "Solarize": "solarize",
  }
  theirs = _torchvision_cifar10_policy()
  ours = augment.AUTOAUGMENT_POLICIES["cifar10"]
  assert len(ours) == len(theirs) == 25
  for sub_ours, sub_theirs in zip(ours, theirs):
    for (name, prob, level), (t_name, t_prob, t_level) in zip(sub_ours, sub_theirs):
      assert (name, prob) == (rename[t_name], t_prob)
      assert t_level is None or level == t_level  # None: the op takes no magnitude


def _seeds(n, offset=0):
  return np.stack([np.arange(n) + offset, np.full(n, 12345)], axis=1).astype(np.int64)


def test_apply_ops_equals_each_examples_op_alone(photos):
  """The grouped batch computation equals applying each example's own op on its own."""
  names = augment.RANDAUGMENT_OPS + ("invert",)
  n = 2 * len(names)
  images = np.concatenate([photos] * (n // len(photos) + 1))[:n]
  index = tf.constant(np.arange(n) % len(names), tf.int32)
  levels = tf.constant(np.linspace(0, 10, n), tf.float64)
  negate = tf.constant(np.arange(n) % 3 == 0)
  batched = augment.apply_ops(
    tf.constant(images), names, index, levels, negate, augment.RANDAUGMENT_ARGS
  ).numpy()
  for i in range(n):
    name = names[int(index[i])]
    arg = augment.RANDAUGMENT_ARGS[name](levels[i : i + 1], negate[i : i + 1], (HEIGHT, WIDTH))
    np.testing.assert_array_equal(
      batched[i], augment.OPS[name](images[i], arg[0]).numpy(), err_msg=f"example {i}: {name}"
    )


def test_random_crop_is_a_window_of_the_padded_image(photos):
  images = np.concatenate([photos] * 20)
  for fill, mode in (("reflect", "reflect"), ("constant", "constant")):
    fn = augment.make_train_augment(
      augment_config(crop_padding=4, crop_fill=fill), image_shape=(HEIGHT, WIDTH, 3)
    )
    out = fn(images, _seeds(len(images))).numpy()
    assert out.shape == images.shape
    offsets = set()
    for image, cropped in zip(images, out):
      padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode=mode)
      found = [
        (dy, dx)
        for dy in range(9)
        for dx in range(9)
        if np.array_equal(padded[dy : dy + HEIGHT, dx : dx + WIDTH], cropped)
      ]
      assert found, f"{fill}: output is no window of the padded image"
      offsets.update(found)
    assert len(offsets) > 20  # offsets vary over the 81 possible


def test_flip_is_identity_or_mirror(photos):
  images = np.concatenate([photos] * 20)
  seeds = _seeds(len(images))
  fn = augment.make_train_augment(augment_config(flip=True), image_shape=(HEIGHT, WIDTH, 3))
  out = fn(images, seeds).numpy()
  mirrored = [np.array_equal(o, i[:, ::-1]) for i, o in zip(images, out)]
  same = [np.array_equal(o, i) for i, o in zip(images, out)]
  assert not any(m and s for m, s in zip(mirrored, same))  # photos are not symmetric
  assert all(m or s for m, s in zip(mirrored, same))
  assert 15 <= sum(mirrored) <= 45  # about half of 60
  # Each example mirrors on its own seed's draw, the draw the crop-and-Cutout gather uses.
  drawn = augment.uniform(tf.constant(seeds), augment_spec.STREAM_FLIP).numpy() < 0.5
  assert mirrored == drawn.tolist()


def test_cutout_removes_a_clipped_square():
  size = 16
  images = np.random.default_rng(0).integers(0, 100, (200, 32, 32, 3), dtype=np.uint8)
  fn = augment.make_train_augment(augment_config(cutout_size=size))
  out = fn(images, _seeds(200)).numpy()
  clipped = 0
  for image, cut in zip(images, out):
    changed = np.any(cut != image, axis=-1)
    rows, cols = np.nonzero(changed)
    assert len(rows) > 0 and np.all(cut[changed] == augment.FILL_VALUE)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert changed[top:bottom, left:right].all() and changed.sum() == (bottom - top) * (
      right - left
    )
    assert bottom - top <= size and right - left <= size
    # A side shorter than `size` only where the square meets a border.
    assert bottom - top == size or top == 0 or bottom == 32
    assert right - left == size or left == 0 or right == 32
    clipped += (bottom - top) * (right - left) < size * size
  assert 20 < clipped < 200  # centres are uniform over the image: many squares are clipped


def test_augment_is_deterministic_per_example_and_seed_dependent(photos):
  config = augment_config(
    crop_padding=4, flip=True, cutout_size=8, randaugment__num_ops=2, randaugment__magnitude=9
  )
  fn = augment.make_train_augment(config, image_shape=(HEIGHT, WIDTH, 3))
  images = np.concatenate([photos] * 4)
  seeds = _seeds(len(images))
  first = fn(images, seeds).numpy()
  np.testing.assert_array_equal(first, fn(images, seeds).numpy())
  # An example's result depends on its seed only, not on its batch.
  np.testing.assert_array_equal(first[5], fn(images[5:6], seeds[5:6]).numpy()[0])
  other = fn(images, _seeds(len(images), offset=1000)).numpy()
  assert np.mean([not np.array_equal(a, b) for a, b in zip(first, other)]) > 0.8
  # Same in graph mode inside tf.data (int32 seeds accepted too).
  dataset = tf.data.Dataset.from_tensor_slices((images, seeds.astype(np.int32))).batch(5)
  in_map = np.concatenate(list(dataset.map(fn).as_numpy_iterator()))
  np.testing.assert_array_equal(in_map, first)


def test_randaugment_draws_ops_and_signs_uniformly():
  seeds = tf.constant(_seeds(14000))
  counts = np.bincount(augment._randint(seeds, augment._STREAM_RA, 14).numpy(), minlength=14)
  assert counts.min() > 850 and counts.max() < 1150  # 1000 expected, ~32 std
  negate = augment.uniform(seeds, augment._STREAM_RA + 1).numpy() < 0.5
  assert 0.48 < negate.mean() < 0.52
  # Streams of one seed are independent: op choice vs sign.
  both = np.mean(negate[augment._randint(seeds, augment._STREAM_RA, 14).numpy() == 3])
  assert 0.44 < both < 0.56


def test_autoaugment_runs_in_graph_mode_and_changes_images(photos):
  fn = augment.make_train_augment(
    augment_config(autoaugment="cifar10"), image_shape=(HEIGHT, WIDTH, 3)
  )
  images = np.concatenate([photos] * 30)
  seeds = _seeds(len(images))
  eager = fn(images, seeds).numpy()
  dataset = tf.data.Dataset.from_tensor_slices((images, seeds)).batch(16)
  np.testing.assert_array_equal(np.concatenate(list(dataset.map(fn).as_numpy_iterator())), eager)
  changed = np.mean([not np.array_equal(a, b) for a, b in zip(images, eager)])
  # Probability that neither step applies, averaged over the 25 sub-policies, is ~0.27.
  assert 0.55 < changed < 0.9


@pytest.mark.parametrize(
  "overrides, pattern",
  [
    ({"randaugment__magnitude": 11}, r"magnitude=11; expected a number in \[0, 10\]"),
    ({"randaugment__magnitude": -1}, r"magnitude=-1"),
    ({"randaugment__num_ops": -2}, r"num_ops=-2; expected an int >= 0"),
    (
      {"autoaugment": "imagenet"},
      r"autoaugment='imagenet'; expected '' \(off\) or one of \['cifar10'\]",
    ),
    ({"autoaugment": "cifar10", "randaugment__num_ops": 2}, r"are both set"),
    ({"crop_fill": "wrap"}, r"crop_fill='wrap'; expected one of \['reflect', 'constant'\]"),
    ({"crop_padding": 40, "crop_fill": "reflect"}, r"must be < the image side 32"),
    ({"cutout_size": -1}, r"cutout_size=-1"),
  ],
)
def test_bad_config_is_a_one_line_config_error(overrides, pattern):
  with pytest.raises(ConfigError, match=pattern) as info:
    augment.make_train_augment(augment_config(**overrides))
  assert "\n" not in str(info.value)
