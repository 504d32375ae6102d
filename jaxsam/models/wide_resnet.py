"""Wide ResNets (Zagoruyko & Komodakis 2016), the SAM paper's CIFAR model (WRN-28-10).

Pre-activation blocks: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3; a 1x1 projection of the
pre-activated input when the shape changes. From scratch at 32 px, so no pretrained layout to match.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxsam.models.resnet import batch_norm, conv


class WideBlock(nn.Module):
  """A pre-activation basic block with dropout between its two convs."""

  features: int
  stride: int
  dropout_rate: float
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(self.norm(name="bn1")(x))
    # The projection reads the pre-activated input, as in the reference implementation.
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, "shortcut_conv", self.dtype)(y)
    y = conv(self.features, 3, self.stride, "conv1", self.dtype)(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, 3, 1, "conv2", self.dtype)(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-depth-k: 3 groups of (depth-4)/6 wide blocks of widths 16k, 32k, 64k.

  Attributes:
    depth: 6n + 4 (28 for WRN-28-10).
    widen_factor: k (10 for WRN-28-10).
    num_classes: classifier width.
    dropout_rate: dropout inside each block (the WRN paper's optional 0.3; SAM used none).
    freeze_bn: use the running BN statistics even when `train=True`.
    dtype: compute dtype; parameters stay float32.
  """

  depth: int
  widen_factor: int
  num_classes: int
  dropout_rate: float = 0.0
  freeze_bn: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
    n = (self.depth - 4) // 6
    norm = batch_norm(self, train)
    x = conv(16, 3, 1, "conv1", self.dtype)(x.astype(self.dtype))
    for i, width in enumerate((16, 32, 64)):
      for j in range(n):
        x = WideBlock(
          features=width * self.widen_factor,
          stride=2 if i > 0 and j == 0 else 1,
          dropout_rate=self.dropout_rate,
          norm=norm,
          dtype=self.dtype,
          name=f"group{i + 1}_{j}",
        )(x, train)
    x = nn.relu(norm(name="bn_final")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)


def wide_resnet(
  depth: int,
  widen_factor: int,
  num_classes: int,
  *,
  dropout_rate: float = 0.0,
  freeze_bn: bool = False,
  dtype: Any = jnp.float32,
) -> WideResNet:
  """WRN-depth-widen_factor for 32 px CIFAR input.

  Args:
    depth: 6n + 4.
    widen_factor: channel multiplier k.
    num_classes: classifier width.
    dropout_rate: dropout between each block's convs.
    freeze_bn: use running BN statistics when training.
    dtype: compute dtype.

  Returns:
    An unbound `WideResNet` (WRN-28-10 with 10 classes: 36,479,194 parameters).

  >>> model = wide_resnet(28, 10, num_classes=100)
  """
  return WideResNet(
    depth=depth,
    widen_factor=widen_factor,
    num_classes=num_classes,
    dropout_rate=dropout_rate,
    freeze_bn=freeze_bn,
    dtype=dtype,
  )
