"""Train-time augmentation on the accelerator: `augment`'s ops mirrored in jax.numpy, bit for bit.

For the same per-example seeds the batch equals the tf.data one (`augment.make_train_augment`):
the counter-based RNG is the same 32-bit hash, integer ops are the same integer arithmetic, blends
the same float32 expression truncated, and affine maps the same float32 coordinates of PIL's
pixel-centre convention rounded half away from zero as TF's kernel does. Where TF computes in
float64 (autocontrast's table, the affine matrices, the magnitude -> argument mapping) this module
computes the float64 values on the host for the static arguments RandAugment / AutoAugment use
(numpy, then float32 constants) and corrects autocontrast's integer table with the few entries
where float64 rounding floors below the exact quotient, so no x64 mode is needed.

Everything is batch-wise with static shapes and no data-dependent control flow, so it jits,
fuses into a train step and shards over the batch axis: each RandAugment round computes every op
kind for the whole batch (one LUT gather, one affine gather, two blends) and selects per example;
there is no `lax.switch` to compile 14 ways. Imports neither TensorFlow nor tfds.

Seeds are uint32 [B, 4]: the low and high 32-bit words of `augment`'s int64 (seed, position) pair,
in the order its hash consumes them; `seed_words` converts the host's int64 seeds and
`example_seeds` derives them on device from (seed, step, row) as `pipeline` does.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsam.data import augment_spec as spec

_U32 = jnp.uint32

# ------------------------------------------------------------------------- per-example randomness


def _mix32(x: jax.Array) -> jax.Array:
  """`augment._mix32` (C. Wellons' "lowbias32"): uint32 multiplications wrap as TF's do."""
  x = x ^ (x >> 16)
  x = x * _U32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * _U32(0x846CA68B)
  return x ^ (x >> 16)


def seed_words(seeds) -> np.ndarray:
  """Host int64 seeds [B, 2] (as `pipeline` yields them) -> uint32 words [B, 4] for this module:
  (seed low, seed high, position low, position high), two's complement as TF's shifts give."""
  seeds = np.asarray(seeds, np.int64)
  words = [(seeds[:, c] >> shift) & 0xFFFFFFFF for c in range(2) for shift in (0, 32)]
  return np.stack(words, axis=-1).astype(np.uint32)


def _mul_wide(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(low, high) 32-bit words of the 64-bit product of uint32 a and b (16-bit limbs: no x64)."""
  a0, a1 = a & 0xFFFF, a >> 16
  b0, b1 = b & 0xFFFF, b >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)  # < 3 * 2**16: no overflow
  low = (p00 & 0xFFFF) | (mid << 16)
  high = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
  return low, high


def example_seeds(seed: int, step, global_batch: int, rows) -> jax.Array:
  """Each example's seed words [B, 4] on device, as `pipeline` gives the tf.data path.

  Example `rows[i]` (its row in the global batch) of step `step` is at position
  step * global_batch + row of the run, and its seed is the int64 pair (seed, position).

  Args:
    seed: the run's seed (Python int, any sign: its two's complement words are used).
    step: int32 scalar (traced is fine), the global step of the batch.
    global_batch: the global batch size (static).
    rows: int32 [B], the rows of the global batch this device / process holds.
  """
  rows = jnp.asarray(rows).astype(_U32)
  low, high = _mul_wide(jnp.asarray(step).astype(_U32), _U32(global_batch))
  position_low = low + rows
  position_high = high + (position_low < low).astype(_U32)  # carry
  seed_low = jnp.full_like(rows, seed & 0xFFFFFFFF)
  seed_high = jnp.full_like(rows, (seed >> 32) & 0xFFFFFFFF)
  return jnp.stack(
    [seed_low, seed_high, position_low, jnp.broadcast_to(position_high, rows.shape)], -1
  )


def uniform(seeds: jax.Array, stream: int) -> jax.Array:
  """Per-example uniform float32 in [0, 1) of random stream `stream`; seeds uint32 [B, 4]."""
  seeds = seeds.astype(_U32)
  x = jnp.full(seeds.shape[:1], (stream * 0x9E3779B9 + 1) % 2**32, _U32)
  x = _mix32(x)
  for word in range(4):
    x = _mix32(x ^ seeds[:, word])
  return (x >> 8).astype(jnp.float32) * np.float32(1.0 / 2**24)


def _randint(seeds: jax.Array, stream: int, n: int) -> jax.Array:
  """Per-example integer uniform in [0, n) (int32 [B])."""
  return jnp.minimum(jnp.floor(uniform(seeds, stream) * np.float32(n)).astype(jnp.int32), n - 1)


# ------------------------------------------------------------------------------- shared helpers


def _batch_arg(arg, batch: int) -> jax.Array:
  """An op argument as float32 [B] (a scalar is broadcast)."""
  return jnp.broadcast_to(jnp.reshape(jnp.asarray(arg, jnp.float32), [-1]), (batch,))


def _single_or_batch(op):
  """Lets a batched op take one HWC image with scalar arguments too (as `augment.OPS`)."""

  @functools.wraps(op)
  def wrapper(images, *args):
    images = jnp.asarray(images)
    if images.ndim == 3:
      args = [np.reshape(_host_arg(a), [1]) if _concrete(a) else jnp.reshape(a, [1]) for a in args]
      return op(images[None], *args)[0]
    return op(images, *args)

  return wrapper


def _host_arg(value):
  """A Python number becomes float32 as `tf.convert_to_tensor` makes it; arrays keep their dtype."""
  return np.float32(value) if isinstance(value, (int, float)) else np.asarray(value)


def _concrete(value) -> bool:
  """True for host values (numbers, numpy arrays), whose float64 maths can run in numpy."""
  return not isinstance(value, jax.Array)


def _blend(degenerate: jax.Array, images: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL's Image.blend(degenerate, image, factor): float32 a + f * (b - a), truncated, clipped."""
  a = degenerate.astype(jnp.float32)
  diff = images.astype(jnp.int32) - degenerate.astype(jnp.int32)
  out = a + _product(jnp.reshape(factor, [-1, 1, 1, 1]), diff)
  return jnp.clip(jnp.floor(out), 0.0, 255.0).astype(jnp.uint8)


def _product(factor: jax.Array, count: jax.Array) -> jax.Array:
  """float32(factor * count) for float32 `factor` and integer |count| < 256, rounded exactly once
  (to nearest even) by integer arithmetic, so the sum it then meets rounds on its own.

  Why by hand: XLA (CPU and GPU) contracts x * y + z into one fused multiply-add, rounding once
  where TF's separate kernels round twice, and a truncated blend would land one level off (about
  0.5 % of pixels at factor 1.72); an optimisation barrier does not survive XLA's passes. The
  product returned here is q * 2**k with q < 2**25, so any contraction with it is exact.
  """
  bits = jax.lax.bitcast_convert_type(factor.astype(jnp.float32), _U32)
  exponent = ((bits >> 23) & 0xFF).astype(jnp.int32)
  mantissa = (bits & 0x7FFFFF) | jnp.where(exponent > 0, _U32(1 << 23), _U32(0))
  count = count.astype(jnp.int32)
  product = mantissa * jnp.abs(count).astype(_U32)  # < 2**24 * 2**8: exact in uint32
  shift = jnp.maximum(32 - jax.lax.clz(product).astype(jnp.int32) - 24, 0).astype(_U32)
  kept = product >> shift
  rest = product - (kept << shift)
  half = jnp.where(shift > 0, _U32(1) << jnp.maximum(shift, 1) - 1, _U32(0))
  up = (shift > 0) & ((rest > half) | ((rest == half) & ((kept & 1) == 1)))
  kept = kept + up.astype(_U32)
  # 2 ** (exponent - 150 + shift) as float32 bits (normal range for any practical factor).
  scale_bits = (jnp.maximum(exponent, 1) - 150 + 127 + shift.astype(jnp.int32)).astype(_U32) << 23
  magnitude = kept.astype(jnp.float32) * jax.lax.bitcast_convert_type(scale_bits, jnp.float32)
  negative = (bits >> 31 == 1) != (count < 0)
  return jnp.where(negative, -magnitude, magnitude)


def _grey(images: jax.Array) -> jax.Array:
  """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 2**15) >> 16, int32 [B, H, W, 1]."""
  x = images.astype(jnp.int32)
  weighted = x[..., 0:1] * 19595 + x[..., 1:2] * 38470 + x[..., 2:3] * 7471 + 0x8000
  return weighted >> 16


# ---------------------------------------------------------------------------- lookup-table ops


class _Stats:
  """Per-image statistics that LUT ops need, computed on first use (a traced, pure cache)."""

  def __init__(self, images: jax.Array):
    self.images = images
    self.batch, _, _, self.channels = images.shape
    self._index = None
    self._hist = None

  @property
  def index(self) -> jax.Array:
    """Every pixel's flat LUT index (b * C + c) * 256 + value, int32 [B, H, W, C]."""
    if self._index is None:
      offsets = jnp.arange(self.batch * self.channels, dtype=jnp.int32) * 256
      self._index = self.images.astype(jnp.int32) + offsets.reshape(-1, 1, 1, self.channels)
    return self._index

  @property
  def hist(self) -> jax.Array:
    """Per-image, per-channel histograms, int32 [B, C, 256], by one scatter-add."""
    if self._hist is None:
      size = self.batch * self.channels * 256
      counts = jnp.zeros(size, jnp.int32).at[self.index.reshape(-1)].add(1)
      self._hist = counts.reshape(self.batch, self.channels, 256)
    return self._hist

  def extremes(self) -> tuple[jax.Array, jax.Array]:
    """Each channel's smallest and largest value, int32 [B, C, 1] each."""
    x = self.images.astype(jnp.int32)
    return x.min(axis=(1, 2))[..., None], x.max(axis=(1, 2))[..., None]

  def grey_mean(self) -> jax.Array:
    """int(mean(L) + 0.5) per image, as PIL's ImageEnhance.Contrast; float32 [B].

    Exact in integers: mean + 0.5 is never within float64 rounding of an integer unless it is
    one (its fractional part is a multiple of 1 / (2 * pixels)), so floor((2 sum + n) / 2n)."""
    grey = _grey(self.images)
    n = grey.shape[1] * grey.shape[2]
    total = grey.sum(axis=(1, 2, 3))  # <= 255 * n: int32 up to 8.4 M pixels
    return ((2 * total + n) // (2 * n)).astype(jnp.float32)

  def identity(self) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (self.batch, self.channels, 256))


def _apply_lut(stats: _Stats, lut: jax.Array) -> jax.Array:
  """Maps every pixel through its image's and channel's table (lut int32 [B, C, 256]).

  Per (image, channel) rows of one take_along_axis, with the tables held apart by a barrier:
  a flat gather let XLA fuse the tables' computation into it and redo it per pixel (measured on
  XLA:CPU: a RandAugment round 1.5x slower)."""
  tables = jax.lax.optimization_barrier(jnp.clip(lut, 0, 255).astype(jnp.uint8))
  batch, height, width, channels = stats.images.shape
  values = jnp.transpose(stats.images, (0, 3, 1, 2)).reshape(batch, channels, height * width)
  out = jnp.take_along_axis(tables, values.astype(jnp.int32), axis=2)
  return jnp.transpose(out.reshape(batch, channels, height, width), (0, 2, 3, 1))


@functools.cache
def _autocontrast_rounded_down() -> np.ndarray:
  """Sorted keys (lo * 256 + hi) * 256 + i where PIL's float64 autocontrast table entry
  int(i * (255 / (hi - lo)) - lo * (255 / (hi - lo))) is one below the exact quotient
  (i - lo) * 255 // (hi - lo), for lo <= i <= hi (12,094 of them). Only exact quotients can
  differ: any other is >= 1 / 255 from an integer, far beyond float64's rounding."""
  keys = []
  i = np.arange(256, dtype=np.float64)[None, :]
  for lo in range(255):
    hi = np.arange(lo + 1, 256, dtype=np.float64)[:, None]
    scale = 255.0 / (hi - lo)
    pil = np.floor(i * scale + (-lo * scale))
    exact = np.floor_divide((i - lo) * 255, hi - lo)
    down = (pil < exact) & (i >= lo) & (i <= hi)
    h, v = np.nonzero(down)
    keys.append((lo * 256 + (lo + 1 + h)) * 256 + v)
  return np.sort(np.concatenate(keys)).astype(np.int32)


def _autocontrast_lut(stats: _Stats, arg) -> jax.Array:
  """ImageOps.autocontrast: stretch [lo, hi] of each channel to [0, 255] (PIL's float64 table,
  as the exact integer quotient corrected where float64 rounds it down)."""
  del arg
  lo, hi = stats.extremes()
  bins = jnp.arange(256, dtype=jnp.int32)
  exact = (bins - lo) * 255 // jnp.maximum(hi - lo, 1)
  # The table's entries of this (lo, hi) pair: at most `most` from the pair's first key on.
  keys = _autocontrast_rounded_down()
  most = int(np.bincount(keys // 256).max())
  pair = lo * 256 + hi  # [B, C, 1]
  first = jnp.searchsorted(jnp.asarray(keys), pair * 256)  # B * C queries, not B * C * 256
  near = jnp.take(jnp.asarray(keys), first[..., None] + jnp.arange(most), mode="clip")
  found = jnp.any(near == (pair * 256 + bins)[..., None], axis=-1)  # [B, C, 256]
  stretched = jnp.clip(exact - found.astype(jnp.int32), 0, 255)
  return jnp.where(hi > lo, stretched, stats.identity())


def _equalize_lut(stats: _Stats, arg) -> jax.Array:
  """ImageOps.equalize: lut[i] = (step // 2 + #pixels below i) // step, step from the histogram."""
  del arg
  hist = stats.hist
  bins = jnp.arange(256, dtype=jnp.int32)
  last_bin = jnp.max(jnp.where(hist > 0, bins, -1), axis=-1, keepdims=True)
  last_count = jnp.sum(jnp.where(bins == last_bin, hist, 0), axis=-1, keepdims=True)
  step = (jnp.sum(hist, axis=-1, keepdims=True) - last_count) // 255
  below = jnp.cumsum(hist, axis=-1) - hist
  equalized = (step // 2 + below) // jnp.maximum(step, 1)
  keep = (step == 0) | (jnp.sum(hist > 0, axis=-1, keepdims=True) <= 1)
  return jnp.where(keep, stats.identity(), equalized)


def _invert_lut(stats: _Stats, arg) -> jax.Array:
  """ImageOps.invert: 255 - value."""
  del arg
  return 255 - stats.identity()


def _identity_lut(stats: _Stats, arg) -> jax.Array:
  del arg
  return stats.identity()


def _solarize_lut(stats: _Stats, threshold) -> jax.Array:
  """ImageOps.solarize: values >= threshold are inverted."""
  values = stats.identity()
  threshold = jnp.reshape(threshold.astype(jnp.int32), [-1, 1, 1])
  return jnp.where(values < threshold, values, 255 - values)


def _posterize_lut(stats: _Stats, bits) -> jax.Array:
  """ImageOps.posterize: keep the `bits` most significant bits (0 bits: black)."""
  shift = 8 - jnp.reshape(bits.astype(jnp.int32), [-1, 1, 1])
  return (stats.identity() >> shift) << shift


def _brightness_lut(stats: _Stats, factor) -> jax.Array:
  """ImageEnhance.Brightness: blend with black, float32 factor * value, truncated."""
  values = stats.identity().astype(jnp.float32)
  return jnp.floor(jnp.reshape(factor, [-1, 1, 1]) * values).astype(jnp.int32)


def _contrast_lut(stats: _Stats, factor) -> jax.Array:
  """ImageEnhance.Contrast: blend with the image's mean grey level, truncated."""
  mean = jnp.reshape(stats.grey_mean(), [-1, 1, 1])
  diff = stats.identity() - mean.astype(jnp.int32)  # exact: the mean is a whole number
  return jnp.floor(mean + _product(jnp.reshape(factor, [-1, 1, 1]), diff)).astype(jnp.int32)


# ---------------------------------------------------------------------------------- affine ops


def _matrix(name: str, arg, height: int, width: int, xp):
  """PIL's inverse affine map (a, b, c, d, e, f) of op `name` at `arg` [B], in xp's float.

  With numpy (a host argument) this is TF's float64 computation, cast to float32 afterwards;
  with jnp (a traced argument) it is float32 throughout, a few ulps off TF's matrix."""
  zero, one = xp.zeros_like(arg), xp.ones_like(arg)
  if name == "rotate":  # Image.rotate about the centre (w/2, h/2)
    angle = -arg * (math.pi / 180.0)
    cos, sin = xp.cos(angle), xp.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    rows = [cos, sin, -cos * cx - sin * cy + cx, -sin, cos, sin * cx - cos * cy + cy]
  elif name == "shear_x":
    rows = [one, arg, zero, zero, one, zero]
  elif name == "shear_y":
    rows = [one, zero, zero, arg, one, zero]
  elif name == "translate_x":
    rows = [one, zero, arg, zero, one, zero]
  elif name == "translate_y":
    rows = [one, zero, zero, zero, one, arg]
  else:  # any other op leaves the geometry alone
    rows = [one, zero, zero, zero, one, zero]
  return xp.stack(rows, axis=-1)


_TIE_BREAK = 2.0**-14


def _kernel_matrix(matrix, xp):
  """`augment._apply_affine`'s shift of PIL's map so TF's round() lands on PIL's floor(), as
  float32 [B, 6] (the transform TF's kernel reads)."""
  a, b, c, d, e, f = (matrix[..., k] for k in range(6))
  c = c + 0.5 * (a + b) - 0.5 + _TIE_BREAK
  f = f + 0.5 * (d + e) - 0.5 + _TIE_BREAK
  return xp.stack([a, b, c, d, e, f], axis=-1).astype(np.float32)


def _round_half_away(x: jax.Array) -> jax.Array:
  """std::round (TF's nearest), exactly: jnp.round rounds half to even."""
  whole = jnp.trunc(x)
  return whole + jnp.where(jnp.abs(x - whole) >= 0.5, jnp.sign(x), 0.0)


def _apply_affine(images: jax.Array, transform: jax.Array) -> jax.Array:
  """TF's ImageProjectiveTransformV3 (NEAREST, CONSTANT FILL_VALUE) with float32 transform
  [B, 6]: input (x, y) = (t0 x + t1 y + t2, t3 x + t4 y + t5) at each output pixel index."""
  batch, height, width, _ = images.shape
  t = [transform[:, k].reshape(-1, 1, 1) for k in range(6)]
  ys = jnp.arange(height, dtype=jnp.int32).reshape(1, -1, 1)
  xs = jnp.arange(width, dtype=jnp.int32).reshape(1, 1, -1)
  if max(height, width) <= 256:  # each product rounded once, as TF's kernel
    mul = _product
  else:  # beyond _product's range: XLA may fuse a multiply-add (boundary pixels only)
    mul = lambda factor, count: factor * count.astype(jnp.float32)
  in_x = _round_half_away(mul(t[0], xs) + mul(t[1], ys) + t[2])
  in_y = _round_half_away(mul(t[3], xs) + mul(t[4], ys) + t[5])
  inside = (in_x >= 0) & (in_x < width) & (in_y >= 0) & (in_y < height)
  first = jnp.arange(batch, dtype=jnp.int32).reshape(-1, 1, 1) * (height * width)
  source = first + jnp.clip(in_y, 0, height - 1).astype(jnp.int32) * width
  source = source + jnp.clip(in_x, 0, width - 1).astype(jnp.int32)
  return _gather_pixels(images, jnp.where(inside, source, batch * height * width + 1))


def _gather_pixels(images: jax.Array, source: jax.Array) -> jax.Array:
  """Output pixel = flat input pixel `source` [B, H, W]; B*H*W is black, B*H*W + 1 grey."""
  channels = images.shape[-1]
  pixels = jnp.concatenate(
    [
      images.reshape(-1, channels),
      jnp.zeros((1, channels), images.dtype),
      jnp.full((1, channels), spec.FILL_VALUE, images.dtype),
    ]
  )
  return jnp.take(pixels, source, axis=0, mode="clip")


# ------------------------------------------------------------------------------------ blend ops


def _color(images: jax.Array, factor) -> jax.Array:
  """ImageEnhance.Color: blend with the image's grey version (PIL's L conversion)."""
  grey = jnp.broadcast_to(_grey(images), images.shape)
  return _blend(grey, images, factor)


def _smooth(images: jax.Array) -> jax.Array:
  """ImageFilter.SMOOTH (3x3 kernel 1,1,1 / 1,5,1 / 1,1,1, sum 13, rounded); border pixels kept."""
  x = images.astype(jnp.int32)
  _, height, width, _ = x.shape
  padded = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
  total = 4 * x
  for dy in range(3):
    for dx in range(3):
      total += padded[:, dy : dy + height, dx : dx + width, :]
  smoothed = (total + 6) // 13
  rows, cols = jnp.arange(height), jnp.arange(width)
  inner = ((rows > 0) & (rows < height - 1))[:, None] & ((cols > 0) & (cols < width - 1))[None]
  return jnp.where(inner[None, :, :, None], smoothed, x).astype(jnp.uint8)


def _sharpness(images: jax.Array, factor) -> jax.Array:
  """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image."""
  return _blend(_smooth(images), images, factor)


_LUTS: dict[str, Callable] = {
  "identity": _identity_lut,
  "autocontrast": _autocontrast_lut,
  "equalize": _equalize_lut,
  "invert": _invert_lut,
  "solarize": _solarize_lut,
  "posterize": _posterize_lut,
  "brightness": _brightness_lut,
  "contrast": _contrast_lut,
}
_BLENDS: dict[str, Callable] = {"color": _color, "sharpness": _sharpness}


def _as_op(name: str) -> Callable:
  kind = spec.KINDS[name]

  def op(images, arg=0.0):
    images = jnp.asarray(images)
    batch, height, width, _ = images.shape
    if kind == "affine":
      if _concrete(arg):  # TF's float64 matrix, computed on the host
        arg64 = np.reshape(_host_arg(arg), [-1]).astype(np.float64)
        arg64 = np.broadcast_to(arg64, (batch,))
        transform = jnp.asarray(_kernel_matrix(_matrix(name, arg64, height, width, np), np))
      else:
        arg32 = _batch_arg(arg, batch)
        transform = _kernel_matrix(_matrix(name, arg32, height, width, jnp), jnp)
      return _apply_affine(images, transform)
    if kind == "blend":
      return _BLENDS[name](images, _batch_arg(arg, batch))
    stats = _Stats(images)
    return _apply_lut(stats, _LUTS[name](stats, _batch_arg(arg, batch)))

  op = _single_or_batch(op)
  op.__name__ = name
  return op


# name -> op(images uint8 [B, H, W, C] or [H, W, C], arg [B] or scalar) -> images, as
# `augment.OPS`. A host (numpy / Python) argument of an affine op gets TF's float64 matrix.
OPS: dict[str, Callable] = {name: _as_op(name) for name in spec.KINDS}

# ------------------------------------------------------------------------ batched op application


def _arg_tables(names, levels, mapping, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Host tables of each (op, level) entry's argument and kernel transform, by sign.

  Args:
    names: op name of each entry [K]; levels: float [K].
  Returns:
    (float32 [K, 2] arguments, float32 [K, 2, 6] transforms), index 1 = negated; computed in
    float64 as `augment.apply_ops` does, then cast.
  """
  args = np.zeros((len(names), 2), np.float32)
  transforms = np.zeros((len(names), 2, 6), np.float32)
  for k, (name, level) in enumerate(zip(names, levels)):
    for negate in (0, 1):
      # The level is float32 (TF's batch of levels), the mapping float64, the argument float32.
      level64 = np.float64(np.float32(level))
      arg = np.float32(mapping[name](level64, bool(negate), (height, width)))
      args[k, negate] = arg
      matrix = _matrix(name, np.asarray([arg], np.float64), height, width, np)
      transforms[k, negate] = _kernel_matrix(matrix, np)[0]
  return args, transforms


def _select_tables(stats: _Stats, lut_names, index: jax.Array, arg: jax.Array) -> jax.Array:
  """Each example's table: its op's if it is one of `lut_names` ((k, name) pairs), else the
  identity; int32 [B, C, 256].

  Selected by a one-hot batched matmul rather than a chain of `where`s: XLA fuses a `where`
  chain into the pixel gather that reads the tables and recomputes every candidate table per
  pixel (3-4x a RandAugment round on XLA:CPU), and a dot is never fused that way. Exact: table
  values lie in [-512, 512] and each output sums one product by 1, exact even in TF32.
  """
  candidates = [stats.identity()] + [_LUTS[name](stats, arg) for _, name in lut_names]
  stacked = jnp.stack(candidates, axis=1).astype(jnp.float32)  # [B, K + 1, C, 256]
  choice = jnp.zeros_like(index)
  for slot, (k, _) in enumerate(lut_names, start=1):
    choice = jnp.where(index == k, slot, choice)
  one_hot = jax.nn.one_hot(choice, len(candidates), dtype=jnp.float32)  # [B, K + 1]
  tables = jnp.einsum("bk,bkcv->bcv", one_hot, stacked, precision=jax.lax.Precision.HIGHEST)
  return jnp.round(tables).astype(jnp.int32)


def _apply_round(images, names, index, arg, transform) -> jax.Array:
  """Example i gets op names[index[i]] with argument arg[i] (float32) and, for an affine op,
  kernel transform transform[i] (float32 [6]; identity map for other ops).

  Every kind runs on the whole batch and each example keeps its own: the affine gather (an
  identity map leaves non-affine examples unchanged), the LUT gather (identity tables for
  non-LUT examples), then the blends selected per example. Same per-example result as the
  grouped TF computation, as each example sees one op."""
  kinds = [spec.KINDS[n] for n in names]
  if "affine" in kinds:
    images = _apply_affine(images, transform)
  stats = _Stats(images)
  lut_names = [(k, n) for k, n in enumerate(names) if kinds[k] in ("lut", "lut_stats")]
  if lut_names:
    images = _apply_lut(stats, _select_tables(stats, lut_names, index, arg))
  out = images
  for k, name in enumerate(names):
    if kinds[k] == "blend":
      out = jnp.where((index == k)[:, None, None, None], _BLENDS[name](images, arg), out)
  return out


def randaugment(images: jax.Array, seeds: jax.Array, num_ops: int, magnitude: float) -> jax.Array:
  """RandAugment: `num_ops` rounds, each applying one of the 14 ops, uniformly drawn per example,
  at `magnitude` (0..10, static) with a random sign for the signed ops."""
  names = spec.RANDAUGMENT_OPS
  _, height, width, _ = images.shape
  args, transforms = _arg_tables(
    names, [magnitude] * len(names), spec.randaugment_args(np), height, width
  )
  for round_ in range(num_ops):
    index = _randint(seeds, spec.STREAM_RA + 2 * round_, len(names))
    negate = (uniform(seeds, spec.STREAM_RA + 2 * round_ + 1) < 0.5).astype(jnp.int32)
    images = _apply_round(
      images, names, index, jnp.asarray(args)[index, negate], jnp.asarray(transforms)[index, negate]
    )
  return images


def autoaugment(images: jax.Array, seeds: jax.Array, policy: str) -> jax.Array:
  """AutoAugment: one sub-policy per example; each of its two steps applies with its probability."""
  subpolicies = spec.AUTOAUGMENT_POLICIES[policy]
  names = spec.policy_names(policy)
  _, height, width, _ = images.shape
  choice = _randint(seeds, spec.STREAM_AA_POLICY, len(subpolicies))
  for stage in range(2):
    steps = [sub[stage] for sub in subpolicies]
    args, transforms = _arg_tables(
      [op for op, _, _ in steps],
      [lv for _, _, lv in steps],
      spec.autoaugment_args(np),
      height,
      width,
    )
    ops = jnp.asarray([names.index(op) for op, _, _ in steps], jnp.int32)
    probs = jnp.asarray([p for _, p, _ in steps], jnp.float32)
    apply = uniform(seeds, spec.STREAM_AA_APPLY + stage) < probs[choice]
    negate = (uniform(seeds, spec.STREAM_AA_SIGN + stage) < 0.5).astype(jnp.int32)
    index = jnp.where(apply, ops[choice], 0)
    identity = _kernel_matrix(_matrix("identity", np.zeros(1), height, width, np), np)[0]
    transform = jnp.where(
      apply[:, None], jnp.asarray(transforms)[choice, negate], jnp.asarray(identity)
    )
    images = _apply_round(images, names, index, jnp.asarray(args)[choice, negate], transform)
  return images


# ------------------------------------------------------------------------- crop, flip, Cutout


def _reflect(index: jax.Array, size: int) -> jax.Array:
  """numpy/torch 'reflect' padding index (edge not repeated) for -size < index < 2 * size - 1."""
  index = jnp.abs(index)
  return jnp.where(index > size - 1, 2 * (size - 1) - index, index)


def crop_flip_cutout(
  images: jax.Array, seeds: jax.Array, padding: int, fill: str, flip: bool, cutout_size: int
) -> jax.Array:
  """`augment.crop_flip_cutout`: padded random crop, horizontal flip, Cutout as one gather."""
  if padding == 0 and not flip and cutout_size == 0:
    return images
  batch, height, width, _ = images.shape
  rows = jnp.broadcast_to(jnp.arange(height, dtype=jnp.int32)[None], (batch, height))
  cols = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None], (batch, width))
  if padding:
    rows = rows + _randint(seeds, spec.STREAM_CROP_Y, 2 * padding + 1)[:, None] - padding
    cols = cols + _randint(seeds, spec.STREAM_CROP_X, 2 * padding + 1)[:, None] - padding
  if flip:
    mirror = uniform(seeds, spec.STREAM_FLIP) < 0.5
    cols = jnp.where(mirror[:, None], cols[:, ::-1], cols)
  pad_pixel, cutout_pixel = batch * height * width, batch * height * width + 1
  first = jnp.arange(batch, dtype=jnp.int32)[:, None, None] * (height * width)
  if fill == "reflect" or padding == 0:
    rows, cols = _reflect(rows, height), _reflect(cols, width)
    source = first + rows[:, :, None] * width + cols[:, None, :]
  else:  # constant: sources outside the image read the zero pixel
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None]
    source = (
      first
      + jnp.clip(rows, 0, height - 1)[:, :, None] * width
      + jnp.clip(cols, 0, width - 1)[:, None, :]
    )
    source = jnp.where(inside, source, pad_pixel)
  if cutout_size:
    top = _randint(seeds, spec.STREAM_CUTOUT_Y, height) - cutout_size // 2
    left = _randint(seeds, spec.STREAM_CUTOUT_X, width) - cutout_size // 2
    out_rows, out_cols = jnp.arange(height)[None], jnp.arange(width)[None]
    in_rows = (out_rows >= top[:, None]) & (out_rows < top[:, None] + cutout_size)
    in_cols = (out_cols >= left[:, None]) & (out_cols < left[:, None] + cutout_size)
    source = jnp.where(in_rows[:, :, None] & in_cols[:, None, :], cutout_pixel, source)
  return _gather_pixels(images, source)


# ------------------------------------------------------------------------------------ factory


def make_device_augment(augment_config, image_shape=(32, 32, 3)) -> Callable:
  """The train augmentation of `config.augment` in jax.numpy: the same batches as
  `augment.make_train_augment(augment_config, image_shape)` for the same seeds.

  Returns:
    `augment(images, seeds)`: images uint8 [B, H, W, 3], seeds uint32 [B, 4] (`seed_words` /
    `example_seeds`) -> uint8 [B, H, W, 3]. Pure and traceable: jit it, or call it inside a
    jitted train step (then the batch axis may be sharded; every example is independent).

  Raises:
    ConfigError: as `make_train_augment`, from the same checks.
  """
  spec.check_config(augment_config, tuple(image_shape))
  padding = augment_config.crop_padding
  fill = augment_config.crop_fill
  flip = bool(augment_config.flip)
  cutout_size = augment_config.cutout_size
  num_ops = augment_config.randaugment.num_ops
  magnitude = float(augment_config.randaugment.magnitude)
  policy = augment_config.autoaugment

  def augment(images: jax.Array, seeds: jax.Array) -> jax.Array:
    if num_ops > 0:
      images = randaugment(images, seeds, num_ops, magnitude)
    if policy:
      images = autoaugment(images, seeds, policy)
    return crop_flip_cutout(images, seeds, padding, fill, flip, cutout_size)

  return augment


def to_model_input(
  images: jax.Array, image_size: int, mean, std, *, bgr: bool = False, dtype=jnp.float32
) -> jax.Array:
  """uint8 [B, H, W, 3] -> normalised `dtype` at `image_size` (bilinear), exactly as the train
  step's own `steps.preprocess` (the one definition) does with the same settings."""
  from jaxsam import state, steps  # pylint: disable=import-outside-toplevel  (flax/optax: heavier)

  cfg = state.StepConfig(
    image_size=image_size, mean=tuple(mean), std=tuple(std), bgr=bgr, dtype=dtype
  )
  return steps.preprocess(images, cfg)
