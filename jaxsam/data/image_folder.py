"""Image folders: `<split>/<class>/<image>` trees (torchvision's ImageFolder layout) in memory.

`dataset.path` is a folder or a `.tar`, `.tar.gz`/`.tgz` or `.zip` archive, optionally with one
top-level folder around the splits (as `cifar10-jpeg/{train,test}/...`). The class index is the
position of the class folder's name in sorted order, the convention of torchvision's and tfds'
ImageFolder; both splits must hold the same classes. Decoded arrays are cached in
`dataset.cache_dir`, keyed by the archive's bytes (a folder: its file names, sizes and mtimes) and
the load settings, so a relaunch skips decoding.

Why PIL and not tfds' ImageFolder builder or `tf.io.decode_image`: PIL decodes every format a
user's folder may hold (JPEG, PNG, BMP, TIFF, WebP; grey, palette or RGB), reads members straight
from the archive without extracting it, and names the file it fails on; `tf.io.decode_image`
knows fewer formats and was no faster here. tfds' builder needs an extracted folder and writes a
second copy of the data as records before anything can be read.
"""

import dataclasses
import hashlib
import io
import json
import os
import posixpath
import tarfile
import weakref
import zipfile
from collections.abc import Callable, Sequence

import numpy as np

from jaxsam.errors import DataError

# torchvision's IMG_EXTENSIONS: other files (README, .DS_Store...) in a class folder are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
CACHE_VERSION = 1  # bump when the cached arrays' meaning changes
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxsam", "image_folder")


@dataclasses.dataclass(frozen=True)
class Tree:
  """A folder or an archive as flat posix paths: its files, its folders, and how to read a file."""

  files: tuple[str, ...]
  dirs: frozenset[str]
  read: Callable[[str], bytes]
  where: Callable[[str], str]  # the path a user can find the member at, for error messages


def check_member(path: str, name: str) -> str:
  """A member's normalised posix path; DataError for an absolute path or one that escapes."""
  norm = posixpath.normpath(name.replace("\\", "/"))
  if posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
    raise DataError(
      f"archive {path!r} has member {name!r}, which escapes the archive's folder; "
      "refusing to read it (members must be relative paths inside the archive)"
    )
  return norm


def _parent_dirs(names: Sequence[str]) -> set[str]:
  dirs = set()
  for name in names:
    parent = posixpath.dirname(name)
    while parent and parent not in dirs:
      dirs.add(parent)
      parent = posixpath.dirname(parent)
  return dirs


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _tar_tree(path: str) -> Tree:
  """An uncompressed tar is read at random by its members' offsets (nothing extracted, nothing
  held); a compressed one cannot be, so its members are read into memory in one pass."""
  try:
    with tarfile.open(path, "r:*") as archive:
      compressed = not isinstance(archive.fileobj, io.BufferedReader)
      contents, dirs = {}, set()
      for member in archive:
        name = check_member(path, member.name)
        if name == ".":
          continue
        if member.isdir():
          dirs.add(name)
        elif member.isfile():
          contents[name] = (
            archive.extractfile(member).read() if compressed else (member.offset_data, member.size)
          )
  except (tarfile.TarError, EOFError, OSError) as e:
    raise DataError(f"dataset.path {path!r} is not a readable tar archive ({e})") from e
  if compressed:
    read = contents.__getitem__
  else:
    fd = os.open(path, os.O_RDONLY)

    def read(name):
      offset, size = contents[name]
      return os.pread(fd, size, offset)

    weakref.finalize(read, os.close, fd)  # closed when the tree is dropped

  return Tree(
    files=tuple(sorted(contents)),
    dirs=frozenset(dirs | _parent_dirs(list(contents))),
    read=read,
    where=lambda name: f"{path}:{name}",
  )


def _zip_tree(path: str) -> Tree:
  # Members are read at random from the open archive (its central directory holds their offsets).
  try:
    archive = zipfile.ZipFile(path)  # pylint: disable=consider-using-with -- lives with the tree
    contents, dirs = {}, set()
    for info in archive.infolist():
      name = check_member(path, info.filename)
      if name == ".":
        continue
      if info.is_dir():
        dirs.add(name)
      else:
        contents[name] = info
  except (zipfile.BadZipFile, OSError) as e:
    raise DataError(f"dataset.path {path!r} is not a readable zip archive ({e})") from e
  return Tree(
    files=tuple(sorted(contents)),
    dirs=frozenset(dirs | _parent_dirs(list(contents))),
    read=lambda name: archive.read(contents[name]),
    where=lambda name: f"{path}:{name}",
  )


def _walk(path: str):
  """(posix path relative to `path`, full path) of every folder and every file under `path`."""
  dirs, files = [], []
  for root, dir_names, file_names in os.walk(path):
    rel_root = os.path.relpath(root, path).replace(os.sep, "/")
    rel_root = "" if rel_root == "." else rel_root
    dir_names.sort()
    dirs += [posixpath.join(rel_root, d) for d in dir_names]
    files += [(posixpath.join(rel_root, f), os.path.join(root, f)) for f in sorted(file_names)]
  return dirs, files


def _folder_digest(path: str) -> str:
  """A folder's fingerprint from its file names, sizes and mtimes (hashing 60,000 files' bytes
  would cost more than decoding them)."""
  digest = hashlib.sha256()
  for rel, full in _walk(path)[1]:
    st = os.stat(full)
    digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def _folder_tree(path: str) -> Tree:
  dirs, walked = _walk(path)
  files = [rel for rel, _ in walked]

  def read(name):
    with open(os.path.join(path, *name.split("/")), "rb") as f:
      return f.read()

  return Tree(
    files=tuple(sorted(files)),
    dirs=frozenset(dirs),
    read=read,
    where=lambda name: os.path.join(path, *name.split("/")),
  )


EXPECTED = (
  f"a folder or a {', '.join(ARCHIVE_SUFFIXES)} archive laid out as <split>/<class>/<image>"
)


def kind(path: str) -> str:
  """'folder', 'zip' or 'tar'; DataError when `path` is none of them."""
  if not path:
    raise DataError(f"dataset.source='image_folder' needs dataset.path: {EXPECTED}")
  if os.path.isdir(path):
    return "folder"
  if not os.path.exists(path):
    raise DataError(f"dataset.path {path!r} does not exist; expected {EXPECTED}")
  if zipfile.is_zipfile(path):
    return "zip"
  if tarfile.is_tarfile(path):
    return "tar"
  raise DataError(f"dataset.path {path!r} is neither a folder nor an archive; expected {EXPECTED}")


def fingerprint(path: str) -> str:
  """Changes whenever the folder's or archive's contents may have: the cache's key."""
  return _folder_digest(path) if kind(path) == "folder" else _file_digest(path)


def open_tree(path: str) -> Tree:
  """The folder or archive at `path`; DataError when it is neither."""
  return {"folder": _folder_tree, "zip": _zip_tree, "tar": _tar_tree}[kind(path)](path)


def _split_root(tree: Tree, path: str, split: str) -> str:
  """Where `<split>/` lives: the top level, or inside the one folder that wraps everything."""
  if split in tree.dirs:
    return split
  tops = {name.split("/", 1)[0] for name in tree.files} | {d.split("/", 1)[0] for d in tree.dirs}
  if len(tops) == 1 and posixpath.join(next(iter(tops)), split) in tree.dirs:
    return posixpath.join(next(iter(tops)), split)
  found = sorted(d for d in tree.dirs if "/" not in d)
  raise DataError(
    f"dataset.path {path!r} has no split folder {split!r} (found folders "
    f"{found[:10]}); set dataset.train_split / dataset.test_split to its folders"
  )


def split_members(tree: Tree, path: str, split: str) -> tuple[list[str], list[list[str]]]:
  """Sorted class names of one split and, per class, its image files (sorted, recursive)."""
  root = _split_root(tree, path, split)
  classes = sorted(posixpath.basename(d) for d in tree.dirs if posixpath.dirname(d) == root)
  if not classes:
    raise DataError(
      f"split folder {tree.where(root)!r} holds no class folders; expected {split}/<class>/<image>"
    )
  by_class: dict[str, list[str]] = {name: [] for name in classes}
  prefix = root + "/"
  for f in tree.files:  # one pass (tree.files is sorted, so each class's list is too)
    if f.startswith(prefix) and f.lower().endswith(IMAGE_EXTENSIONS):
      name = f[len(prefix) :].split("/", 1)[0]
      if name in by_class:
        by_class[name].append(f)
  for name, images in by_class.items():
    if not images:
      raise DataError(
        f"class folder {tree.where(posixpath.join(root, name))!r} holds no images "
        f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove it or add its images"
      )
  return classes, list(by_class.values())


def _resize_and_crop(image, size: int):
  """Shorter side to `size` (bilinear), then the centre `size` x `size` crop: torchvision's
  Resize(size) + CenterCrop(size) arithmetic."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  w, h = image.size
  if (w, h) != (size, size):
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    image = image.crop((left, top, left + size, top + size))
  return image


def _decode(raw: bytes, where: str, size: int) -> np.ndarray:
  """One encoded image -> uint8 [H, W, 3] (resized and centre-cropped when size > 0)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  try:
    with Image.open(io.BytesIO(raw)) as image:
      image.load()  # decode now: a truncated file fails here, not later
      image = image.convert("RGB")
      if size:
        image = _resize_and_crop(image, size)
      return np.asarray(image, dtype=np.uint8)
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises OSError, SyntaxError, ValueError... for bad files; name the file in one line.
    raise DataError(f"cannot decode image {where} ({type(e).__name__}: {e})") from e


def _decode_all(tree: Tree, names: Sequence[str], size: int) -> list[np.ndarray]:
  # One thread: PIL's per-image Python overhead holds the GIL, so for CIFAR-sized JPEGs a thread
  # pool measured slower (8.2 s against 6.2 s for 20,000 images on 2 cores); TF's decode_jpeg in
  # tf.data was no faster and differs from PIL in most pixels (chroma upsampling).
  return [_decode(tree.read(n), tree.where(n), size) for n in names]


def _stack(images: list[np.ndarray], names: Sequence[str], tree: Tree) -> np.ndarray:
  shapes = {}
  for image, name in zip(images, names, strict=True):
    shapes.setdefault(image.shape[:2], name)
    if len(shapes) > 1:
      (a, first), (b, second) = shapes.items()
      raise DataError(
        f"images of several sizes ({a[1]}x{a[0]} in {tree.where(first)}, {b[1]}x{b[0]} in "
        f"{tree.where(second)}); set dataset.image_size=N to resize each to N x N at load "
        "(shorter side to N, then a centre crop)"
      )
  return np.stack(images)


def _load_split(tree: Tree, path: str, split: str, size: int):
  classes, members = split_members(tree, path, split)
  names = [n for images in members for n in images]
  labels = np.concatenate([np.full(len(images), i, np.int32) for i, images in enumerate(members)])
  images = _stack(_decode_all(tree, names, size), names, tree)
  return classes, images, labels


def cache_key(fingerprint: str, splits: Sequence[str], size: int) -> str:
  """The cache entry's name: the contents' fingerprint and every setting the arrays depend on."""
  settings = json.dumps([CACHE_VERSION, fingerprint, list(splits), size])
  return hashlib.sha256(settings.encode()).hexdigest()[:32]


def _read_cache(file: str):
  with np.load(file, allow_pickle=False) as arrays:
    return {k: arrays[k] for k in arrays.files}


def _write_cache(file: str, arrays: dict[str, np.ndarray]) -> None:
  """Atomic write (temporary file, then rename): a killed run never leaves a half cache."""
  os.makedirs(os.path.dirname(file), exist_ok=True)
  tmp = f"{file}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, file)


def load_arrays(
  path: str, splits: Sequence[str], *, size: int = 0, cache_dir: str = ""
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
  """Class names and (uint8 images, int32 labels) per split, from the cache or by decoding.

  Args:
    path: folder or archive.
    splits: split folder names, e.g. ('train', 'test').
    size: 0 keeps native sizes (which must then all agree); N > 0 resizes every image to N x N.
    cache_dir: where decoded arrays are kept ('' = ~/.cache/jaxsam/image_folder).
  """
  path = os.path.expanduser(path)
  cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  cache_file = os.path.join(cache_dir, cache_key(fingerprint(path), splits, size) + ".npz")
  if os.path.isfile(cache_file):
    try:
      arrays = _read_cache(cache_file)
      classes = json.loads(str(arrays["classes"]))
      return classes, [(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in splits]
    except (OSError, ValueError, KeyError):
      pass  # a damaged cache entry is rebuilt below
  tree = open_tree(path)
  loaded = [_load_split(tree, path, split, size) for split in splits]
  classes = loaded[0][0]
  for split, (other, _, _) in zip(splits[1:], loaded[1:], strict=True):
    if other != classes:
      only_first = sorted(set(classes) - set(other))
      only_other = sorted(set(other) - set(classes))
      raise DataError(
        f"splits {splits[0]!r} and {split!r} of {path!r} hold different classes "
        f"(only in {splits[0]!r}: {only_first[:5]}, only in {split!r}: "
        f"{only_other[:5]}); both splits need the same class folders"
      )
  arrays = {"classes": np.asarray(json.dumps(classes))}
  for split, (_, images, labels) in zip(splits, loaded, strict=True):
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
  try:
    _write_cache(cache_file, arrays)
  except OSError as e:
    print(
      f"jaxsam: warning: could not cache decoded images in {cache_dir} ({e.strerror}); "
      "the next launch decodes again",
      flush=True,
    )
  return classes, [(images, labels) for _, images, labels in loaded]
