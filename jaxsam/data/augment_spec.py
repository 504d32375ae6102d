"""What the train augmentation is, independent of the tensor library that runs it.

The op registry (each op's kind), RandAugment's op list, AutoAugment's CIFAR-10 policy, the
magnitude -> argument mappings, the random-stream numbers and the config checks, shared by the
tf.data implementation (`augment`) and the jax.numpy one (`device_augment`) so the two cannot
drift apart. Imports neither TensorFlow nor JAX: the mappings take the array module (`tf`, `np`
or `jnp`) that provides `floor`, `where` and `zeros_like`.
"""

from collections.abc import Callable

from jaxsam.errors import ConfigError

MAX_LEVEL = 10.0  # TF's RandAugment magnitude scale: 0..10
FILL_VALUE = 128  # grey for pixels an affine op uncovers and for Cutout (TF's `replace` value)
# Max translation as a fraction of the side: 10 px at 32 px, as the CIFAR AutoAugment code that
# searched the CIFAR-10 policy (TF's ImageNet code uses 100 px at 224, ~0.45).
TRANSLATE_FRACTION = 10.0 / 32.0
CROP_FILLS = ("reflect", "constant")

# Stream numbers: each random decision draws from its own stream of the example's seed.
STREAM_CROP_Y, STREAM_CROP_X, STREAM_FLIP, STREAM_CUTOUT_Y, STREAM_CUTOUT_X = range(5)
STREAM_AA_POLICY = 10
STREAM_AA_APPLY = 11  # + stage
STREAM_AA_SIGN = 13  # + stage
STREAM_RA = 100  # + 2 * round (op) and + 2 * round + 1 (sign)

# How each op is applied: 'identity'; 'lut' (a table from the argument alone); 'lut_stats' (a
# table from image statistics too); 'affine' (PIL's inverse map, nearest); 'blend' (with a
# derived image).
KINDS: dict[str, str] = {
  "identity": "identity",
  "autocontrast": "lut_stats",
  "equalize": "lut_stats",
  "invert": "lut",
  "solarize": "lut",
  "posterize": "lut",
  "brightness": "lut",
  "contrast": "lut_stats",
  "color": "blend",
  "sharpness": "blend",
  "rotate": "affine",
  "shear_x": "affine",
  "shear_y": "affine",
  "translate_x": "affine",
  "translate_y": "affine",
}

# RandAugment's 14 ops (Cubuk et al. 2019, section 3).
RANDAUGMENT_OPS = (
  "identity",
  "autocontrast",
  "equalize",
  "rotate",
  "solarize",
  "color",
  "posterize",
  "contrast",
  "brightness",
  "sharpness",
  "shear_x",
  "shear_y",
  "translate_x",
  "translate_y",
)

# AutoAugment's CIFAR-10 policy (Cubuk et al. 2018, appendix table): 25 sub-policies of two
# (op, probability, level) steps; levels of argument-free ops are unused.
AUTOAUGMENT_POLICIES: dict[str, tuple] = {
  "cifar10": (
    (("invert", 0.1, 7), ("contrast", 0.2, 6)),
    (("rotate", 0.7, 2), ("translate_x", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)),
    (("shear_y", 0.5, 8), ("translate_y", 0.7, 9)),
    (("autocontrast", 0.5, 8), ("equalize", 0.9, 2)),
    (("shear_y", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)),
    (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, 5), ("equalize", 0.5, 1)),
    (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translate_x", 0.5, 8)),
    (("equalize", 0.3, 7), ("autocontrast", 0.4, 8)),
    (("translate_y", 0.4, 3), ("sharpness", 0.2, 6)),
    (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2), ("invert", 0.0, 3)),
    (("equalize", 0.2, 0), ("autocontrast", 0.6, 0)),
    (("equalize", 0.2, 8), ("equalize", 0.6, 4)),
    (("color", 0.9, 9), ("equalize", 0.6, 6)),
    (("autocontrast", 0.8, 4), ("solarize", 0.2, 8)),
    (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("autocontrast", 0.9, 3)),
    (("translate_y", 0.9, 9), ("translate_y", 0.7, 9)),
    (("autocontrast", 0.9, 2), ("solarize", 0.8, 3)),
    (("equalize", 0.8, 8), ("invert", 0.1, 3)),
    (("translate_y", 0.7, 9), ("autocontrast", 0.9, 1)),
  )
}


def policy_names(policy: str) -> tuple[str, ...]:
  """The op names an AutoAugment policy indexes: 'identity' (a step not applied) then its ops."""
  subpolicies = AUTOAUGMENT_POLICIES[policy]
  return ("identity",) + tuple(sorted({op for sub in subpolicies for op, _, _ in sub}))


# ------------------------------------------------------------------------ magnitude -> argument


def randaugment_args(xp) -> dict[str, Callable]:
  """TF's RandAugment mapping (tensorflow/models official/vision/ops/augment.py `level_to_arg`),
  except translate: TRANSLATE_FRACTION of the side instead of a fixed 100 px.

  `xp`: the array module (tf, np or jnp). Each mapping: (level, negate, (height, width)) -> arg.
  """

  def signed(value, negate):
    return xp.where(negate, -value, value)

  def enhance(level, negate, size):
    del negate, size
    return level / MAX_LEVEL * 1.8 + 0.1

  def no_arg(level, negate, size):
    del negate, size
    return xp.zeros_like(level)

  return {
    "identity": no_arg,
    "autocontrast": no_arg,
    "equalize": no_arg,
    "invert": no_arg,
    "rotate": lambda level, negate, size: signed(level / MAX_LEVEL * 30.0, negate),
    "solarize": lambda level, negate, size: xp.floor(level / MAX_LEVEL * 256.0),
    "posterize": lambda level, negate, size: xp.floor(level / MAX_LEVEL * 4.0),
    "color": enhance,
    "contrast": enhance,
    "brightness": enhance,
    "sharpness": enhance,
    "shear_x": lambda level, negate, size: signed(level / MAX_LEVEL * 0.3, negate),
    "shear_y": lambda level, negate, size: signed(level / MAX_LEVEL * 0.3, negate),
    "translate_x": lambda level, negate, size: signed(
      level / MAX_LEVEL * TRANSLATE_FRACTION * size[1], negate
    ),
    "translate_y": lambda level, negate, size: signed(
      level / MAX_LEVEL * TRANSLATE_FRACTION * size[0], negate
    ),
  }


def autoaugment_args(xp) -> dict[str, Callable]:
  """The mapping the CIFAR-10 policy was searched with, where posterize and solarize grow
  stronger with the level (TF's RandAugment mapping runs them the other way):
  bits = 4 - int(level * 4 / 10), threshold = 256 - int(level * 256 / 10)."""
  return {
    **randaugment_args(xp),
    "posterize": lambda level, negate, size: 4.0 - xp.floor(level / MAX_LEVEL * 4.0),
    "solarize": lambda level, negate, size: 256.0 - xp.floor(level / MAX_LEVEL * 256.0),
  }


# ---------------------------------------------------------------------------------- config check


def check_config(augment_config, image_shape) -> None:
  """ConfigError (one line) for any augment value out of range or inconsistent."""
  height, width = image_shape[0], image_shape[1]
  padding = augment_config.crop_padding
  if not isinstance(padding, int) or padding < 0:
    raise ConfigError(f"augment.crop_padding={padding!r}; expected an int >= 0 (0 = no crop)")
  if augment_config.crop_fill not in CROP_FILLS:
    raise ConfigError(
      f"augment.crop_fill={augment_config.crop_fill!r}; expected one of {list(CROP_FILLS)}"
    )
  if augment_config.crop_fill == "reflect" and padding >= min(height, width):
    raise ConfigError(
      f"augment.crop_padding={padding} with crop_fill='reflect' must be < the "
      f"image side {min(height, width)}"
    )
  size = augment_config.cutout_size
  if not isinstance(size, int) or size < 0:
    raise ConfigError(f"augment.cutout_size={size!r}; expected an int >= 0 (0 = off)")
  num_ops = augment_config.randaugment.num_ops
  if not isinstance(num_ops, int) or num_ops < 0:
    raise ConfigError(f"augment.randaugment.num_ops={num_ops!r}; expected an int >= 0 (0 = off)")
  magnitude = augment_config.randaugment.magnitude
  if not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= MAX_LEVEL:
    raise ConfigError(
      f"augment.randaugment.magnitude={magnitude!r}; expected a number in "
      f"[0, {MAX_LEVEL:g}] (TF's RandAugment scale)"
    )
  policy = augment_config.autoaugment
  if policy and policy not in AUTOAUGMENT_POLICIES:
    raise ConfigError(
      f"augment.autoaugment={policy!r}; expected '' (off) or one of {list(AUTOAUGMENT_POLICIES)}"
    )
  if policy and num_ops > 0:
    raise ConfigError(
      f"augment.autoaugment={policy!r} and augment.randaugment.num_ops={num_ops} "
      f"are both set; use one of them (set the other to '' / 0)"
    )
  if len(image_shape) != 3 or image_shape[2] != 3:
    raise ConfigError(f"augmentation needs RGB images [H, W, 3], got image_shape={image_shape}")
