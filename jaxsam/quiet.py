"""A quiet start for the command-line tools: TensorFlow's and XLA's C++ start-up logs kept off.

TensorFlow and XLA log through C++ (absl/tsl) straight to file descriptor 2, out of Python's
reach. `TF_CPP_MIN_LOG_LEVEL` filters most of it but is read only once their logging starts; two
lines come before that, at `import tensorflow` (absl's "All log messages before
absl::InitializeLog()..." notice and oneDNN's "custom operations are on", once per TensorFlow
library), so `import_tensorflow` imports it with fd 2 caught and puts back every line but those
INFO notices: a warning or an error still shows. Light on purpose: nothing here imports JAX or TF
at module level. `launch.py --verbosity=N` and `TF_CPP_MIN_LOG_LEVEL=0` leave all of it alone:
then every log shows, for debugging.
"""

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator, MutableMapping

# Env var -> value: hides INFO and WARNING of the C++ logs of TensorFlow and XLA (both read
# TF_CPP_MIN_LOG_LEVEL; 2 keeps ERROR and FATAL). A value the user set wins.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}

# The start-up lines dropped from `import tensorflow`'s stderr: absl's pre-init notice and absl
# INFO lines ("I0000 00:00:1796514511.641356    6026 port.cc:153] ..."; before absl's logging
# is initialised the time field is seconds since the epoch). W, E and F lines are kept.
_NOISE = re.compile(
  r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
  r"|I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*"
)


def quiet_environment(environ: MutableMapping[str, str]) -> None:
  """Sets `QUIET_ENV` in `environ` where the user has not set the variable."""
  for key, value in QUIET_ENV.items():
    environ.setdefault(key, value)


def drop_noise(text: str) -> str:
  """`text` without the start-up notices (see `_NOISE`); every other line kept, in order."""
  return "".join(
    line for line in text.splitlines(keepends=True) if not _NOISE.fullmatch(line.rstrip("\n"))
  )


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
  """File descriptor 2 goes to a temporary file inside the block; after it (exception or not),
  what was written there, less the start-up notices, is written to stderr."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as caught:
    os.dup2(caught.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      caught.seek(0)
      kept = drop_noise(caught.read().decode(errors="replace"))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def import_tensorflow() -> None:
  """Imports TensorFlow (once per process) without its C++ start-up notices; nothing where it is
  not installed (training on in-memory data does not need it)."""
  if "tensorflow" in sys.modules:
    return
  with filtered_stderr():
    try:
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      return


def quiet_start() -> None:
  """Everything a command-line tool does for a quiet start; call it before JAX or TF load.

  `TF_CPP_MIN_LOG_LEVEL=0` in the environment asks for every log: then it does nothing.
  """
  if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
    return
  quiet_environment(os.environ)
  import_tensorflow()
