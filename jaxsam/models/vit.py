"""Vision Transformers in Flax (Dosovitskiy et al. 2021): patch embedding, class token or global
average pooling, learned position embeddings, pre-LayerNorm encoder blocks, linear head.

Parameter names follow the original ViT code (google-research/vision_transformer), so its `.npz`
files map by renaming only and `vit_import.py` maps timm's state dicts by splitting `qkv`:
`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3}`, `Transformer/encoder_norm`, `head`. With global average pooling the final LayerNorm
follows the mean (`fc_norm`, timm's layout) and there is no class token.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# The original ViT code's initialisers: Xavier-uniform dense kernels, N(0, 1e-6) MLP biases,
# N(0, 0.02) position embeddings, zero class token and head (the head is zeroed there as here).
DENSE_INIT = nn.initializers.xavier_uniform()
MLP_BIAS_INIT = nn.initializers.normal(stddev=1e-6)
POS_EMB_INIT = nn.initializers.normal(stddev=0.02)
LN_EPS = 1e-6  # the original code's and timm's LayerNorm epsilon


@dataclasses.dataclass(frozen=True)
class Size:
  """A ViT size: patch side, width, depth, heads and MLP width."""

  patch: int
  width: int
  depth: int
  heads: int
  mlp: int


SIZES = {
  "vit_ti16": Size(16, 192, 12, 3, 768),
  "vit_s16": Size(16, 384, 12, 6, 1536),
  "vit_b16": Size(16, 768, 12, 12, 3072),
  "vit_b32": Size(32, 768, 12, 12, 3072),
  "vit_l16": Size(16, 1024, 24, 16, 4096),
  # Patch 4 for CIFAR-sized images from scratch: 8 x 8 tokens at 32 px.
  "vit_ti4": Size(4, 192, 12, 3, 768),
  "vit_s4": Size(4, 384, 12, 6, 1536),
  # CPU-sized (the CPU study): 4 blocks of width 96, 16 tokens at 16 px.
  "vit_tiny": Size(4, 96, 4, 3, 384),
}
POOLS = ("token", "gap")


class MlpBlock(nn.Module):
  """Dense -> exact GELU -> dropout -> dense -> dropout."""

  mlp: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    dense = functools.partial(
      nn.Dense,
      kernel_init=DENSE_INIT,
      bias_init=MLP_BIAS_INIT,
      dtype=self.dtype,
      param_dtype=jnp.float32,
    )
    width = x.shape[-1]
    # Exact (erf) GELU as the original code (jax.nn.gelu(approximate=False)) and timm's nn.GELU.
    x = nn.gelu(dense(self.mlp, name="Dense_0")(x), approximate=False)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(width, name="Dense_1")(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class AddPositionEmbs(nn.Module):
  """x + a learned (1, tokens, width) embedding (`pos_embedding`, kept float32)."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", POS_EMB_INIT, (1, *x.shape[1:]), jnp.float32)
    return x + pos.astype(self.dtype)


class EncoderBlock(nn.Module):
  """x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))) (pre-LayerNorm)."""

  heads: int
  mlp: int
  dropout_rate: float
  drop_path_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(
      nn.LayerNorm, epsilon=LN_EPS, dtype=self.dtype, param_dtype=jnp.float32
    )
    # Stochastic depth (Huang et al. 2016): the whole residual branch of an example is dropped,
    # the kept ones scaled by 1/(1-p), as timm's DropPath.
    drop_path = functools.partial(
      nn.Dropout, self.drop_path_rate, broadcast_dims=(1, 2), deterministic=not train
    )
    y = norm(name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.heads,
      kernel_init=DENSE_INIT,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      dropout_rate=0.0,
      deterministic=True,
      name="MultiHeadDotProductAttention_1",
    )(y, y)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = x + drop_path()(y)
    y = norm(name="LayerNorm_2")(x)
    y = MlpBlock(self.mlp, self.dropout_rate, self.dtype, name="MlpBlock_3")(y, train)
    return x + drop_path()(y)


class Encoder(nn.Module):
  """Position embeddings, dropout, the blocks (drop-path rate rising linearly to the last)."""

  depth: int
  heads: int
  mlp: int
  dropout_rate: float
  drop_path_rate: float
  final_norm: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    x = AddPositionEmbs(self.dtype, name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # timm's schedule: linspace(0, drop_path_rate, depth), the first block never dropped.
    rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth > 1 else [0.0]
    for i in range(self.depth):
      x = EncoderBlock(
        self.heads,
        self.mlp,
        self.dropout_rate,
        float(rates[i]),
        self.dtype,
        name=f"encoderblock_{i}",
      )(x, train)
    if self.final_norm:
      x = nn.LayerNorm(
        epsilon=LN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="encoder_norm"
      )(x)
    return x


class ViT(nn.Module):
  """A ViT classifier on NHWC input (side a multiple of `patch`); returns (batch, num_classes).

  Attributes:
    num_classes: width of the head.
    patch, width, depth, heads, mlp: the size (see SIZES).
    pool: 'token' (class token, final LayerNorm before reading it) or 'gap' (no class token, mean
      of the patch tokens, then LayerNorm `fc_norm`).
    dropout_rate: dropout after the position embeddings, attention and MLP layers.
    drop_path_rate: stochastic depth of the last block (linear from 0 at the first).
    dtype: compute dtype; parameters stay float32.
  """

  num_classes: int
  patch: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp: int = 3072
  pool: str = "token"
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if x.shape[1] % self.patch or x.shape[2] % self.patch:
      raise ValueError(f"image size {x.shape[1:3]} is not a multiple of the patch {self.patch}")
    x = nn.Conv(
      self.width,
      (self.patch, self.patch),
      strides=(self.patch, self.patch),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="embedding",
    )(x.astype(self.dtype))
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.pool == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, c)), x], axis=1)
    x = Encoder(
      self.depth,
      self.heads,
      self.mlp,
      self.dropout_rate,
      self.drop_path_rate,
      final_norm=self.pool == "token",
      dtype=self.dtype,
      name="Transformer",
    )(x, train)
    if self.pool == "token":
      x = x[:, 0]
    else:
      x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="fc_norm")(
        jnp.mean(x, axis=1)
      )
    return nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="head",
    )(x)


def vit(
  name: str,
  num_classes: int,
  *,
  pool: str = "token",
  dropout_rate: float = 0.0,
  drop_path_rate: float = 0.0,
  dtype: Any = jnp.float32,
) -> ViT:
  """The ViT of a registered size (`vit_b16`, ...; see SIZES).

  >>> model = vit("vit_s16", num_classes=1000)
  """
  if pool not in POOLS:
    raise ValueError(f"ViT pool {pool!r} is unknown; known: {', '.join(POOLS)}")
  s = SIZES[name]
  return ViT(
    num_classes=num_classes,
    patch=s.patch,
    width=s.width,
    depth=s.depth,
    heads=s.heads,
    mlp=s.mlp,
    pool=pool,
    dropout_rate=dropout_rate,
    drop_path_rate=drop_path_rate,
    dtype=dtype,
  )
