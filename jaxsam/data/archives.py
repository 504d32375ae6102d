"""Image-folder archives for streaming: which can be read at random, and unpacking the rest.

A `.tar` or `.zip` is read at random by its members' offsets (`image_folder.open_tree`). A
compressed tar (`.tar.gz`, `.tgz`, bz2, xz) cannot be: reaching member k means decompressing
everything before it. It is unpacked once into `<dataset.cache_dir>/unpacked/<key>` and streamed
from there as a folder, so resume stays exact (the same random access as a folder). The unpack is
atomic: into a temporary folder beside it, then one rename, so a killed launch or two launches
at once never leave a half-unpacked folder that looks complete.
"""

import hashlib
import os
import shutil
import tarfile

from jaxsam import caches
from jaxsam.data import image_folder
from jaxsam.errors import DataError

# Magic bytes of the compressions tarfile reads: gzip, bzip2, xz.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def is_compressed_tar(path: str) -> bool:
  """True for a tar archive inside gzip, bzip2 or xz compression."""
  if image_folder.kind(path) != "tar":
    return False
  with open(path, "rb") as f:
    head = f.read(6)
  return head.startswith(_COMPRESSED_MAGIC)


def unpacked_folder(path: str, cache_dir: str) -> str:
  """The folder a compressed tar is unpacked into, keyed by the archive's bytes."""
  key = hashlib.sha256(image_folder.fingerprint(path).encode()).hexdigest()[:32]
  return os.path.join(os.path.expanduser(cache_dir), "unpacked", key)


def unpack(path: str, cache_dir: str) -> str:
  """Unpacks the compressed tar at `path` once (atomically) and returns the folder; later calls
  return it at once. Members that would escape the folder are refused (image_folder's check)."""
  target = unpacked_folder(path, cache_dir)
  if os.path.isdir(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.{os.getpid()}.tmp"
  print(
    f"jaxsam: unpacking {path} into {target} once (a compressed tar cannot be read at "
    "random; streaming reads the unpacked files)",
    flush=True,
  )
  try:
    with tarfile.open(path, "r:*") as archive:
      members = []
      for member in archive:
        image_folder.check_member(path, member.name)
        if member.isdir() or member.isfile():
          members.append(member)
      archive.extractall(tmp, members=members, filter="data")
    os.rename(tmp, target)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(target):  # another launch unpacked it first
      return target
    raise DataError(
      f"cannot unpack {path} into {target} ({e}); free space or set dataset.cache_dir"
    ) from e
  except (tarfile.TarError, EOFError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise DataError(f"dataset.path {path!r} is not a readable tar archive ({e})") from e
  return target


def random_access_path(path: str, cache_dir: str) -> str:
  """`path` when its files can be read at random (a folder, .tar, .zip), else the folder a
  compressed tar is unpacked into (once)."""
  if is_compressed_tar(path):
    return unpack(path, cache_dir or caches.folder("image_folder"))
  return path
