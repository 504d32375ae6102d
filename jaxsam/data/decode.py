"""One decoder for both input paths: the rules that turn an image file into uint8 RGB [H, W, 3].

The rules, the same in memory (`decode_pil`, PIL) and streamed (`tf_decode`, TF), tested to agree
pixel for pixel:
  * 16-bit samples keep their high byte (v >> 8: 65535 -> 255, 30000 -> 117), libpng's
    `strip_16` and what PIL itself does to 16-bit RGB; never clipped.
  * Alpha is dropped, not composited (PIL's convert('RGB'), TF's channels=3, torchvision's loader).
  * Palette, greyscale, bilevel and CMYK images become RGB as PIL converts them.
  * EXIF orientation is ignored: the pixels as stored, as torchvision's `pil_loader` and TF's
    decoders give them (applying it would need the metadata parsed for every streamed JPEG).
  * JPEG uses the accurate integer DCT (PIL's default, TF's dct_method='INTEGER_ACCURATE'): the
    two libjpeg-turbo builds then give the same pixels; TF's default fast DCT differs by up to 4.
  * An animation gives its first frame.

Streamed, JPEG and PNG (nearly every file of a real dataset) decode in TF's own kernels (libjpeg-
turbo; `decode_and_crop_jpeg` decodes only a crop's blocks), so the common case stays in the
tf.data graph; every other format (BMP, GIF, TIFF, WebP, PPM...) goes through `decode_pil` in
`tf.numpy_function`. Header checks (`header_problem`) run at listing time, before anything is
decoded or written: an empty file, a dangling symlink, an unknown header or an image above
`dataset.max_image_pixels` is found there; `name_failures` names the file behind any decode error
that still happens mid-stream.
"""

import concurrent.futures
import io
import itertools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxsam.errors import DataError

# PIL's own default (Image.MAX_IMAGE_PIXELS), the default of dataset.max_image_pixels.
DEFAULT_MAX_PIXELS = 89_478_485
SHOWN_BAD = 5  # bad files named in one error line
# Threads reading headers, so that file opens on a slow or network disk overlap; PIL's parsing
# holds the GIL, so on a warm page cache they cost ~1.3x one thread's CPU (measured, 2 busy cores).
HEADER_WORKERS = 8
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# jaxsam checks its own limit (dataset.max_image_pixels) from every header before decoding; PIL's
# global check would be a second limit, a different one, that the config key could not raise.
Image.MAX_IMAGE_PIXELS = None


def shown(path) -> str:
  """`path` printable in one line whatever its bytes (a latin-1 name shows as \\xe9)."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_max_pixels(value) -> int:
  """dataset.max_image_pixels as an int (0 = no limit); DataError for a negative or non-int."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise DataError(
      f"dataset.max_image_pixels={value!r}; expected a pixel count >= 0 (0 = no limit; "
      f"PIL's default is {DEFAULT_MAX_PIXELS})"
    )
  return value


# ------------------------------------------------------------------------------------------ rules


def rgb_image(image: Image.Image) -> Image.Image:
  """A decoded PIL image as 8-bit RGB by the module's rules."""
  if image.mode in _SIXTEEN_BIT_MODES:  # PIL's convert would clip 16-bit grey at 255
    high = np.right_shift(np.asarray(image).astype(np.int64), 8)
    image = Image.fromarray(np.clip(high, 0, 255).astype(np.uint8))
  if image.mode == "RGB":
    return image
  with warnings.catch_warnings():  # "palette images with transparency...": the palette is used
    warnings.simplefilter("ignore", UserWarning)
    return image.convert("RGB")


def open_image(raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
  """The decoded RGB PIL image of `raw`; ValueError (size) or PIL's errors when it is not one."""
  with Image.open(io.BytesIO(raw)) as image:
    _check_size(image.size, max_pixels)
    image.load()  # decode now: a truncated file fails here, not later
    return rgb_image(image)


def decode_pil(raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """An encoded image -> uint8 [H, W, 3] (the in-memory path and the streamed fallback)."""
  return np.asarray(open_image(raw, max_pixels), dtype=np.uint8)


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
  w, h = size
  if max_pixels and w * h > max_pixels:
    raise ValueError(
      f"{w}x{h} = {w * h} pixels, above dataset.max_image_pixels={max_pixels} (raise it to "
      "train on this image)"
    )


# --------------------------------------------------------------------------------------- headers


def header_problem(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
  """Why `source` (a file path, or the bytes of an archive member) is no image to train on, read
  from its header alone (PIL's open parses no pixels); None when it looks like one."""
  if isinstance(source, bytes):
    if not source:
      return "empty file (0 bytes)"
    handle = io.BytesIO(source)
  else:
    try:
      if os.stat(source).st_size == 0:
        return "empty file (0 bytes)"
    except FileNotFoundError:
      return "dangling symlink" if os.path.islink(source) else "file not found"
    except OSError as e:
      return f"unreadable ({e.strerror})"
    handle = source
  try:
    with Image.open(handle) as image:
      size = image.size
  except UnidentifiedImageError:
    return "not an image (unknown header)"
  except Exception as e:  # noqa: BLE001 -- named in the message, never swallowed silently
    # PIL raises OSError, SyntaxError, ValueError... for damaged headers: name it, never crash.
    return f"unreadable header ({type(e).__name__}: {e})"
  try:
    _check_size(size, max_pixels)
  except ValueError as e:
    return str(e)
  return None


def header_problems(
  names: Sequence[str], read: Callable[[str], object], max_pixels: int
) -> dict[str, str]:
  """{name: problem} of the `names` whose header fails `header_problem`; `read(name)` gives what
  to check (a path or bytes). Threads, because most of the time is opening files."""
  with concurrent.futures.ThreadPoolExecutor(HEADER_WORKERS) as pool:
    problems = pool.map(lambda n: header_problem(read(n), max_pixels), names, chunksize=256)
    return {n: p for n, p in zip(names, problems, strict=True) if p is not None}


def bad_files_error(bad: dict[str, str], where: Callable[[str], str], what: str) -> DataError:
  """One line naming up to SHOWN_BAD bad files (with why) and their count."""
  first = itertools.islice(bad.items(), SHOWN_BAD)
  listed = "; ".join(f"{shown(where(n))} ({p})" for n, p in first)
  more = f"; and {len(bad) - SHOWN_BAD} more" if len(bad) > SHOWN_BAD else ""
  return DataError(
    f"{len(bad)} bad image file(s) in {what}: {listed}{more}; remove or replace them, or set "
    "dataset.skip_bad_images=true to train without them"
  )


# -------------------------------------------------------------------------------------- streamed


def _pil_fallback(encoded) -> np.ndarray:
  """tf.numpy_function body: the limit was checked at listing time, so none here."""
  return decode_pil(np.asarray(encoded).item(), max_pixels=0)  # eager: 0-d array; graph: bytes


def tf_decode(encoded, box_fn=None):
  """The streamed decoder: an encoded image (scalar tf.string) -> uint8 RGB [h, w, 3] by the
  module's rules; with `box_fn(height, width) -> int32 [top, left, h, w]`, only that crop (JPEG:
  only its blocks are decoded). Works eagerly and inside `tf.data.Dataset.map`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def crop(image):
    if box_fn is None:
      return image
    shape = tf.shape(image)
    box = box_fn(shape[0], shape[1])
    return image[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]

  def jpeg():
    if box_fn is None:
      return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
    shape = tf.image.extract_jpeg_shape(encoded)
    box = box_fn(shape[0], shape[1])

    return tf.image.decode_and_crop_jpeg(encoded, box, channels=3, dct_method="INTEGER_ACCURATE")

  def png():
    sixteen = tf.equal(tf.strings.substr(encoded, 24, 1), b"\x10")  # IHDR's bit depth

    def high_bytes():
      wide = tf.io.decode_png(encoded, channels=3, dtype=tf.uint16)
      return tf.cast(tf.bitwise.right_shift(wide, 8), tf.uint8)

    image = tf.cond(sixteen, high_bytes, lambda: tf.io.decode_png(encoded, channels=3))
    return crop(image)

  def other():
    image = tf.numpy_function(_pil_fallback, [encoded], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return crop(image)

  is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: tf.cond(is_png, png, other))
  image.set_shape([None, None, 3])
  return image


# libjpeg's scales 1/r used (TF's decoder offers 2 too; at 2 the region's resize saves less than
# the scaled decode's branch costs: measured slower on a 500x600 crop).
DCT_RATIOS = (8, 4)


def tf_decode_scaled(encoded, box, shrink_to: int):
  """The crop `box` (int32 [top, left, h, w]) of an encoded image that is going to be shrunk to
  `shrink_to` px: (uint8 [h', w', 3], float32 region [top, left, h, w] of the crop in it, ratio).

  A JPEG crop at least 4x `shrink_to` in both sides is decoded at libjpeg's DCT scale 1/r
  (r = 8 or 4, the largest leaving both sides >= shrink_to; what PIL's `draft` does): the
  r-aligned window around the box, the box then a sub-pixel region of it (box / r, shifted), so
  the shrink that follows sees the same geometry. The IDCT and the resize cost ~r**2 less for a
  large photo; the pixels differ slightly from a full-resolution crop's shrink (the DCT scaling
  is its own low-pass filter). Any other crop: `tf_decode`'s, region the whole of it, ratio 1.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  box = tf.convert_to_tensor(box, tf.int32)
  side = tf.minimum(box[2], box[3])

  def scaled(r):
    def run():
      shape = tf.image.extract_jpeg_shape(encoded)
      full = (shape[:2] + r - 1) // r  # libjpeg's scaled sides: ceil(side / r)
      first = box[:2] // r
      last = tf.minimum((box[:2] + box[2:] + r - 1) // r, full)
      window = tf.concat([first, last - first], 0)
      image = tf.image.decode_and_crop_jpeg(
        encoded, window, channels=3, ratio=r, dct_method="INTEGER_ACCURATE"
      )
      region = tf.concat(
        [
          tf.cast(box[:2], tf.float32) / r - tf.cast(first, tf.float32),
          tf.cast(box[2:], tf.float32) / r,
        ],
        0,
      )
      return image, region, tf.constant(r, tf.int32)

    return run

  def whole():
    image = tf_decode(encoded, lambda height, width: box)
    region = tf.concat([tf.zeros([2], tf.float32), tf.cast(box[2:], tf.float32)], 0)
    return image, region, tf.constant(1, tf.int32)

  cases = [
    (tf.logical_and(tf.io.is_jpeg(encoded), side >= r * shrink_to), scaled(r)) for r in DCT_RATIOS
  ]
  image, region, ratio = tf.case(cases, default=whole, exclusive=False)
  image.set_shape([None, None, 3])
  return image, region, ratio


def _read_file(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def stream_problem(path, read: Callable[[object], bytes] | None = None) -> str | None:
  """Why the streamed decoder fails on the file at `path` (eagerly, as in the stream), or None;
  `read` reads an archive member's bytes by name (default: `path` is a file)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  try:
    raw = (read or _read_file)(path)
  except OSError as e:
    return f"unreadable ({e.strerror})"
  try:
    tf_decode(tf.constant(raw))
  except Exception as e:  # noqa: BLE001 -- named in the message, never swallowed silently
    # TF's decoders raise InvalidArgumentError, the PIL fallback anything PIL raises.
    return f"cannot decode ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
  return None


def name_failures(
  batches: Iterator[dict],
  paths_of_batch: Callable[[int], Sequence],
  read: Callable[[object], bytes] | None = None,
) -> Iterator[dict]:
  """`batches`, but a decode error mid-stream becomes one DataError line naming the file.

  tf.data delivers an element's error in order, at its batch; `paths_of_batch(k)` gives the
  files of batch k, and each is decoded again alone to find the one that fails. An error no file
  of the batch reproduces is not a bad file: it is raised as it came.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  for k in itertools.count():
    try:
      batch = next(batches)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      paths = list(paths_of_batch(k))
      bad = {}
      for path in paths:
        problem = stream_problem(path, read)
        if problem is not None:
          bad[path] = problem
      if not bad:
        raise
      first = itertools.islice(bad.items(), SHOWN_BAD)
      listed = "; ".join(f"{shown(p)} ({why})" for p, why in first)
      raise DataError(
        f"cannot decode {len(bad)} streamed image file(s): {listed}; remove or replace it (the "
        "last checkpoint is kept: rerun the same command to resume)"
      ) from e
    yield batch
