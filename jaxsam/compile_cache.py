"""The persistent XLA compilation cache, on by default, so a rerun or a resume does not compile.

The folder is `--compilation_cache=DIR` when given ('' turns the cache off), else the environment's
`JAX_COMPILATION_CACHE_DIR` (JAX's own setting), else `$JAXSAM_CACHE/xla` (~/.cache/jaxsam/xla).
A folder that cannot be written is a one-line warning and a run without the cache, never a failed
run.
On GPUs JAX also keeps XLA's per-fusion autotuning results there, so a warm start skips autotuning.
"""

import os
import tempfile
from collections.abc import Mapping

from jaxsam import caches

ENV = "JAX_COMPILATION_CACHE_DIR"


def resolve(flag: str | None, env: Mapping[str, str]) -> str:
  """The cache folder to use: the flag when given ('' = off), else $JAX_COMPILATION_CACHE_DIR,
  else $JAXSAM_CACHE/xla; `~` expanded."""
  path = flag if flag is not None else env.get(ENV) or caches.folder("xla", env)
  return os.path.expanduser(path) if path else ""


def unwritable_reason(path: str) -> str | None:
  """Why `path` cannot hold the cache (created if missing), or None when a file can be written."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
      pass
  except OSError as e:
    return f"{type(e).__name__}: {e.strerror or e}"
  return None


def enable(path: str) -> str | None:
  """Points JAX's persistent cache at `path` ('' = off); returns a warning when it cannot be used.

  Call before the first compile (launch.py does, before JAX starts a backend); JAX reads the
  setting when it first compiles.
  """
  import jax  # pylint: disable=import-outside-toplevel  (launch.py's --help stays JAX-free)

  reason = unwritable_reason(path) if path else None
  if not path or reason:
    jax.config.update("jax_enable_compilation_cache", False)
    return (
      None
      if not path
      else (
        f"compilation cache {path} is not writable ({reason}); compiling without a persistent "
        "cache (--compilation_cache=DIR to choose another folder, '' to turn it off)"
      )
    )
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  return None


def entries(path: str) -> list[str]:
  """The cache's entries in `path`: compiled executables, named '<module>-<hash>-cache'."""
  if not os.path.isdir(path):
    return []
  return sorted(f for f in os.listdir(path) if f.endswith("-cache"))
