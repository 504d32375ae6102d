"""The host pipeline: deterministic stream, resumable, disjoint process shards, exact eval."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from configs import common
from jaxsam import errors, evaluate, losses, parallel, run_setup, steps
from jaxsam import state as state_lib
from jaxsam.data import datasource, pipeline, rows, sources


def make_split(n=50, size=4, num_classes=7, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  images[:, 0, :, 0] = (np.arange(n) % 256)[:, None]  # row 0, red: the example id (flip-proof)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  return sources.Split(images=images, labels=labels)


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def ids(batch):
  return batch["image"][:, 0, 0, 0].astype(int).tolist()


def flip_augment(images, seeds):
  """A seeded op: mirror where the example's stateless coin says so (makes seeds observable)."""
  coin = jax_free_coin(seeds)
  return tf.where(coin[:, None, None, None], tf.reverse(images, axis=[2]), images)


def jax_free_coin(seeds):
  return tf.map_fn(
    lambda s: tf.random.stateless_uniform([], seed=s) < 0.5, seeds, fn_output_signature=tf.bool
  )


def test_same_seed_same_batches_and_epochs_are_permutations():
  split = make_split()
  a = take(pipeline.train_batches(split, flip_augment, seed=3, global_batch=8), 12)
  b = take(pipeline.train_batches(split, flip_augment, seed=3, global_batch=8), 12)
  c = take(pipeline.train_batches(split, flip_augment, seed=4, global_batch=8), 12)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(ids(x) != ids(z) for x, z in zip(a, c))
  spe = rows.steps_per_epoch(50, 8)  # 6 full batches; the last 2 examples wait a turn
  epoch0 = [i for x in a[:spe] for i in ids(x)]
  assert len(set(epoch0)) == spe * 8
  assert [i for x in a[spe : 2 * spe] for i in ids(x)] != epoch0  # a new order every epoch


def test_resumed_stream_continues_the_same_batches():
  split = make_split()
  full = take(pipeline.train_batches(split, flip_augment, seed=1, global_batch=8), 15)
  resumed = take(
    pipeline.train_batches(split, flip_augment, seed=1, global_batch=8, start_step=9), 6
  )
  for x, y in zip(full[9:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_process_shards_are_disjoint_and_make_up_the_global_batch():
  split = make_split()
  one = take(pipeline.train_batches(split, flip_augment, seed=0, global_batch=8), 7)
  shards = [
    take(
      pipeline.train_batches(
        split, flip_augment, seed=0, global_batch=8, process_index=p, process_count=2
      ),
      7,
    )
    for p in range(2)
  ]
  for step, whole in enumerate(one):
    p0, p1 = shards[0][step], shards[1][step]
    assert not set(ids(p0)) & set(ids(p1))
    # Same examples, same augmentation: process count does not change the run.
    np.testing.assert_array_equal(np.concatenate([p0["image"], p1["image"]]), whole["image"])


def test_eval_stream_counts_every_example_once():
  split = make_split(n=50)
  seen, masked = [], 0
  for p in range(2):
    for batch in pipeline.eval_batches(split, global_batch=16, process_index=p, process_count=2):
      assert len(batch["label"]) == 8
      seen += [i for i, m in zip(ids(batch), batch["mask"]) if m]
      masked += int((batch["mask"] == 0).sum())
  assert sorted(seen) == list(range(50))
  assert masked == 64 - 50


def test_batch_larger_than_the_split_is_a_config_error():
  with pytest.raises(errors.ConfigError, match="batch_size=64 exceeds the 50 training examples"):
    rows.steps_per_epoch(50, 64)


class FixedLogits(nn.Module):
  """Logits that depend on the input only: predicts class (pixel value % classes)."""

  num_classes: int = 7

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    self.param("unused", nn.initializers.zeros, (1,))
    value = jnp.round(x[:, 0, 0, 0] * 255.0).astype(jnp.int32)
    return jax.nn.one_hot(value % self.num_classes, self.num_classes) * 10.0


def test_eval_accuracy_is_exact_with_a_padded_last_batch():
  """50 test examples, eval batch 16 on 8 devices: 4 batches, the last one mostly padding."""
  test = make_split(n=50, seed=1)
  ids_ = test.images[:, 0, 0, 0].astype(int)
  expected_correct = ids_ % 7 == test.labels
  data = sources.DatasetArrays(
    name="fixed", train=make_split(), test=test, num_classes=7, mean=(0.0,) * 3, std=(1.0,) * 3
  )
  mesh = parallel.make_mesh(jax.devices()[:8])
  cfg = state_lib.StepConfig(image_size=4, mean=(0.0,) * 3, std=(1.0,) * 3)
  model = FixedLogits()
  setup = run_setup.Setup(
    data=datasource.InMemory(data),
    model=model,
    step_config=cfg,
    num_classes=7,
    mesh=mesh,
    steps_per_epoch=1,
    total_steps=1,
  )
  eval_step = steps.compile_eval_step(mesh, model=model, cfg=cfg)
  state = parallel.replicate(state_lib.create_train_state(model, optax.identity(), cfg), mesh)
  result = evaluate.evaluate_test_split(eval_step, state, setup, global_batch=16)
  assert result["test/count"] == 50
  assert result["test/accuracy"] == pytest.approx(expected_correct.mean(), abs=1e-7)
  per_class = [
    expected_correct[test.labels == c].mean() if (test.labels == c).any() else 0.0 for c in range(7)
  ]
  np.testing.assert_allclose(result["per_class_accuracy"], per_class, atol=1e-7)
  logits = np.eye(7)[ids_ % 7] * 10.0
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  assert result["test/loss"] == pytest.approx(-logp[np.arange(50), test.labels].mean(), rel=1e-5)


def test_each_eval_program_takes_the_running_totals_of_the_one_before():
  """The eval step adds its batch to the totals it is given (so batches run one after another on
  each device), and the totals it was given are donated."""
  split = make_split(n=16, seed=2)
  mesh = parallel.make_mesh(jax.devices()[:8])
  cfg = state_lib.StepConfig(image_size=4, mean=(0.0,) * 3, std=(1.0,) * 3)
  model = FixedLogits()
  eval_step = steps.compile_eval_step(mesh, model=model, cfg=cfg)
  state = parallel.replicate(state_lib.create_train_state(model, optax.identity(), cfg), mesh)
  batch = next(pipeline.eval_batches(split, global_batch=16, process_index=0, process_count=1))
  zeros = parallel.replicate(losses.zero_eval_sums(7), mesh)
  once = eval_step(state, parallel.shard_batch(batch, mesh), zeros)
  assert zeros["count"].is_deleted()
  once_host = parallel.fetch(once)
  twice = parallel.fetch(eval_step(state, parallel.shard_batch(batch, mesh), once))
  assert once_host["count"] == 16
  for key, value in twice.items():
    np.testing.assert_array_equal(value, 2 * once_host[key], err_msg=key)


def test_every_config_file_builds_its_augmentation():
  """The study configs' augment presets are accepted by the augmentation builder."""
  from jaxsam.data import augment

  for preset in (common.use_cutout, common.use_randaugment, common.use_autoaugment):
    config = preset(common.get_base_config())
    fn = augment.make_train_augment(config.augment, image_shape=(32, 32, 3))
    out = fn(tf.zeros((2, 32, 32, 3), tf.uint8), tf.constant([[0, 1], [0, 2]], tf.int64))
    assert out.shape == (2, 32, 32, 3) and out.dtype == tf.uint8
