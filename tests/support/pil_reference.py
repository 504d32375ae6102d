"""PIL's answer for every augmentation op, shared by the tf.data and the on-device parity tests:
the reference call per op, the arguments RandAugment / AutoAugment can give it, the tolerance."""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from skimage import data as skimage_data
from sklearn.datasets import load_sample_images

from jaxsam.data import augment_spec

HEIGHT, WIDTH = 40, 48  # not square: catches swapped axes
LEVELS = (0, 1, 3, 5, 7, 9, 10)
GREY = (augment_spec.FILL_VALUE,) * 3

# Exact: integer ops. Blends compute a + f * (b - a) in float32 and truncate like PIL's C code,
# so they match too; we allow 1 level for a float32 rounding at a .0 boundary. Affine ops map
# pixel centres like PIL but in float32 (PIL: float64), so a coordinate within ~1e-5 of a pixel
# edge may round to the neighbour: at most 0.5 % of pixels (one in 200).
EXACT = ("identity", "autocontrast", "equalize", "invert", "solarize", "posterize")
BLENDS = ("color", "contrast", "brightness", "sharpness")
AFFINE = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def small(photo, height=HEIGHT, width=WIDTH):
  return np.asarray(Image.fromarray(photo).resize((width, height), Image.BILINEAR))


def photos(height=HEIGHT, width=WIDTH) -> np.ndarray:
  """Real photos that packages ship (scikit-image, scikit-learn), downsized: uint8 [3, H, W, 3]."""
  return np.stack(
    [
      small(skimage_data.astronaut(), height, width),
      small(skimage_data.chelsea(), height, width),
      small(load_sample_images().images[1], height, width),
    ]
  )


def pil_op(name, image, arg):
  """The PIL reference for each op: ImageOps, ImageEnhance, Image.rotate / Image.transform."""
  im = Image.fromarray(image)
  affine = {
    "shear_x": (1, arg, 0, 0, 1, 0),
    "shear_y": (1, 0, 0, arg, 1, 0),
    "translate_x": (1, 0, arg, 0, 1, 0),
    "translate_y": (1, 0, 0, 0, 1, arg),
  }
  if name in affine:
    out = im.transform(im.size, Image.AFFINE, affine[name], Image.NEAREST, fillcolor=GREY)
  elif name == "rotate":
    out = im.rotate(arg, Image.NEAREST, fillcolor=GREY)
  elif name in ("color", "contrast", "brightness", "sharpness"):
    out = getattr(ImageEnhance, name.capitalize())(im).enhance(arg)
  elif name == "solarize":
    out = ImageOps.solarize(im, int(arg))
  elif name == "posterize":
    out = ImageOps.posterize(im, int(arg))
  elif name == "identity":
    out = im
  else:
    out = getattr(ImageOps, name)(im)
  return np.asarray(out)


def op_args(name):
  """Every argument RandAugment and AutoAugment can give `name` over the levels, both signs."""
  args = set()
  for mapping in (augment_spec.randaugment_args(np), augment_spec.autoaugment_args(np)):
    for negate in (False, True):
      levels = np.asarray(LEVELS, np.float64)
      values = mapping[name](levels, np.full(len(LEVELS), negate), (HEIGHT, WIDTH))
      args.update(float(v) for v in np.broadcast_to(values, levels.shape))
  if name == "posterize":
    # PIL refuses 0 bits; ours gives black there as TF's does (checked separately).
    args = {a for a in args if a >= 1} | {1.0, 2.0, 8.0}
  return sorted(args)


def op_cases(name, images):
  """(images repeated once per argument, float32 arguments per image, PIL's outputs)."""
  args = op_args(name)
  batch = np.concatenate([images] * len(args))
  batch_args = np.repeat(np.asarray(args, np.float32), len(images))
  expected = [pil_op(name, image, float(arg)) for image, arg in zip(batch, batch_args)]
  return batch, batch_args, expected


def assert_matches_pil(name, ours, expected, context):
  if name in EXACT:
    np.testing.assert_array_equal(ours, expected, err_msg=context)
  elif name in BLENDS:
    diff = np.abs(ours.astype(np.int32) - expected.astype(np.int32))
    assert diff.max() <= 1, f"{context}: max diff {diff.max()}"
  else:
    differing = np.mean(np.any(ours != expected, axis=-1))
    assert differing <= 0.005, f"{context}: {differing:.2%} of pixels differ"
