"""Train-time augmentation of uint8 batches in core TF ops: RandAugment / AutoAugment, crop, flip,
Cutout.

Every op works on a whole batch [B, H, W, C] with one argument per example, so a batch costs a
fixed set of TF kernels rather than B per-example `tf.switch_case` branches (keras' per-image
RandAugment inside tf.data: 900-1,800 images/s on the 2-core dev box). Each RandAugment round
partitions the batch by the kind of op each example drew, runs each kind once on its group and
stitches the groups back:
  * lookup tables (equalize: from the image's histogram): one LUT [C, 256] per example, one
    gather;
  * pointwise ops (invert, solarize, posterize, brightness, contrast, autocontrast): their
    table's closed form on the pixels, one group per op (cheaper than a table gather at 224 px,
    same pixels);
  * affine maps (rotate, shear_x/y, translate_x/y): one `ImageProjectiveTransformV3` call;
  * blends with a derived image (color: grey, sharpness: 3x3 smooth).
Ops reproduce PIL (ImageOps / ImageEnhance / Image.transform with NEAREST): integer ops exactly,
blends in float32 truncated as PIL's C code does, affine maps with PIL's pixel-centre convention.
Randomness is stateless and per example (a counter-based hash of each example's seed), so an
example's augmentation does not depend on which batch or process holds it.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import tensorflow as tf

from jaxsam.data import augment_spec

# The op registry, RandAugment's ops, the CIFAR-10 policy, the magnitude mappings, the random
# streams and the config check live in `augment_spec`, shared with `device_augment`.
MAX_LEVEL = augment_spec.MAX_LEVEL
FILL_VALUE = augment_spec.FILL_VALUE
TRANSLATE_FRACTION = augment_spec.TRANSLATE_FRACTION
CROP_FILLS = augment_spec.CROP_FILLS
RANDAUGMENT_OPS = augment_spec.RANDAUGMENT_OPS
AUTOAUGMENT_POLICIES = augment_spec.AUTOAUGMENT_POLICIES

# ------------------------------------------------------------------------- per-example randomness


def _mix32(x: tf.Tensor) -> tf.Tensor:
  """A 32-bit integer hash with good avalanche (C. Wellons' "lowbias32")."""
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
  x = x * tf.constant(0x7FEB352D, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
  x = x * tf.constant(0x846CA68B, tf.uint32)
  return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def uniform(seeds: tf.Tensor, stream: int) -> tf.Tensor:
  """Per-example uniform float32 in [0, 1) for random stream `stream`; seeds int [B, 2].

  Why a hash: TF's stateless samplers take one seed per call, and `index_shuffle`'s batched seeds
  give correlated values for neighbouring counters. Hashing (seed, stream) keeps every example's
  draws a pure function of its own seed, vectorised over the batch.
  """
  seeds = tf.cast(seeds, tf.int64)
  x = tf.fill(tf.shape(seeds)[:1], tf.constant((stream * 0x9E3779B9 + 1) % 2**32, tf.uint32))
  x = _mix32(x)
  for column in range(2):
    word = seeds[:, column]
    for shift in (0, 32):
      part = tf.cast(
        tf.bitwise.bitwise_and(tf.bitwise.right_shift(word, shift), 0xFFFFFFFF), tf.uint32
      )
      x = _mix32(tf.bitwise.bitwise_xor(x, part))
  # Top 24 bits: exactly representable in float32, so the result is < 1.
  return tf.cast(tf.bitwise.right_shift(x, 8), tf.float32) * (1.0 / 2**24)


def _randint(seeds: tf.Tensor, stream: int, n) -> tf.Tensor:
  """Per-example integer uniform in [0, n) (int32 [B])."""
  n = tf.cast(n, tf.float32)
  return tf.minimum(
    tf.cast(tf.floor(uniform(seeds, stream) * n), tf.int32), tf.cast(n, tf.int32) - 1
  )


_STREAM_CROP_Y, _STREAM_CROP_X = augment_spec.STREAM_CROP_Y, augment_spec.STREAM_CROP_X
_STREAM_FLIP = augment_spec.STREAM_FLIP
_STREAM_CUTOUT_Y, _STREAM_CUTOUT_X = augment_spec.STREAM_CUTOUT_Y, augment_spec.STREAM_CUTOUT_X
_STREAM_AA_POLICY = augment_spec.STREAM_AA_POLICY
_STREAM_AA_APPLY = augment_spec.STREAM_AA_APPLY
_STREAM_AA_SIGN = augment_spec.STREAM_AA_SIGN
_STREAM_RA = augment_spec.STREAM_RA

# ------------------------------------------------------------------------------- shared helpers


def _batch_arg(arg, images: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
  """An op argument as a [B] tensor (a scalar is broadcast over the batch)."""
  arg = tf.cast(tf.convert_to_tensor(arg), dtype)
  return tf.broadcast_to(tf.reshape(arg, [-1]), tf.shape(images)[:1])


def _single_or_batch(op):
  """Lets a batched op take one HWC image with scalar arguments too (for tests and users)."""

  @functools.wraps(op)
  def wrapper(images, *args):
    images = tf.convert_to_tensor(images)
    if images.shape.rank == 3:
      args = [tf.reshape(tf.convert_to_tensor(a), [1]) for a in args]
      return op(images[None], *args)[0]
    return op(images, *args)

  return wrapper


def _blend(degenerate: tf.Tensor, images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's Image.blend(degenerate, image, factor): float32 a + f * (b - a), truncated, clipped
  (b - a of two integers below 256 is exact in float32)."""
  a = tf.cast(degenerate, tf.float32)
  out = a + tf.reshape(factor, [-1, 1, 1, 1]) * (tf.cast(images, tf.float32) - a)
  return tf.cast(tf.clip_by_value(tf.floor(out), 0.0, 255.0), tf.uint8)


_GREY_WEIGHTS = (19595.0, 38470.0, 7471.0)  # PIL's L = (R*19595 + G*38470 + B*7471 + 2**15) >> 16


def _grey(images: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L, float32 [B, H, W, 1]. Every product and sum is an integer below 2**24, exact
  in float32 in any order, so one matrix-vector product gives PIL's integers (at 2/3 the CPU of
  int32 slices)."""
  total = tf.linalg.matvec(tf.cast(images, tf.float32), tf.constant(_GREY_WEIGHTS))[..., None]
  return tf.floor((total + 32768.0) * (1.0 / 65536.0))


# ---------------------------------------------------------------------------- lookup-table ops


class _Stats:
  """Per-image statistics that LUT ops need, computed once per batch on first use."""

  def __init__(self, images: tf.Tensor):
    self.images = images
    self.batch = tf.shape(images)[0]
    self.channels = images.shape[-1]
    self._hist = None
    self._grey_mean = None
    self._index = None

  @property
  def index(self) -> tf.Tensor:
    """Every pixel's flat LUT index (shared by the histogram and the LUT gather)."""
    if self._index is None:
      self._index = _lut_index(self.images)
    return self._index

  @property
  def hist(self) -> tf.Tensor:
    """Per-image, per-channel histograms, int32 [B, C, 256], by one bincount."""
    if self._hist is None:
      self._hist = tf.reshape(
        tf.math.bincount(
          self.index,
          minlength=self.batch * self.channels * 256,
          maxlength=self.batch * self.channels * 256,
          dtype=tf.int32,
        ),
        [self.batch, self.channels, 256],
      )
    return self._hist

  @property
  def grey_mean(self) -> tf.Tensor:
    """int(mean(L) + 0.5) per image, as PIL's ImageEnhance.Contrast; float32 [B]."""
    if self._grey_mean is None:
      mean = tf.reduce_mean(tf.cast(_grey(self.images), tf.float64), axis=[1, 2, 3])
      self._grey_mean = tf.cast(tf.floor(mean + 0.5), tf.float32)
    return self._grey_mean

  def identity(self) -> tf.Tensor:
    return tf.broadcast_to(tf.range(256, dtype=tf.int32), [self.batch, self.channels, 256])


def _lut_index(images: tf.Tensor) -> tf.Tensor:
  """Flat index (b * C + c) * 256 + value of every pixel, int32 [B, H, W, C]."""
  batch, channels = tf.shape(images)[0], images.shape[-1]
  offsets = tf.reshape(tf.range(batch * channels, dtype=tf.int32) * 256, [-1, 1, 1, channels])
  return tf.cast(images, tf.int32) + offsets


def _apply_lut(images: tf.Tensor, lut: tf.Tensor, index: tf.Tensor | None = None) -> tf.Tensor:
  """Maps every pixel through its image's and channel's table (lut int32 [B, C, 256]).

  `index`: `_lut_index(images)` when the caller already has it.
  """
  flat = tf.cast(tf.reshape(tf.clip_by_value(lut, 0, 255), [-1]), tf.uint8)
  return tf.gather(flat, _lut_index(images) if index is None else index)


def _equalize_lut(stats: _Stats, arg) -> tf.Tensor:
  """ImageOps.equalize: lut[i] = (step // 2 + #pixels below i) // step, step from the histogram."""
  del arg
  hist = stats.hist
  bins = tf.range(256, dtype=tf.int32)
  last_bin = tf.reduce_max(tf.where(hist > 0, bins, -1), axis=-1, keepdims=True)
  last_count = tf.reduce_sum(tf.where(tf.equal(bins, last_bin), hist, 0), axis=-1, keepdims=True)
  step = (tf.reduce_sum(hist, axis=-1, keepdims=True) - last_count) // 255
  below = tf.cumsum(hist, axis=-1, exclusive=True)
  equalized = (step // 2 + below) // tf.maximum(step, 1)
  keep = tf.logical_or(
    tf.equal(step, 0), tf.reduce_sum(tf.cast(hist > 0, tf.int32), -1, keepdims=True) <= 1
  )
  return tf.where(keep, stats.identity(), equalized)


def _identity_lut(stats: _Stats, arg) -> tf.Tensor:
  del arg
  return stats.identity()


# ------------------------------------------------------------------------------- pointwise ops
# The table ops whose table is a closed form of the pixel value run as that form on the pixels,
# elementwise on uint8 (or float32): at 224 px a table costs an int32 index per pixel and a gather
# (0.9 ms per image), the form 0.02-0.2 ms. Same arithmetic as the table entry, so same pixels.


def _invert(images: tf.Tensor, arg=0.0) -> tf.Tensor:
  """ImageOps.invert: 255 - value."""
  del arg
  return 255 - tf.convert_to_tensor(images)


def _solarize(images: tf.Tensor, threshold) -> tf.Tensor:
  """ImageOps.solarize: values >= threshold are inverted (XOR 255), none when threshold > 255.
  Arithmetic on uint8, no select: TF's broadcasting `where` costs 6x as much at 224 px."""
  images = tf.convert_to_tensor(images)
  threshold = tf.reshape(tf.cast(_batch_arg(threshold, images), tf.int32), [-1, 1, 1, 1])
  at_least = tf.cast(images >= tf.cast(tf.clip_by_value(threshold, 0, 255), tf.uint8), tf.uint8)
  inverts = at_least * tf.cast(threshold <= 255, tf.uint8) * 255  # 255 where inverted, else 0
  return tf.bitwise.bitwise_xor(images, inverts)


def _posterize(images: tf.Tensor, bits) -> tf.Tensor:
  """ImageOps.posterize: keep the `bits` most significant bits (0 bits: black)."""
  images = tf.convert_to_tensor(images)
  shift = 8 - tf.reshape(tf.cast(_batch_arg(bits, images), tf.int32), [-1, 1, 1, 1])
  mask = tf.bitwise.left_shift(tf.bitwise.right_shift(255, shift), shift)  # (v >> s) << s
  return tf.bitwise.bitwise_and(images, tf.cast(mask, tf.uint8))


def _autocontrast(images: tf.Tensor, arg=0.0) -> tf.Tensor:
  """ImageOps.autocontrast: stretch each channel's [lo, hi] (its min and max) to [0, 255], float64,
  truncated; a constant channel is kept. The table's own expression on the pixels: no histogram."""
  del arg
  images = tf.convert_to_tensor(images)
  lo = tf.cast(tf.reduce_min(images, axis=[1, 2], keepdims=True), tf.float64)
  hi = tf.cast(tf.reduce_max(images, axis=[1, 2], keepdims=True), tf.float64)
  stretch = hi > lo
  scale = tf.where(stretch, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)  # [B, 1, 1, C]: small
  offset = tf.where(stretch, -lo * scale, 0.0)
  stretched = tf.floor(tf.cast(images, tf.float64) * scale + offset)
  return tf.cast(tf.clip_by_value(stretched, 0.0, 255.0), tf.uint8)


def _to_uint8(values: tf.Tensor) -> tf.Tensor:
  """float32 pixel values truncated (floor) and clipped to [0, 255], as the tables were."""
  return tf.cast(tf.clip_by_value(tf.floor(values), 0.0, 255.0), tf.uint8)


def _brightness(images: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Brightness: blend with black, float32 factor * value, truncated."""
  images = tf.convert_to_tensor(images)
  factor = tf.reshape(_batch_arg(factor, images), [-1, 1, 1, 1])
  return _to_uint8(factor * tf.cast(images, tf.float32))


def _contrast(images: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Contrast: blend with the image's mean grey level, truncated."""
  images = tf.convert_to_tensor(images)
  mean = tf.reshape(_Stats(images).grey_mean, [-1, 1, 1, 1])
  factor = tf.reshape(_batch_arg(factor, images), [-1, 1, 1, 1])
  return _to_uint8(mean + factor * (tf.cast(images, tf.float32) - mean))


def _lut_op(build: Callable) -> Callable:
  """Turns a LUT builder into an op on images: images, arg [B] -> images."""

  def op(images, arg=0.0):
    images = tf.convert_to_tensor(images)
    return _apply_lut(images, build(_Stats(images), _batch_arg(arg, images)))

  return op


# ---------------------------------------------------------------------------------- affine ops


def _rotate_matrix(degrees, height: int, width: int) -> tf.Tensor:
  """PIL Image.rotate's inverse map about the centre (w/2, h/2): [B, 6] (a, b, c, d, e, f)."""
  angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = width / 2.0, height / 2.0
  return tf.stack(
    [cos, sin, -cos * cx - sin * cy + cx, -sin, cos, sin * cx - cos * cy + cy], axis=-1
  )


def _shear_x_matrix(level, height: int, width: int) -> tf.Tensor:
  """Image.transform AFFINE (1, level, 0, 0, 1, 0): x_in = x + level * y."""
  del height, width
  level = tf.cast(level, tf.float64)
  zero, one = tf.zeros_like(level), tf.ones_like(level)
  return tf.stack([one, level, zero, zero, one, zero], axis=-1)


def _shear_y_matrix(level, height: int, width: int) -> tf.Tensor:
  """Image.transform AFFINE (1, 0, 0, level, 1, 0): y_in = level * x + y."""
  del height, width
  level = tf.cast(level, tf.float64)
  zero, one = tf.zeros_like(level), tf.ones_like(level)
  return tf.stack([one, zero, zero, level, one, zero], axis=-1)


def _translate_x_matrix(pixels, height: int, width: int) -> tf.Tensor:
  """Image.transform AFFINE (1, 0, pixels, 0, 1, 0): content moves left by `pixels`."""
  del height, width
  pixels = tf.cast(pixels, tf.float64)
  zero, one = tf.zeros_like(pixels), tf.ones_like(pixels)
  return tf.stack([one, zero, pixels, zero, one, zero], axis=-1)


def _translate_y_matrix(pixels, height: int, width: int) -> tf.Tensor:
  """Image.transform AFFINE (1, 0, 0, 0, 1, pixels): content moves up by `pixels`."""
  del height, width
  pixels = tf.cast(pixels, tf.float64)
  zero, one = tf.zeros_like(pixels), tf.ones_like(pixels)
  return tf.stack([one, zero, zero, zero, one, pixels], axis=-1)


def _identity_matrix(batch) -> tf.Tensor:
  return tf.broadcast_to(tf.constant([1, 0, 0, 0, 1, 0], tf.float64), [batch, 6])


_TIE_BREAK = 2.0**-14


def _apply_affine(images: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """Samples images at PIL's affine inverse map [B, 6], nearest neighbour, grey outside.

  PIL maps output pixel centres (x + .5, y + .5) and floors; TF maps integer pixel indices and
  rounds half away from zero. Shifting the offset by (a + b - 1) / 2 makes TF's round() land on
  PIL's floor(); the extra 2**-14 breaks the tie at exactly integer coordinates (half-pixel
  translations), where round(-0.5) = -1 would drop a column that PIL's floor(0) = 0 keeps.
  """
  a, b, c, d, e, f = tf.unstack(matrix, axis=-1)
  c = c + 0.5 * (a + b) - 0.5 + _TIE_BREAK
  f = f + 0.5 * (d + e) - 0.5 + _TIE_BREAK
  zero = tf.zeros_like(a)
  transforms = tf.cast(tf.stack([a, b, c, d, e, f, zero, zero], axis=-1), tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=images,
    transforms=transforms,
    output_shape=tf.shape(images)[1:3],
    fill_value=tf.constant(FILL_VALUE, tf.float32),
    interpolation="NEAREST",
    fill_mode="CONSTANT",
  )
  out.set_shape(images.shape)  # the op's static shape is unknown in graph mode
  return out


def _affine_op(build: Callable) -> Callable:
  """Turns a matrix builder into an op on images: images, arg [B] -> images."""

  def op(images, arg):
    images = tf.convert_to_tensor(images)
    height, width = images.shape[1], images.shape[2]
    return _apply_affine(images, build(_batch_arg(arg, images, tf.float64), height, width))

  return op


# ------------------------------------------------------------------------------------ blend ops


def _color(images: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Color: blend with the image's grey version (PIL's L conversion)."""
  images = tf.convert_to_tensor(images)
  grey = tf.broadcast_to(_grey(images), tf.shape(images))
  return _blend(grey, images, _batch_arg(factor, images))


def _smooth(images: tf.Tensor) -> tf.Tensor:
  """ImageFilter.SMOOTH (3x3 kernel 1,1,1 / 1,5,1 / 1,1,1, sum 13, rounded); border pixels kept."""
  if min(images.shape[1], images.shape[2]) < 3:  # all border
    return images
  # One depthwise convolution in float32 over the interior (vectorised; 9 shifted int32 adds cost
  # 3x as much): the sums are integers below 2**24, exact in float32 whatever the order of the
  # additions. The border is stitched back by concatenation (a broadcasting select costs 2x).
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)[:, :, None, None]
  kernel = tf.tile(kernel, [1, 1, images.shape[-1], 1])
  total = tf.nn.depthwise_conv2d(tf.cast(images, tf.float32), kernel, [1, 1, 1, 1], "SAME")
  total = total[:, 1:-1, 1:-1]  # SAME, then sliced: VALID on an empty batch returns a wrong shape
  inner = tf.cast((tf.cast(total, tf.int32) + 6) // 13, images.dtype)  # never a tie: 13 is odd
  middle = tf.concat([images[:, 1:-1, :1], inner, images[:, 1:-1, -1:]], axis=2)
  return tf.concat([images[:, :1], middle, images[:, -1:]], axis=1)


def _sharpness(images: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image."""
  images = tf.convert_to_tensor(images)
  return _blend(_smooth(images), images, _batch_arg(factor, images))


# ------------------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """How an op is applied and its builder or function. Kinds: 'identity'; 'lut' (a table from
  the argument alone); 'lut_stats' (a table from image statistics too); 'affine'; 'blend' and
  'pointwise' (a function of images and argument, one group per op). `augment_spec.KINDS` names
  the pointwise ops 'lut'/'lut_stats': the device path applies them as tables."""

  kind: str
  build: Callable


_SPECS = {
  "identity": OpSpec(augment_spec.KINDS["identity"], _identity_lut),
  "autocontrast": OpSpec("pointwise", _autocontrast),
  "equalize": OpSpec(augment_spec.KINDS["equalize"], _equalize_lut),
  "invert": OpSpec("pointwise", _invert),
  "solarize": OpSpec("pointwise", _solarize),
  "posterize": OpSpec("pointwise", _posterize),
  "brightness": OpSpec("pointwise", _brightness),
  "contrast": OpSpec("pointwise", _contrast),
  "color": OpSpec(augment_spec.KINDS["color"], _color),
  "sharpness": OpSpec(augment_spec.KINDS["sharpness"], _sharpness),
  "rotate": OpSpec(augment_spec.KINDS["rotate"], _rotate_matrix),
  "shear_x": OpSpec(augment_spec.KINDS["shear_x"], _shear_x_matrix),
  "shear_y": OpSpec(augment_spec.KINDS["shear_y"], _shear_y_matrix),
  "translate_x": OpSpec(augment_spec.KINDS["translate_x"], _translate_x_matrix),
  "translate_y": OpSpec(augment_spec.KINDS["translate_y"], _translate_y_matrix),
}


def _as_op(name: str) -> Callable:
  spec = _SPECS[name]
  if spec.kind in ("identity", "lut", "lut_stats"):
    op = _lut_op(spec.build)
  elif spec.kind == "affine":
    op = _affine_op(spec.build)
  else:
    op = spec.build
  op = _single_or_batch(op)
  op.__name__ = name
  op.__doc__ = spec.build.__doc__
  return op


# name -> op(images uint8 [B, H, W, C] or [H, W, C], arg [B] or scalar) -> images. The argument
# is the op's own (degrees, pixels, factor, bits, threshold); ops without one ignore it.
OPS: dict[str, Callable] = {name: _as_op(name) for name in _SPECS}

# TF's RandAugment mapping and the CIFAR AutoAugment code's (see augment_spec).
RANDAUGMENT_ARGS: dict[str, Callable] = augment_spec.randaugment_args(tf)
AUTOAUGMENT_ARGS: dict[str, Callable] = augment_spec.autoaugment_args(tf)

# ------------------------------------------------------------------------ batched op application


def apply_ops(
  images: tf.Tensor,
  names: Sequence[str],
  index: tf.Tensor,
  level: tf.Tensor,
  negate: tf.Tensor,
  level_to_arg: dict[str, Callable],
) -> tf.Tensor:
  """Applies op `names[index[i]]` at `level[i]` to example i, for the whole batch at once.

  Examples are partitioned by the kind of their op (pass-through, lookup table without / with
  image statistics, affine, each blend and pointwise op), each group is processed by one batched
  computation, and the groups are stitched back in order: every pixel is touched once per round
  whatever the mix.
  """
  height, width = images.shape[1], images.shape[2]
  group_key = [n if _SPECS[n].kind in ("blend", "pointwise") else _SPECS[n].kind for n in names]
  groups = list(dict.fromkeys(group_key))
  group = tf.gather(tf.constant([groups.index(key) for key in group_key], tf.int32), index)
  # Each example's own argument: its op's level -> argument mapping.
  arg = tf.zeros(tf.shape(level), tf.float32)
  for k, name in enumerate(names):
    # float64 mapping, then float32: the factor PIL gets is float32(python float), and an FMA
    # that graph optimisation may form in float32 would move it by an ulp.
    op_arg = tf.cast(
      level_to_arg[name](tf.cast(level, tf.float64), negate, (height, width)), tf.float32
    )
    arg = tf.where(tf.equal(index, k), op_arg, arg)

  positions = tf.dynamic_partition(tf.range(tf.shape(images)[0]), group, len(groups))
  parts = tf.dynamic_partition(images, group, len(groups))
  part_index = tf.dynamic_partition(index, group, len(groups))
  part_arg = tf.dynamic_partition(arg, group, len(groups))
  outputs = []
  for g, kind in enumerate(groups):
    x, op_index, op_arg = parts[g], part_index[g], part_arg[g]
    x.set_shape([None, *images.shape[1:]])
    if kind == "identity":
      outputs.append(x)
    elif kind in ("lut", "lut_stats"):
      stats = _Stats(x)
      lut = stats.identity()
      for k, name in enumerate(names):
        if _SPECS[name].kind == kind:
          lut = tf.where(
            tf.equal(op_index, k)[:, None, None], _SPECS[name].build(stats, op_arg), lut
          )
      outputs.append(_apply_lut(x, lut, stats.index))
    elif kind == "affine":
      matrix = _identity_matrix(tf.shape(x)[0])
      for k, name in enumerate(names):
        if _SPECS[name].kind == "affine":
          built = _SPECS[name].build(tf.cast(op_arg, tf.float64), height, width)
          matrix = tf.where(tf.equal(op_index, k)[:, None], built, matrix)
      outputs.append(_apply_affine(x, matrix))
    else:
      outputs.append(_SPECS[kind].build(x, op_arg))
  out = tf.dynamic_stitch(positions, outputs)
  out.set_shape(images.shape)
  return out


def randaugment(images: tf.Tensor, seeds: tf.Tensor, num_ops: int, magnitude: float) -> tf.Tensor:
  """RandAugment: `num_ops` rounds, each applying one of the 14 ops, uniformly drawn per example,
  at `magnitude` (0..10) with a random sign for the signed ops."""
  level = tf.fill(tf.shape(images)[:1], tf.constant(magnitude, tf.float32))
  for round_ in range(num_ops):
    index = _randint(seeds, _STREAM_RA + 2 * round_, len(RANDAUGMENT_OPS))
    negate = uniform(seeds, _STREAM_RA + 2 * round_ + 1) < 0.5
    images = apply_ops(images, RANDAUGMENT_OPS, index, level, negate, RANDAUGMENT_ARGS)
  return images


def autoaugment(images: tf.Tensor, seeds: tf.Tensor, policy: str) -> tf.Tensor:
  """AutoAugment: one sub-policy per example; each of its two steps applies with its probability."""
  subpolicies = AUTOAUGMENT_POLICIES[policy]
  names = augment_spec.policy_names(policy)
  choice = _randint(seeds, _STREAM_AA_POLICY, len(subpolicies))
  for stage in range(2):
    ops = tf.constant([names.index(sub[stage][0]) for sub in subpolicies], tf.int32)
    probs = tf.constant([sub[stage][1] for sub in subpolicies], tf.float32)
    levels = tf.constant([sub[stage][2] for sub in subpolicies], tf.float32)
    apply = uniform(seeds, _STREAM_AA_APPLY + stage) < tf.gather(probs, choice)
    index = tf.where(apply, tf.gather(ops, choice), 0)
    negate = uniform(seeds, _STREAM_AA_SIGN + stage) < 0.5
    images = apply_ops(images, names, index, tf.gather(levels, choice), negate, AUTOAUGMENT_ARGS)
  return images


# ------------------------------------------------------------------------- crop, flip, Cutout


def _reflect(index: tf.Tensor, size: int) -> tf.Tensor:
  """numpy/torch 'reflect' padding index (edge not repeated) for -size < index < 2 * size - 1."""
  index = tf.abs(index)
  return tf.where(index > size - 1, 2 * (size - 1) - index, index)


def _flip(images: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
  """The flip alone: the mirrored examples reversed as one block and stitched back in order.
  The same pixels as the gather below at under half its CPU (a 3-byte gather per pixel costs
  more than reversing whole rows)."""
  mirror = tf.cast(uniform(seeds, _STREAM_FLIP) < 0.5, tf.int32)
  positions = tf.dynamic_partition(tf.range(tf.shape(images)[0]), mirror, 2)
  kept, mirrored = tf.dynamic_partition(images, mirror, 2)
  out = tf.dynamic_stitch(positions, [kept, tf.reverse(mirrored, axis=[2])])
  out.set_shape(images.shape)
  return out


def crop_flip_cutout(
  images: tf.Tensor, seeds: tf.Tensor, padding: int, fill: str, flip: bool, cutout_size: int
) -> tf.Tensor:
  """Random crop with padding, then horizontal flip, then Cutout, as ONE gather of pixels.

  Crop: pad each side by `padding` (numpy-style reflect, or zeros) and crop back at a uniformly
  drawn offset. Flip: mirror left-right with probability 1/2. Cutout (DeVries & Taylor 2017): a
  `cutout_size` square of FILL_VALUE at a uniformly drawn centre, clipped at the borders. Each
  output pixel's source (an input pixel, the zero pad or the Cutout fill) is computed from small
  per-example row/column maps, so the three steps cost one pass over the batch. The flip alone
  (no crop, no Cutout) takes `_flip`, cheaper than a gather, with the same pixels.
  """
  if padding == 0 and not flip and cutout_size == 0:
    return images
  if padding == 0 and cutout_size == 0:
    return _flip(images, seeds)
  batch = tf.shape(images)[0]
  height, width, channels = images.shape[1], images.shape[2], images.shape[3]
  rows = tf.broadcast_to(tf.range(height)[None, :], [batch, height])
  cols = tf.broadcast_to(tf.range(width)[None, :], [batch, width])
  if padding:
    rows += _randint(seeds, _STREAM_CROP_Y, 2 * padding + 1)[:, None] - padding
    cols += _randint(seeds, _STREAM_CROP_X, 2 * padding + 1)[:, None] - padding
  if flip:
    mirror = uniform(seeds, _STREAM_FLIP) < 0.5
    cols = tf.where(mirror[:, None], tf.reverse(cols, axis=[1]), cols)
  pad_pixel, cutout_pixel = batch * height * width, batch * height * width + 1
  first = tf.range(batch)[:, None, None] * (height * width)
  if fill == "reflect" or padding == 0:
    rows, cols = _reflect(rows, height), _reflect(cols, width)
    source = first + rows[:, :, None] * width + cols[:, None, :]
  else:  # constant: sources outside the image read the zero pixel
    inside = tf.logical_and(
      tf.logical_and(rows >= 0, rows < height)[:, :, None],
      tf.logical_and(cols >= 0, cols < width)[:, None, :],
    )
    source = (
      first
      + tf.clip_by_value(rows, 0, height - 1)[:, :, None] * width
      + tf.clip_by_value(cols, 0, width - 1)[:, None, :]
    )
    source = tf.where(inside, source, pad_pixel)
  if cutout_size:
    top = _randint(seeds, _STREAM_CUTOUT_Y, height) - cutout_size // 2
    left = _randint(seeds, _STREAM_CUTOUT_X, width) - cutout_size // 2
    out_rows, out_cols = tf.range(height)[None, :], tf.range(width)[None, :]
    in_rows = tf.logical_and(out_rows >= top[:, None], out_rows < top[:, None] + cutout_size)
    in_cols = tf.logical_and(out_cols >= left[:, None], out_cols < left[:, None] + cutout_size)
    source = tf.where(
      tf.logical_and(in_rows[:, :, None], in_cols[:, None, :]), cutout_pixel, source
    )
  pixels = tf.concat(
    [
      tf.reshape(images, [-1, channels]),
      tf.zeros([1, channels], images.dtype),
      tf.fill([1, channels], tf.constant(FILL_VALUE, images.dtype)),
    ],
    axis=0,
  )
  out = tf.gather(pixels, source)
  out.set_shape(images.shape)
  return out


# ------------------------------------------------------------------------------------ factory


_check_config = augment_spec.check_config


def make_train_augment(augment_config, image_shape=(32, 32, 3)):
  """Builds the train augmentation from `config.augment`.

  Order: RandAugment or AutoAugment, then random crop with padding, horizontal flip, Cutout —
  as the CIFAR AutoAugment code. All work on uint8 at native resolution. Cutout's size is in
  native pixels: the original project applied 16 px Cutout after upscaling to 224 px, i.e.
  ~2 px of a 32 px image; `cutout_size=16` here is the 16-of-32 px of DeVries & Taylor.

  Args:
    augment_config: `config.augment` (crop_padding, crop_fill, flip, cutout_size,
      randaugment.num_ops, randaugment.magnitude, autoaugment).
    image_shape: (H, W, 3) of the images the function will see.

  Returns:
    `augment(images, seeds)`: images uint8 [B, H, W, 3], seeds int32/int64 [B, 2] (one stateless
    seed per example) -> uint8 [B, H, W, 3]. A pure function of its inputs: usable eagerly and
    in `tf.data.Dataset.map` after `.batch()`.

  Raises:
    ConfigError: a value out of range, an unknown name, or RandAugment and AutoAugment both set.

  Example:
    >>> fn = make_train_augment(config.augment)
    >>> dataset = dataset.batch(256).map(lambda x, y, s: (fn(x, s), y))
  """
  _check_config(augment_config, tuple(image_shape))
  padding = augment_config.crop_padding
  fill = augment_config.crop_fill
  flip = bool(augment_config.flip)
  cutout_size = augment_config.cutout_size
  num_ops = augment_config.randaugment.num_ops
  magnitude = float(augment_config.randaugment.magnitude)
  policy = augment_config.autoaugment

  def augment(images: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    if num_ops > 0:
      images = randaugment(images, seeds, num_ops, magnitude)
    if policy:
      images = autoaugment(images, seeds, policy)
    return crop_flip_cutout(images, seeds, padding, fill, flip, cutout_size)

  # Traced once (a fixed signature; tracing takes seconds): eager calls run as one graph and
  # Dataset.map calls the same function. Python control flow depends only on the config.
  traced = tf.function(
    augment,
    autograph=False,
    input_signature=[
      tf.TensorSpec([None, *image_shape], tf.uint8),
      tf.TensorSpec([None, 2], tf.int64),
    ],
  )

  def augment_batch(images, seeds):
    return traced(tf.convert_to_tensor(images), tf.cast(seeds, tf.int64))

  return augment_batch
