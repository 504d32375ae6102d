"""ResNets in Flax: torchvision's ImageNet layout (v1.5 or v1) and He et al.'s CIFAR ResNets.

Parameter names mirror torchvision's (`conv1`, `bn1`, `layer1_0/conv1`, `downsample_conv`, `fc`) so
`pretrained.py` maps state dicts by renaming only. Convolutions use torch's explicit symmetric
padding: Flax's "SAME" pads stride-2 convs asymmetrically, the classic silent mismatch with
imported weights (google/flax #963).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"), as torchvision initialises convs.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias.
DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_dense_bias_init(key, shape, dtype, fan_in: int):
  """torch.nn.Linear's bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5
  return nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound


def conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
  """A bias-free conv with torch's padding (kernel // 2 on every side)."""
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=CONV_INIT,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def batch_norm(model: nn.Module, train: bool) -> Callable[..., nn.BatchNorm]:
  """BatchNorm factory for a model with `freeze_bn`, `bn_momentum`, `bn_epsilon` and `dtype`
  fields: batch statistics while training (running ones when frozen or evaluating), fp32 params."""
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train or model.freeze_bn,
    momentum=model.bn_momentum,
    epsilon=model.bn_epsilon,
    dtype=model.dtype,
    param_dtype=jnp.float32,
  )


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets); `shortcut` 'projection' or 'zero_pad'."""

  features: int
  stride: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  shortcut: str = (
    "projection"  # projection: 1x1 conv + BN (torchvision); zero_pad: He et al. option A
  )
  zero_init_residual: bool = False
  v1: bool = False  # unused: the basic block has no 1x1 conv to carry the stride

  @nn.compact
  def __call__(self, x):
    residual = x
    y = conv(self.features, 3, self.stride, "conv1", self.dtype)(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.features, 3, 1, "conv2", self.dtype)(y)
    y = self.norm(name="bn2", scale_init=_last_scale_init(self.zero_init_residual))(y)
    return nn.relu(y + _shortcut(self, residual, self.features))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4); the stride sits in the 3x3 (v1.5) or in the first 1x1 (`v1`)."""

  features: int
  stride: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  shortcut: str = "projection"
  zero_init_residual: bool = False
  v1: bool = False

  @nn.compact
  def __call__(self, x):
    residual = x
    stride1, stride3 = (self.stride, 1) if self.v1 else (1, self.stride)
    y = conv(self.features, 1, stride1, "conv1", self.dtype)(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.features, 3, stride3, "conv2", self.dtype)(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = conv(self.features * 4, 1, 1, "conv3", self.dtype)(y)
    y = self.norm(name="bn3", scale_init=_last_scale_init(self.zero_init_residual))(y)
    return nn.relu(y + _shortcut(self, residual, self.features * 4))


def _last_scale_init(zero: bool):
  """Zero-init of a block's last BN scale (Goyal et al. 2017) makes each block start as identity."""
  return nn.initializers.zeros if zero else nn.initializers.ones


def _shortcut(block: nn.Module, x, out_features: int):
  """The identity, or a projection when the shape changes (1x1 conv + BN, or He et al.'s option
  A)."""
  if block.stride == 1 and x.shape[-1] == out_features:
    return x
  if block.shortcut == "zero_pad":
    # Option A of He et al. 2016 (their CIFAR nets): subsample, then zero-pad the new channels.
    x = x[:, :: block.stride, :: block.stride, :]
    extra = out_features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  x = conv(out_features, 1, block.stride, "downsample_conv", block.dtype)(x)
  return block.norm(name="downsample_bn")(x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """A ResNet classifier on NHWC input; returns logits of shape (batch, num_classes).

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: 'basic' or 'bottleneck'.
    num_classes: width of the classifier head `fc`.
    widths: channels of each stage (the bottleneck's output is 4x).
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no pool).
    stem_width: channels of the stem conv.
    shortcut: 'projection' (torchvision) or 'zero_pad' (He et al.'s CIFAR option A).
    v1: stride in the bottleneck's first 1x1 conv (original paper and Keras' ResNet50).
    zero_init_residual: zero-init each block's last BN scale.
    freeze_bn: use the running BN statistics even when `train=True`.
    bn_momentum, bn_epsilon: Flax convention (torch's momentum 0.1 is Flax's 0.9).
    dtype: compute dtype; parameters stay float32.
  """

  stage_sizes: Sequence[int]
  block: str
  num_classes: int
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = "imagenet"
  stem_width: int = 64
  shortcut: str = "projection"
  v1: bool = False
  zero_init_residual: bool = False
  freeze_bn: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = batch_norm(self, train)
    x = x.astype(self.dtype)
    if self.stem == "cifar":
      x = conv(self.stem_width, 3, 1, "conv1", self.dtype)(x)
      x = nn.relu(norm(name="bn1")(x))
    else:
      x = conv(self.stem_width, 7, 2, "conv1", self.dtype)(x)
      x = nn.relu(norm(name="bn1")(x))
      # Padding with -inf (Flax's max_pool), as torch's MaxPool2d(3, 2, padding=1) does.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = BLOCKS[self.block]
    for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(size):
        x = block_cls(
          features=width,
          stride=2 if i > 0 and j == 0 else 1,
          norm=norm,
          dtype=self.dtype,
          shortcut=self.shortcut,
          zero_init_residual=self.zero_init_residual,
          v1=self.v1,
          name=f"layer{i + 1}_{j}",
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(
      self.num_classes,
      kernel_init=DENSE_INIT,
      bias_init=functools.partial(torch_dense_bias_init, fan_in=x.shape[-1]),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="fc",
    )(x)


IMAGENET_STAGES = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
  152: ("bottleneck", (3, 8, 36, 3)),
}


def imagenet_resnet(
  depth: int,
  num_classes: int,
  *,
  cifar_stem: bool = False,
  v1: bool = False,
  zero_init_residual: bool = False,
  freeze_bn: bool = False,
  width: int = 0,
  dtype: Any = jnp.float32,
) -> ResNet:
  """ResNet-18/34/50/101/152 as torchvision builds them (v1.5), or the v1 layout of Keras' ResNet50.

  Args:
    depth: 18, 34, 50, 101 or 152.
    num_classes: classifier width.
    cifar_stem: 3x3 stride-1 stem conv without max-pool, for 32 px training from scratch.
    v1: stride in the bottleneck's first 1x1 conv; BN epsilon 1.001e-5 and momentum 0.99 as in
      Keras' ResNet50, whose weights this layout imports (their conv biases fold into BN means).
    zero_init_residual: zero-init each block's last BN scale.
    freeze_bn: use running BN statistics when training.
    width: base width (0 = 64); stages use width x (1, 2, 4, 8).
    dtype: compute dtype.

  Returns:
    An unbound `ResNet` module.

  >>> model = imagenet_resnet(50, num_classes=1000)
  """
  block, stages = IMAGENET_STAGES[depth]
  base = width or 64
  return ResNet(
    stage_sizes=stages,
    block=block,
    num_classes=num_classes,
    widths=tuple(base * m for m in (1, 2, 4, 8)),
    stem="cifar" if cifar_stem else "imagenet",
    stem_width=base,
    v1=v1,
    zero_init_residual=zero_init_residual,
    freeze_bn=freeze_bn,
    bn_momentum=0.99 if v1 else 0.9,
    bn_epsilon=1.001e-5 if v1 else 1e-5,
    dtype=dtype,
  )


def cifar_resnet(
  depth: int,
  num_classes: int,
  *,
  zero_init_residual: bool = False,
  freeze_bn: bool = False,
  width: int = 0,
  dtype: Any = jnp.float32,
) -> ResNet:
  """He et al. 2016 §4.2 CIFAR ResNet: 6n+2 layers, 3 stages of n basic blocks, option-A shortcuts.

  Args:
    depth: 6n + 2 (8, 20, 32, 44, 56, 110, ...).
    num_classes: classifier width.
    zero_init_residual: zero-init each block's last BN scale.
    freeze_bn: use running BN statistics when training.
    width: base width (0 = 16); stages use width x (1, 2, 4).
    dtype: compute dtype.

  Returns:
    An unbound `ResNet` module (ResNet-20: 0.27M parameters, as in the paper's table 6).
  """
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
  n = (depth - 2) // 6
  base = width or 16
  return ResNet(
    stage_sizes=(n, n, n),
    block="basic",
    num_classes=num_classes,
    widths=(base, 2 * base, 4 * base),
    stem="cifar",
    stem_width=base,
    shortcut="zero_pad",
    zero_init_residual=zero_init_residual,
    freeze_bn=freeze_bn,
    dtype=dtype,
  )
