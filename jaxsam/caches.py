"""Where jaxsam keeps what it can rebuild: `$JAXSAM_CACHE` (default ~/.cache/jaxsam), one folder
per kind (`weights`, `xla`, `image_folder`), so one variable moves them all (a cluster's small home
folder, a node's scratch disk)."""

import os
from collections.abc import Mapping

ENV = "JAXSAM_CACHE"
KINDS = ("weights", "xla", "image_folder")


def root(environ: Mapping[str, str] | None = None) -> str:
  """$JAXSAM_CACHE, else ~/.cache/jaxsam; `~` expanded."""
  environ = os.environ if environ is None else environ
  return os.path.expanduser(environ.get(ENV) or os.path.join("~", ".cache", "jaxsam"))


def folder(kind: str, environ: Mapping[str, str] | None = None) -> str:
  """The cache folder of one kind (one of KINDS) under `root`."""
  if kind not in KINDS:
    raise ValueError(f"cache kind {kind!r} is unknown; accepted: {', '.join(KINDS)}")
  return os.path.join(root(environ), kind)
