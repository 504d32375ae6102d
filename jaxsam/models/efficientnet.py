"""EfficientNet-B0..B7 in Flax, laid out as Keras' EfficientNetB0..B7 (the official TF port).

Module names follow Keras' layer names (`stem_conv`, `block2a/expand_conv`, `top_bn`, `predictions`)
so `pretrained.py` maps Keras weight files by name. `padding="same"` is TF's SAME (asymmetric on
stride-2 convs), which TF-trained weights need; `padding="torch"` is torchvision's symmetric
(k-1)//2, which its EfficientNet weights need: the two layouts are not interchangeable.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxsam.models.resnet import batch_norm

# Keras' CONV_KERNEL_INITIALIZER and DENSE_KERNEL_INITIALIZER for EfficientNet.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


@dataclasses.dataclass(frozen=True)
class StageArgs:
  """One stage of B0 before compound scaling (Keras' DEFAULT_BLOCKS_ARGS)."""

  kernel: int
  repeats: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  stride: int


B0_STAGES = (
  StageArgs(3, 1, 32, 16, 1, 1),
  StageArgs(3, 2, 16, 24, 6, 2),
  StageArgs(5, 2, 24, 40, 6, 2),
  StageArgs(3, 3, 40, 80, 6, 2),
  StageArgs(5, 3, 80, 112, 6, 1),
  StageArgs(5, 4, 112, 192, 6, 2),
  StageArgs(3, 1, 192, 320, 6, 1),
)

# name -> (width coefficient, depth coefficient, native resolution, head dropout), as Keras.
VARIANTS = {
  "b0": (1.0, 1.0, 224, 0.2),
  "b1": (1.0, 1.1, 240, 0.2),
  "b2": (1.1, 1.2, 260, 0.3),
  "b3": (1.2, 1.4, 300, 0.3),
  "b4": (1.4, 1.8, 380, 0.4),
  "b5": (1.6, 2.2, 456, 0.4),
  "b6": (1.8, 2.6, 528, 0.5),
  "b7": (2.0, 3.1, 600, 0.5),
}
SE_RATIO = 0.25


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count and rounds to a multiple of 8, never losing more than 10%."""
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth: float) -> int:
  """Scales a stage's block count, rounding up."""
  return math.ceil(depth * repeats)


def conv_padding(kernel: int, stride: int, padding: str):
  """TF 'SAME' (Flax computes it as TF does) or torch's symmetric (k-1)//2."""
  if padding == "same":
    return "SAME"
  pad = (kernel - 1) // 2
  return ((pad, pad), (pad, pad))


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand, depthwise kxk, squeeze-excitation, 1x1 project, drop-connect."""

  filters_in: int
  filters_out: int
  kernel: int
  stride: int
  expand_ratio: int
  drop_rate: float
  norm: Callable[..., nn.Module]
  padding: str = "same"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, train: bool):
    conv = functools.partial(
      nn.Conv, use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype, param_dtype=jnp.float32
    )
    filters = self.filters_in * self.expand_ratio
    x = inputs
    if self.expand_ratio != 1:
      x = conv(filters, (1, 1), name="expand_conv")(x)
      x = nn.swish(self.norm(name="expand_bn")(x))
    x = conv(
      filters,
      (self.kernel, self.kernel),
      strides=(self.stride, self.stride),
      padding=conv_padding(self.kernel, self.stride, self.padding),
      feature_group_count=filters,
      name="dwconv",
    )(x)
    x = nn.swish(self.norm(name="bn")(x))
    x = x * squeeze_excite(x, max(1, int(self.filters_in * SE_RATIO)), self.dtype)
    x = conv(self.filters_out, (1, 1), name="project_conv")(x)
    x = self.norm(name="project_bn")(x)
    if self.stride == 1 and self.filters_in == self.filters_out:
      # Drop-connect: drop the whole residual branch per example, rescaled by 1/(1-rate).
      x = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(x)
      x = x + inputs
    return x


def squeeze_excite(x, squeeze: int, dtype: Any):
  """Channel gates in (0, 1) from the spatial mean: 1x1 conv -> swish -> 1x1 conv -> sigmoid."""
  conv = functools.partial(
    nn.Conv, kernel_size=(1, 1), kernel_init=CONV_INIT, dtype=dtype, param_dtype=jnp.float32
  )
  s = jnp.mean(x, axis=(1, 2), keepdims=True)
  s = nn.swish(conv(squeeze, name="se_reduce")(s))
  return nn.sigmoid(conv(x.shape[-1], name="se_expand")(s))


class EfficientNet(nn.Module):
  """EfficientNet classifier on NHWC input; returns logits (batch, num_classes).

  Attributes:
    width, depth: compound-scaling coefficients (see `VARIANTS`).
    num_classes: width of the `predictions` head.
    dropout_rate: dropout before the head.
    drop_connect_rate: stochastic depth of the last block (linear in the block index).
    padding: 'same' (TF/Keras weights) or 'torch' (torchvision weights).
    freeze_bn: use the running BN statistics even when `train=True`.
    bn_momentum, bn_epsilon: Flax convention; Keras uses 0.99 and 1e-3.
    dtype: compute dtype; parameters stay float32.
  """

  width: float
  depth: float
  num_classes: int
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  padding: str = "same"
  freeze_bn: bool = False
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = batch_norm(self, train)
    conv = functools.partial(
      nn.Conv, use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype, param_dtype=jnp.float32
    )
    x = x.astype(self.dtype)
    x = conv(
      round_filters(32, self.width),
      (3, 3),
      strides=(2, 2),
      padding=conv_padding(3, 2, self.padding),
      name="stem_conv",
    )(x)
    x = nn.swish(norm(name="stem_bn")(x))
    total = sum(round_repeats(s.repeats, self.depth) for s in B0_STAGES)
    b = 0
    for i, stage in enumerate(B0_STAGES):
      filters_in = round_filters(stage.filters_in, self.width)
      filters_out = round_filters(stage.filters_out, self.width)
      for j in range(round_repeats(stage.repeats, self.depth)):
        x = MBConv(
          filters_in=filters_in if j == 0 else filters_out,
          filters_out=filters_out,
          kernel=stage.kernel,
          stride=stage.stride if j == 0 else 1,
          expand_ratio=stage.expand_ratio,
          drop_rate=self.drop_connect_rate * b / total,
          norm=norm,
          padding=self.padding,
          dtype=self.dtype,
          name=f"block{i + 1}{chr(j + 97)}",
        )(x, train)
        b += 1
    x = conv(round_filters(1280, self.width), (1, 1), name="top_conv")(x)
    x = nn.swish(norm(name="top_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(
      self.num_classes,
      kernel_init=DENSE_INIT,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="predictions",
    )(x)


def efficientnet(
  variant: str,
  num_classes: int,
  *,
  dropout_rate: float | None = None,
  drop_connect_rate: float = 0.2,
  layout: str = "keras",
  freeze_bn: bool = False,
  dtype: Any = jnp.float32,
) -> EfficientNet:
  """EfficientNet-B0..B7 with Keras' compound scaling.

  Args:
    variant: 'b0' .. 'b7'.
    num_classes: classifier width.
    dropout_rate: dropout before the head (None = the variant's: 0.2 .. 0.5).
    drop_connect_rate: stochastic-depth rate of the last block (Keras and torchvision: 0.2).
    layout: 'keras' (TF SAME padding, BN eps 1e-3, momentum 0.99: Keras / TF weights) or
      'torchvision' (symmetric padding; BN eps 1e-5 and torch momentum 0.1 for B0-B4, as
      torchvision builds them; its B5-B7 use eps 1e-3 and momentum 0.01).
    freeze_bn: use running BN statistics when training.
    dtype: compute dtype.

  Returns:
    An unbound `EfficientNet` (B0: 5,288,548 parameters with 1000 classes).

  >>> model = efficientnet("b0", num_classes=1000)
  """
  width, depth, _, default_dropout = VARIANTS[variant]
  tf_bn = layout == "keras" or variant in ("b5", "b6", "b7")
  return EfficientNet(
    width=width,
    depth=depth,
    num_classes=num_classes,
    dropout_rate=default_dropout if dropout_rate is None else dropout_rate,
    drop_connect_rate=drop_connect_rate,
    padding="same" if layout == "keras" else "torch",
    freeze_bn=freeze_bn,
    bn_momentum=0.99 if tf_bn else 0.9,
    bn_epsilon=1e-3 if tf_bn else 1e-5,
    dtype=dtype,
  )
