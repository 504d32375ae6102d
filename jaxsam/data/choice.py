"""Which path a dataset takes: decoded into host memory, or streamed from its files.

`dataset.in_memory` picks: 'true' (every image decoded in host memory), 'false' (streamed),
'auto' (stream when the decoded train split would exceed AUTO_MEMORY_FRACTION of host memory, or
when its images have no single size). The estimate reads metadata and image headers only.
"""

import os
from collections.abc import Sequence

from jaxsam import errors
from jaxsam.data import sources, stream_sources

IN_MEMORY_CHOICES = ("auto", "true", "false")
# The in-memory path holds the decoded split plus an epoch's gathered copy and tf.data's buffers:
# streaming starts well before the split itself would fill the host.
AUTO_MEMORY_FRACTION = 0.25


def host_memory_bytes() -> int:
  """Physical memory of this host."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def in_memory_setting(dataset_config) -> str:
  """`dataset.in_memory` lower-cased; ConfigError for values other than IN_MEMORY_CHOICES."""
  value = str(dataset_config.get("in_memory", "true")).lower()  # older configs: in memory
  if value not in IN_MEMORY_CHOICES:
    raise errors.ConfigError(
      f"dataset.in_memory={dataset_config.in_memory!r}; expected one of {list(IN_MEMORY_CHOICES)}"
    )
  return value


def decoded_estimate(dataset_config, builder=None) -> tuple[int | None, str]:
  """(bytes of the decoded train split, or None when its images have no single size; what it
  was estimated from), read from the dataset's metadata without decoding it. `builder`: the
  prepared tfds builder (`sources.prepare`)."""
  if sources.source_name(dataset_config) == "tfds":
    builder = builder or sources.prepare(dataset_config)
    image_key, _ = stream_sources.tfds_keys(builder, dataset_config.name)
    shape = builder.info.features[image_key].shape
    count = stream_sources.tfds_count(builder, dataset_config.train_split, image_key)
    if None in shape[:2]:
      return None, f"{count} images of varying size"
    return count * shape[0] * shape[1] * 3, f"{count} images of {shape[1]}x{shape[0]}"
  path = os.path.expanduser(dataset_config.path)
  listing = stream_sources.folder_listing(dataset_config, unpack=False)  # it may stay in memory
  names = listing.names(dataset_config.train_split)
  if dataset_config.image_size:
    side = dataset_config.image_size
    return len(names) * side * side * 3, f"{len(names)} images at {side}x{side}"
  sizes = _header_sizes(listing, names[:: max(1, len(names) // 64)])
  if not sizes:  # every sampled file is bad: the listing's header check names them
    return None, f"{len(names)} images in {path}"
  if len(set(sizes)) > 1:
    return None, f"{len(names)} images of varying size in {path}"
  w, h = sizes[0]
  return len(names) * w * h * 3, f"{len(names)} images of {w}x{h}"


def _header_sizes(listing, names: Sequence[str]) -> list[tuple[int, int]]:
  """Image sizes read from the files' headers (PIL reads no pixels until asked)."""
  import io  # pylint: disable=import-outside-toplevel

  from PIL import Image  # pylint: disable=import-outside-toplevel

  sizes = []
  for name in names:
    try:
      with Image.open(io.BytesIO(listing.read(name))) as image:
        sizes.append(image.size)
    except (OSError, SyntaxError, ValueError):  # PIL's errors for a bad file
      continue  # the listing's header check names it
  return sizes


def choose(dataset_config, memory_bytes: int | None = None, builder=None) -> tuple[bool, str]:
  """(stream?, one line saying which path and why) for `config.dataset`.

  Raises:
    ConfigError: an unknown `dataset.in_memory`, or 'false' for a source that cannot stream.
  """
  setting = in_memory_setting(dataset_config)
  source = sources.source_name(dataset_config)
  name = dataset_config.name
  streamable = source in stream_sources.STREAMABLE_SOURCES
  if setting == "true" or (setting == "auto" and not streamable):
    why = "dataset.in_memory='true'" if setting == "true" else f"source {source!r} is in memory"
    return False, f"jaxsam: dataset {name!r} decoded in memory ({why})"
  if not streamable:
    raise errors.ConfigError(
      f"dataset.in_memory='false': source {source!r} cannot stream (it is read into memory "
      f"whole); streamable sources: {list(stream_sources.STREAMABLE_SOURCES)}; use "
      "dataset.in_memory='true' or 'auto'"
    )
  if setting == "false":
    return True, f"jaxsam: dataset {name!r} streamed from files (dataset.in_memory='false')"
  size, what = decoded_estimate(dataset_config, builder)
  memory = host_memory_bytes() if memory_bytes is None else memory_bytes
  limit = AUTO_MEMORY_FRACTION * memory
  if size is None:
    return True, (
      f"jaxsam: dataset {name!r} streamed from files: {what} (in memory needs one "
      "size; dataset.in_memory='auto')"
    )
  stream = size > limit
  verdict = "streamed from files" if stream else "decoded in memory"
  sign = ">" if stream else "<="
  return stream, (
    f"jaxsam: dataset {name!r} {verdict}: {what} decode to {size / 2**30:.1f} GiB "
    f"{sign} {AUTO_MEMORY_FRACTION:.0%} of host memory {memory / 2**30:.1f} GiB "
    "(dataset.in_memory='auto')"
  )
