"""Test session setup: 8 forced CPU devices, set once before JAX initialises its backends."""

import io
import os
import posixpath
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping

import pytest

from support import devices

# Must run before any jax import touches the backend; tests that need 1 device build a 1-device
# mesh.
os.environ.setdefault("XLA_FLAGS", devices.xla_flags(8))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Forced CPU devices share one XLA intra-op thread pool, as many threads as cores (2 here). A
# device waiting at an all-reduce can hold one of them while another device still needs a thread
# to get there; a run on 2 cores was seen stuck so until XLA aborted it. XLA sizes that pool from
# PJRT_NPROC; 16 threads are more than the waits of 8 devices can hold.
os.environ.setdefault("PJRT_NPROC", "16")
# TF's oneDNN CPU kernels may pick a different summation order from run to run; the parity tests
# against Keras compare float32 logits and should see one answer.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# One persistent XLA compilation cache for the whole session, inherited by the launch.py
# subprocesses: the many tiny runs compile the same programs (a kill-and-resume pair, the two
# processes of a multi-host run...), and compiling dominates their cost on 2 CPU cores.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"jaxsam-tests-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# jaxsam's own caches (decoded image folders, unpacked archives, weights) stay out of the user's
# home folder; tests that check a cache's behaviour give their own folder.
os.environ.setdefault(
  "JAXSAM_CACHE", os.path.join(tempfile.gettempdir(), f"jaxsam-tests-cache-{os.getuid()}")
)

# torchvision imports triton (through torch._dynamo), whose bundled LLVM segfaults the process when
# TensorFlow was imported first; no CPU test uses triton, so make its import fail cleanly.
sys.modules.setdefault("triton", None)


def _archive_members(source, prefix: str) -> dict:
  """name -> bytes, or None for a folder: `source` itself (a mapping), or a folder's tree under
  `prefix/` with each folder listed before its contents, as `tar c` and `zip -r` list them."""
  if isinstance(source, Mapping):
    return dict(source)
  members = {}
  for root, dirs, files in os.walk(source):
    dirs.sort()
    rel = os.path.relpath(root, source).replace(os.sep, "/")
    base = posixpath.join(prefix, rel) if rel != "." else prefix
    if base:
      members[base + "/"] = None
    for f in sorted(files):
      with open(os.path.join(root, f), "rb") as fh:
        members[posixpath.join(base, f)] = fh.read()
  return members


def _write_archive(path, source, prefix: str = ""):
  """Writes a .zip, .tar or .tar.gz/.tgz (by `path`'s suffix) holding `source`: a mapping of member
  name -> bytes (exactly those members, e.g. hostile names), or a folder (its tree under `prefix`).
  Returns `path`."""
  members = _archive_members(source, prefix)
  if str(path).endswith(".zip"):
    with zipfile.ZipFile(path, "w") as z:
      for name, data in members.items():
        z.writestr(zipfile.ZipInfo(name) if data is None else name, data or b"")
    return path
  with tarfile.open(path, "w:gz" if str(path).endswith((".tar.gz", ".tgz")) else "w") as t:
    for name, data in members.items():
      info = tarfile.TarInfo(name.rstrip("/"))
      if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        t.addfile(info)
      else:
        info.size, info.mode = len(data), 0o644
        t.addfile(info, io.BytesIO(data))
  return path


@pytest.fixture
def write_archive():
  """`write_archive(path, members_or_folder, prefix="")`: one writer of test tars and zips."""
  return _write_archive
