"""The one wrapper every command-line `main()` runs in: how a command ends on bad input or Ctrl-C.

  @cli.entry
  def main(argv=None) -> int: ...

A `UserError` (bad input the user can fix, `jaxsam.errors`) becomes one line on stderr and exit
code 2; Ctrl-C becomes exit code 130 (128 + SIGINT, as a shell reports it) without a traceback.
The wrapped main returns its exit code, so `sys.exit(main())`, absl's `app.run(main)` and tests
that call `main([...])` all see the same number. Imports nothing heavy: `--help` stays fast.
"""

import functools
import sys
from collections.abc import Callable
from typing import NoReturn

from jaxsam import errors

USER_ERROR = 2
INTERRUPTED = 130


def fail(message: str, code: int = USER_ERROR) -> NoReturn:
  """Ends the command now with `error: message` on stderr and `code`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def entry(main: Callable[..., int | None]) -> Callable[..., int]:
  """`main` with bad input reported as one line (exit 2) and Ctrl-C as exit 130; None -> 0."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs) or 0
    except errors.UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      return USER_ERROR
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr, flush=True)
      return INTERRUPTED

  return wrapped
