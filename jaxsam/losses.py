"""Cross-entropy and the counts that eval aggregates: all in fp32, all mask-aware."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy in fp32 (logits may be bf16)."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def correct_top1(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the arg-max class is the label, per example."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def correct_topk(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits, per example (k clipped to the classes)."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits.astype(jnp.float32), k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Masked sums over a batch: padded examples (mask 0) count nowhere, each real one once."""
  mask = mask.astype(jnp.float32)
  num_classes = logits.shape[-1]
  correct = correct_top1(logits, labels) * mask
  label_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
  return {
    "loss": jnp.sum(cross_entropy(logits, labels) * mask),
    "correct": jnp.sum(correct),
    "correct_top5": jnp.sum(correct_topk(logits, labels, 5) * mask),
    "count": jnp.sum(mask),
    "class_correct": jnp.sum(label_hot * correct[:, None], axis=0),
    "class_count": jnp.sum(label_hot, axis=0),
  }


def zero_eval_sums(num_classes: int) -> dict[str, np.ndarray]:
  """The running totals of `eval_sums` before the first batch: its outputs' shapes, all zero."""
  shapes = jax.eval_shape(
    eval_sums,
    jax.ShapeDtypeStruct((1, num_classes), jnp.float32),
    jax.ShapeDtypeStruct((1,), jnp.int32),
    jax.ShapeDtypeStruct((1,), jnp.float32),
  )
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
