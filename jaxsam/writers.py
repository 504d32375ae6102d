"""Metric sinks. Each record is one dict with `step` and `epoch`; only process 0 writes.

`metrics.jsonl` is the source of truth (one JSON object per line); other sinks mirror it.
"""

import json
import math
import os
from typing import Any, Protocol

METRICS_FILE = "metrics.jsonl"


class Writer(Protocol):
  def write(self, record: dict[str, Any]) -> None: ...
  def close(self) -> None: ...


def _jsonable(value: Any) -> Any:
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible rather than invalid
  return value


class JsonlWriter:
  """Appends records to `<workdir>/metrics.jsonl`, flushed per line so a kill loses nothing."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None:
      truncate_after(self.path, resume_step)
    self._file = open(self.path, "a")

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (a missing file has none)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: str, step: int) -> None:
  """Drops records past `step` (written after the checkpoint a run resumes from)."""
  records = read_metrics(path)
  kept = [r for r in records if r["step"] <= step]
  if len(kept) != len(records):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


class MultiWriter:
  """Fans one record out to several writers."""

  def __init__(self, writers: list[Writer]):
    self.writers = writers

  def write(self, record: dict[str, Any]) -> None:
    for w in self.writers:
      w.write(record)

  def close(self) -> None:
    for w in self.writers:
      w.close()
