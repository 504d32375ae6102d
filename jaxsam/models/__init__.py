"""Model registry: `config.model.name` -> a Flax module, through one explicit dict.

Every module is called as `module.apply(variables, x, train=...)` on NHWC input already normalised
at `config.model.image_size`; BatchNorm statistics live in the `batch_stats` collection and
dropout / drop-connect draw from the `dropout` rng.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxsam.errors import ConfigError
from jaxsam.models import efficientnet, resnet, vit, wide_resnet


def _opt(model_config, key: str, default):
  """A config value, or `default` when the key is absent (tests pass partial configs)."""
  return model_config.get(key, default) if hasattr(model_config, "get") else default


def _rate(model_config, key: str, default: float) -> float:
  """A rate key where a negative value means the architecture's default."""
  value = _opt(model_config, key, -1.0)
  return default if value is None or value < 0 else float(value)


def _imagenet_resnet(depth: int, model_config, num_classes: int, dtype: Any) -> nn.Module:
  return resnet.imagenet_resnet(
    depth,
    num_classes,
    cifar_stem=bool(_opt(model_config, "cifar_stem", False)),
    v1=bool(_opt(model_config, "resnet_v1", False)),
    zero_init_residual=bool(_opt(model_config, "zero_init_residual", False)),
    freeze_bn=bool(_opt(model_config, "freeze_bn", False)),
    width=int(_opt(model_config, "width", 0)),
    dtype=dtype,
  )


def _cifar_resnet(depth: int, model_config, num_classes: int, dtype: Any) -> nn.Module:
  return resnet.cifar_resnet(
    depth,
    num_classes,
    zero_init_residual=bool(_opt(model_config, "zero_init_residual", False)),
    freeze_bn=bool(_opt(model_config, "freeze_bn", False)),
    width=int(_opt(model_config, "width", 0)),
    dtype=dtype,
  )


def _wide_resnet(depth: int, k: int, model_config, num_classes: int, dtype: Any) -> nn.Module:
  return wide_resnet.wide_resnet(
    depth,
    k,
    num_classes,
    dropout_rate=_rate(model_config, "dropout_rate", 0.0),
    freeze_bn=bool(_opt(model_config, "freeze_bn", False)),
    dtype=dtype,
  )


def _efficientnet(
  variant: str, layout: str, model_config, num_classes: int, dtype: Any
) -> nn.Module:
  default_dropout = efficientnet.VARIANTS[variant][3]
  return efficientnet.efficientnet(
    variant,
    num_classes,
    dropout_rate=_rate(model_config, "dropout_rate", default_dropout),
    drop_connect_rate=_rate(model_config, "drop_connect_rate", 0.2),
    layout=layout,
    freeze_bn=bool(_opt(model_config, "freeze_bn", False)),
    dtype=dtype,
  )


def _vit(name: str, model_config, num_classes: int, dtype: Any) -> nn.Module:
  pool = _opt(model_config, "pool", "token")
  if pool not in vit.POOLS:
    raise ConfigError(f"model.pool={pool!r} is unknown; known: {', '.join(vit.POOLS)}")
  return vit.vit(
    name,
    num_classes,
    pool=pool,
    dropout_rate=_rate(model_config, "dropout_rate", 0.0),
    drop_path_rate=_rate(model_config, "drop_connect_rate", 0.0),
    dtype=dtype,
  )


Constructor = Callable[[Any, int, Any], nn.Module]

MODELS: dict[str, Constructor] = {
  **{f"resnet{d}": functools.partial(_imagenet_resnet, d) for d in (18, 34, 50, 101, 152)},
  **{f"resnet{d}": functools.partial(_cifar_resnet, d) for d in (8, 20, 32, 56)},
  "wrn28_10": functools.partial(_wide_resnet, 28, 10),
  # Keras / TF layout (TF "SAME" padding): imports Keras EfficientNetB0..B7 weight files.
  **{
    f"efficientnet_{v}": functools.partial(_efficientnet, v, "keras") for v in efficientnet.VARIANTS
  },
  # torchvision layout (symmetric padding, torch BN eps): imports torchvision efficientnet_b0..b7.
  **{
    f"efficientnet_{v}_torchvision": functools.partial(_efficientnet, v, "torchvision")
    for v in efficientnet.VARIANTS
  },
  # Vision Transformers: original-ViT parameter names; imports timm state dicts and ViT .npz files.
  **{name: functools.partial(_vit, name) for name in vit.SIZES},
}


def create_model(model_config, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """Builds the Flax module named by `model_config.name`.

  Args:
    model_config: `config.model` (keys in configs/common.py: name, freeze_bn, cifar_stem,
      resnet_v1, zero_init_residual, dropout_rate, drop_connect_rate, width, pool).
    num_classes: classifier width.
    dtype: compute dtype (float32 or bfloat16); parameters are always float32.

  Returns:
    An unbound module; `module.init({'params': k1, 'dropout': k2}, x, train=False)` makes its
    variables.

  Raises:
    ConfigError: the name is not registered (the message lists the known names).
  """
  name = model_config.name
  if name not in MODELS:
    raise ConfigError(f"unknown config.model.name {name!r}; known: {', '.join(sorted(MODELS))}")
  if num_classes < 1:
    raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
  return MODELS[name](model_config, num_classes, jnp.dtype(dtype))
