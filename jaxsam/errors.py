"""User-facing errors: bad input that launch.py reports as one line and exit code 2.

Raise a `UserError` subclass (never a bare ValueError) for anything the user can fix: a bad config
value, a missing file, an incompatible checkpoint. The message is one line that names the bad value
and says what would be accepted.
"""


class UserError(Exception):
  """Base of every error caused by the user's input rather than a bug in jaxsam."""


class ConfigError(UserError, ValueError):
  """A config value is unknown, out of range or inconsistent with another (also a ValueError, so
  code that checks values the standard way catches it)."""


class DataError(UserError):
  """A dataset is unknown, absent or malformed."""


class PretrainedError(UserError):
  """A weight file is missing, unreadable or does not fit the model."""


class CheckpointError(UserError):
  """A checkpoint is corrupt or belongs to another model or config."""
