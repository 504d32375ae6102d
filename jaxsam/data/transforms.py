"""ImageNet-style transforms of one encoded image to a fixed `size` x `size` uint8 image.

train: Inception's random-resized crop (Szegedy et al. 2015; torchvision's RandomResizedCrop
arithmetic: 10 tries at a random area fraction in `scale` and a log-uniform aspect ratio in
`ratio`, else the centre crop clamped to `ratio`), decoded and cropped in one step for JPEG
(`tf.image.decode_and_crop_jpeg` decodes only the crop's blocks), then resized to `size`.
eval: the shorter side resized to int(size / crop_fraction), then the centre `size` crop
(torchvision's Resize + CenterCrop: 256 then 224 at the usual 0.875).

Resizes are bilinear with antialiasing as torchvision resizes a PIL image: a shrink is PIL's own
resize (the same pixels), an upscale TF's bilinear op (the same filter, within one level). Random
draws are per example and stateless (the hash of `augment.uniform`), so a crop depends on the
example's seed alone.
"""

import math

import numpy as np
import tensorflow as tf
from PIL import Image

from jaxsam.data import augment, decode
from jaxsam.errors import ConfigError

CROP_ATTEMPTS = 10  # torchvision's and Inception's tries before the centre-crop fallback
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Random streams of augment.uniform used here (augment's own streams stay below 200).
_STREAM_AREA, _STREAM_RATIO = 200, 220  # + attempt
_STREAM_TOP, _STREAM_LEFT = 240, 241


def check_crop(scale, ratio) -> tuple[tuple[float, float], tuple[float, float]]:
  """(scale, ratio) as float pairs; ConfigError unless 0 < scale[0] <= scale[1] <= 1 and
  0 < ratio[0] <= ratio[1]."""
  try:
    lo, hi = (float(v) for v in scale)
  except (TypeError, ValueError) as e:
    raise ConfigError(
      f"augment.crop_scale={scale!r}; expected a pair (min, max) of area "
      "fractions in (0, 1], e.g. (0.08, 1.0)"
    ) from e
  if not 0.0 < lo <= hi <= 1.0:
    raise ConfigError(
      f"augment.crop_scale={tuple(scale)!r}; expected 0 < min <= max <= 1 "
      "(area fractions of the image), e.g. (0.08, 1.0)"
    )
  try:
    r_lo, r_hi = (float(v) for v in ratio)
  except (TypeError, ValueError) as e:
    raise ConfigError(
      f"augment.crop_ratio={ratio!r}; expected a pair (min, max) of aspect "
      "ratios w/h, e.g. (0.75, 1.3333)"
    ) from e
  if not 0.0 < r_lo <= r_hi:
    raise ConfigError(
      f"augment.crop_ratio={tuple(ratio)!r}; expected 0 < min <= max (aspect "
      "ratios w/h), e.g. (0.75, 1.3333)"
    )
  return (lo, hi), (r_lo, r_hi)


def check_crop_fraction(fraction) -> float:
  """ConfigError unless 0 < fraction <= 1."""
  if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
    raise ConfigError(
      f"dataset.eval_crop_fraction={fraction!r}; expected a fraction in (0, 1] "
      "(0.875: resize to 256, crop 224)"
    )
  return float(fraction)


def random_resized_box(height, width, uniforms, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO):
  """torchvision's RandomResizedCrop.get_params with the random draws given; one example, or a
  batch of them at once (leading axes of `height`, `width` and `uniforms` alike).

  Args:
    height, width: the images' int32 sides, scalars or [B].
    uniforms: float [..., 2 * CROP_ATTEMPTS + 2] in [0, 1): each attempt's area and log-ratio
      draws, then the top and left draws.
    scale, ratio: checked pairs (see `check_crop`).

  Returns:
    int32 [..., 4] (top, left, crop height, crop width).
  """
  u = tf.cast(uniforms, tf.float64)
  h_img, w_img = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  area = (h_img * w_img)[..., None] * (scale[0] + u[..., :CROP_ATTEMPTS] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + u[..., CROP_ATTEMPTS : 2 * CROP_ATTEMPTS] * (log_hi - log_lo))
  # Python's round() is half-to-even, as tf.round.
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= w_img[..., None]) & (h > 0) & (h <= h_img[..., None])
  first = tf.one_hot(tf.argmax(tf.cast(fits, tf.int32), axis=-1), CROP_ATTEMPTS, dtype=tf.float64)
  w_try, h_try = tf.reduce_sum(w * first, -1), tf.reduce_sum(h * first, -1)  # the first fit
  top_try = tf.floor(u[..., -2] * (h_img - h_try + 1.0))
  left_try = tf.floor(u[..., -1] * (w_img - w_try + 1.0))
  # Fallback: the whole image, clamped to the ratio range, centred.
  in_ratio = w_img / h_img
  w_fb = tf.where(
    in_ratio < ratio[0], w_img, tf.where(in_ratio > ratio[1], tf.round(h_img * ratio[1]), w_img)
  )
  h_fb = tf.where(in_ratio < ratio[0], tf.round(w_img / ratio[0]), h_img)
  top_fb = tf.floor((h_img - h_fb) / 2.0)
  left_fb = tf.floor((w_img - w_fb) / 2.0)
  found = tf.reduce_any(fits, axis=-1)
  box = tf.where(
    found[..., None],
    tf.stack([top_try, left_try, h_try, w_try], -1),
    tf.stack([top_fb, left_fb, h_fb, w_fb], -1),
  )
  return tf.cast(box, tf.int32)


def crop_uniforms(seeds) -> tf.Tensor:
  """The random-resized crop's draws for examples' seeds int64 [..., 2]: float32 [..., 22]
  (one batched hash per stream: a batch costs what one example does)."""
  seeds = tf.cast(seeds, tf.int64)
  flat = tf.reshape(seeds, [-1, 2])
  streams = (
    [_STREAM_AREA + a for a in range(CROP_ATTEMPTS)]
    + [_STREAM_RATIO + a for a in range(CROP_ATTEMPTS)]
    + [_STREAM_TOP, _STREAM_LEFT]
  )
  draws = tf.stack([augment.uniform(flat, s) for s in streams], axis=-1)
  return tf.reshape(draws, tf.concat([tf.shape(seeds)[:-1], [len(streams)]], 0))


def _pil_shrink(image: np.ndarray, height, width) -> np.ndarray:
  """tf.numpy_function body: PIL's antialiased bilinear resize (its C code drops the GIL)."""
  size = (int(width), int(height))
  return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), np.uint8)


def resize(image, height, width) -> tf.Tensor:
  """uint8 [H, W, 3] -> uint8 [height, width, 3], bilinear with antialiasing as torchvision
  resizes a PIL image; a no-op at the same size.

  A shrink runs PIL's own resize (`Image.resize(BILINEAR)`, the in-memory path's and
  torchvision's, so the same pixels) in `tf.numpy_function`: TF's antialiased kernel
  (ScaleAndTranslate, scalar float code) costs ~1.5x as much CPU. Upscaling in both sides takes
  TF's plain bilinear op: antialiasing only widens the filter when shrinking, so it is the same
  filter (within one level of PIL's fixed-point rounding) at a third of the cost.
  """
  shape = tf.shape(image)
  size = tf.stack([height, width])

  def upscaled():
    out = tf.image.resize(image, size, method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

  def shrunk():
    out = tf.numpy_function(_pil_shrink, [image, height, width], tf.uint8, stateful=False)
    out.set_shape([None, None, 3])
    return out

  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
  shrinks = tf.logical_or(shape[0] > height, shape[1] > width)
  return tf.case([(same, lambda: tf.identity(image)), (shrinks, shrunk)], default=upscaled)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encoded_shape(encoded) -> tf.Tensor:
  """(height, width) int32 [2] of an encoded image, from the header of a JPEG or a PNG (its IHDR
  chunk: big-endian width, height at byte 16); other formats by decoding."""

  def png():
    width_height = tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.int32, False)
    return tf.reverse(width_height, [0])

  def other():
    return tf.cond(
      tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE),
      png,
      lambda: tf.shape(decode.tf_decode(encoded))[:2],
    )

  return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2], other)


def decode_crop(encoded, box) -> tf.Tensor:
  """The crop `box` (top, left, height, width) of an encoded image as uint8 RGB [h, w, 3] by
  `decode.tf_decode`'s rules (JPEG: only the crop's blocks are decoded)."""
  return decode.tf_decode(encoded, lambda height, width: box)


def decode_box(encoded, box_fn) -> tf.Tensor:
  """Decodes the crop `box_fn(height, width)` of an encoded image as uint8 RGB [h, w, 3] (one
  example; the streamed batches take the box from `encoded_shape` and call `crop_resized`)."""
  return decode.tf_decode(encoded, box_fn)


def _pil_region(image: np.ndarray, size, region: np.ndarray) -> np.ndarray:
  """tf.numpy_function body: PIL's resize of the sub-pixel `region` (top, left, h, w) to size."""
  top, left, height, width = (float(v) for v in region)
  box = (left, top, left + width, top + height)
  out = Image.fromarray(image).resize((int(size), int(size)), Image.BILINEAR, box=box)
  return np.asarray(out, np.uint8)


def crop_resized(encoded, box, size: int) -> tf.Tensor:
  """The crop `box` of an encoded image resized to uint8 [size, size, 3]: a JPEG crop >= 2x
  `size` decoded at a DCT scale (`decode.tf_decode_scaled`), then PIL's resize of its region."""
  image, region, ratio = decode.tf_decode_scaled(encoded, box, size)

  def region_resize():
    out = tf.numpy_function(_pil_region, [image, size, region], tf.uint8, stateful=False)
    out.set_shape([None, None, 3])
    return out

  out = tf.cond(ratio > 1, region_resize, lambda: resize(image, size, size))
  out.set_shape([size, size, 3])
  return out


def train_crop(encoded, seed, size: int, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO) -> tf.Tensor:
  """Random-resized crop of an encoded image to uint8 [size, size, 3] (the crop from `seed`)."""
  uniforms = crop_uniforms(seed)
  shape = encoded_shape(encoded)
  return crop_resized(encoded, random_resized_box(shape[0], shape[1], uniforms, scale, ratio), size)


def resized_shape(height, width, short: int):
  """torchvision's Resize(short) output (new_h, new_w): the shorter side to `short`, the longer
  to int(short * long / short_side)."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  long_side = tf.cast(tf.floor(short * tf.maximum(h, w) / tf.minimum(h, w)), tf.int32)
  short_t = tf.constant(short, tf.int32)
  return (
    tf.where(height <= width, short_t, long_side),
    tf.where(height <= width, long_side, short_t),
  )


def center_crop(image, size: int) -> tf.Tensor:
  """torchvision's CenterCrop(size): top = round((H - size) / 2), half to even (H, W >= size)."""
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float64) / 2.0), tf.int32)
  return image[top : top + size, left : left + size]


def eval_short_side(size: int, crop_fraction: float) -> int:
  """The side the shorter side is resized to before the centre crop: int(size / fraction)."""
  return int(size / crop_fraction)


def eval_crop(encoded, size: int, crop_fraction: float = 0.875) -> tf.Tensor:
  """Shorter side to int(size / crop_fraction), then the centre crop: uint8 [size, size, 3]."""
  short = eval_short_side(size, crop_fraction)
  image = decode.tf_decode(encoded)
  shape = tf.shape(image)
  new_h, new_w = resized_shape(shape[0], shape[1], short)
  out = center_crop(resize(image, new_h, new_w), size)
  out.set_shape([size, size, 3])
  return out
