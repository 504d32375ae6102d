"""The run folder (`--workdir`): every file and folder in it, the `--overwrite` policy, its readers.

`ENTRIES` is the one list of what a run, an eval or an analysis writes there, and `RunDir` the
one place that joins those names onto a folder: every other module asks it for its paths.
`check` and `prepare` vet and create the folder before a run, `clear` is what `--overwrite`
removes, `config_diff` decides when a config belongs to another run (a key an older config.json
lacks counts as its default), and `read_run` reads a finished (or running) folder back. `RunLock`
makes one process at a time the folder's writer (a training launch, an eval or an analysis).
Light on purpose: no JAX, TF, orbax or matplotlib, so reports and plots can use it.
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple, Self

import ml_collections

from jaxsam import errors, writers

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
LAST_DIR = "checkpoints"
BEST_DIR = "best"
CORRUPT_DIR = "corrupt"
EVAL_FILE = "eval.json"
ANALYSIS_DIR = "analysis"
ANALYSIS_FILE = "analysis.json"  # inside ANALYSIS_DIR, with the landscape PNGs
WANDB_ID_FILE = "wandb_run_id"
WANDB_DIR = "wandb"
PROFILE_DIR = "profile"
LOCK_FILE = "run.lock"
LOCK_HOLDER_FILE = "run.lock.json"
WEIGHTS_FILE = "weights.json"


class Entry(NamedTuple):
  """One file or folder of the run folder: what it holds, and whether `--overwrite` removes it."""

  what: str
  cleared: bool


ENTRIES: dict[str, Entry] = {
  CONFIG_FILE: Entry("the resolved config; a rerun of another config is refused", True),
  METRICS_FILE: Entry("one JSON record per line (train and test metrics by step)", True),
  SUMMARY_FILE: Entry("final and best test accuracy, steps, wall time (a completed run)", True),
  CURVES_FILE: Entry("train/test loss and accuracy against epoch, redrawn at every eval", True),
  LAST_DIR: Entry("orbax: the last `checkpoint_keep` train states, by step", True),
  BEST_DIR: Entry("orbax: the train state with the best test accuracy", True),
  CORRUPT_DIR: Entry("checkpoints that failed to load, moved aside", True),
  EVAL_FILE: Entry("--mode=eval: one checkpoint's test loss, top-1, top-5, per class", True),
  ANALYSIS_DIR: Entry("jaxsam.analyze: analysis.json and the landscape PNGs", True),
  PROFILE_DIR: Entry(
    "launch.py --profile_steps: jax.profiler traces (TensorBoard, Perfetto)", True
  ),
  WEIGHTS_FILE: Entry(
    "the pretrained weights a run started from and the input normalisation they took", True
  ),
  WANDB_ID_FILE: Entry("the wandb run's id, so that a resume continues that run", True),
  # Kept: removing a lock file while another process holds it would let a third one in.
  LOCK_FILE: Entry("the one-writer lock, held by the launch, eval or analysis writing here", False),
  LOCK_HOLDER_FILE: Entry(
    "who holds the lock: host, pid, start time (names it in a refusal)", False
  ),
  # Kept: offline runs not yet synced live here; the new run gets a new id and its own folder.
  WANDB_DIR: Entry(
    "wandb's own files, one folder per wandb run (offline runs sync from here)", False
  ),
}
CLEARED = tuple(name for name, entry in ENTRIES.items() if entry.cleared)


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The paths of one run folder's entries: the only code that joins a name onto a workdir.

  Train, eval, analysis, checkpoints, writers and weights take their paths from here, so the
  folder's layout (`ENTRIES`, a contract with every existing run) is written once.
  """

  root: str

  def _join(self, *names: str) -> str:
    return os.path.join(self.root, *names)

  @property
  def config(self) -> str:
    return self._join(CONFIG_FILE)

  @property
  def metrics(self) -> str:
    return self._join(METRICS_FILE)

  @property
  def summary(self) -> str:
    return self._join(SUMMARY_FILE)

  @property
  def curves(self) -> str:
    return self._join(CURVES_FILE)

  @property
  def checkpoints(self) -> str:
    return self._join(LAST_DIR)

  def checkpoint(self, step: int) -> str:
    """One saved step in `checkpoints/`."""
    return self._join(LAST_DIR, str(step))

  @property
  def best(self) -> str:
    return self._join(BEST_DIR)

  def best_checkpoint(self, step: int) -> str:
    """The best-accuracy step in `best/`."""
    return self._join(BEST_DIR, str(step))

  def corrupt(self, step: int) -> str:
    """Where a checkpoint that failed to load is moved aside."""
    return self._join(CORRUPT_DIR, str(step))

  @property
  def eval(self) -> str:
    return self._join(EVAL_FILE)

  @property
  def analysis_dir(self) -> str:
    return self._join(ANALYSIS_DIR)

  @property
  def analysis(self) -> str:
    return self._join(ANALYSIS_DIR, ANALYSIS_FILE)

  @property
  def profile(self) -> str:
    return self._join(PROFILE_DIR)

  @property
  def weights(self) -> str:
    return self._join(WEIGHTS_FILE)

  @property
  def wandb_id(self) -> str:
    return self._join(WANDB_ID_FILE)

  @property
  def lock(self) -> str:
    return self._join(LOCK_FILE)

  @property
  def lock_holder(self) -> str:
    return self._join(LOCK_HOLDER_FILE)

  def entry(self, name: str) -> str:
    """Any `ENTRIES` name's path (what `clear` walks)."""
    if name not in ENTRIES:
      raise KeyError(f"{name!r} is not a run-folder entry; known: {', '.join(ENTRIES)}")
    return self._join(name)

  def has_checkpoint(self) -> bool:
    """Whether `checkpoints/` holds a saved step (a rerun then resumes from it)."""
    folder = self.checkpoints
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


# Keys that may change between a run and its resumption without making it another run (where the
# decoded-image cache lives changes no pixel; both input pipelines make the same batches).
RESUME_MAY_CHANGE = frozenset(
  {
    "max_steps",
    "progress_bar",
    "wandb.mode",
    "log_every_steps",
    "dataset.cache_dir",
    "dataset.pipeline",
  }
)
# Keys that may differ between a checkpoint's run and the config it is analysed with: they change
# logging, tracking or the length of training only, never the model. A name ending in "." is a
# whole section.
ANALYSIS_MAY_DIFFER = RESUME_MAY_CHANGE | {
  "num_epochs",
  "eval_every_epochs",
  "checkpoint_every_epochs",
  "checkpoint_keep",
  "wandb.",
}


def _allowed(name: str, allowed: Collection[str]) -> bool:
  return name in allowed or any(a.endswith(".") and name.startswith(a) for a in allowed)


_MISSING = object()


def config_diff(
  old: Mapping,
  new: Mapping,
  allowed: Collection[str] = (),
  prefix: str = "",
  *,
  defaults: Mapping | None = None,
) -> list[str]:
  """Dotted names of the leaf keys whose values differ, sorted, leaving out the `allowed` ones.

  A key that `old` (an older run's config.json) lacks counts as the value it has in `defaults`
  (the code's default config): a key added since that run, left at its default, is no change.
  """
  out = []
  defaults = {} if defaults is None else defaults
  for k in sorted(set(old) | set(new)):
    name, a, b = prefix + k, old.get(k, _MISSING), new.get(k)
    if a is _MISSING:
      a = defaults.get(k)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      sub = defaults.get(k)
      out += config_diff(
        a, b, allowed, name + ".", defaults=sub if isinstance(sub, Mapping) else {}
      )
    elif a != b and not _allowed(name, allowed):
      out.append(name)
  return out


def default_config() -> dict[str, Any]:
  """`configs/common.py`'s defaults as a dict, what a key missing from an older run's config.json
  stood for; {} when the `configs` package is not importable (every missing key is then a change).
  """
  try:
    from configs import common  # the repository's configs, next to launch.py
  except ImportError:
    return {}
  return common.get_base_config().to_dict()


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """config.json's text: the resolved config, keys sorted, so that equal configs are equal text."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def check(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> None:
  """Refuses, before anything is built or written, a workdir that is a file, cannot be created
  or written, or holds a run of another config (unless `overwrite`)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.ConfigError(f"--workdir={workdir} is a file; give a directory path")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise errors.ConfigError(
      f"--workdir={workdir} is not writable ({existing} is not a writable directory)"
    )
  path = RunDir(workdir).config
  if os.path.exists(path) and not overwrite:
    diff = config_diff(
      _read_json(path, "use a new --workdir, or --overwrite to replace it"),
      json.loads(config_to_json(config)),
      RESUME_MAY_CHANGE,
      defaults=default_config(),
    )
    if diff:
      raise errors.ConfigError(
        f"--workdir={workdir} holds a run of another config (differs in {', '.join(diff[:5])}); "
        "use a new --workdir, or --overwrite to replace it"
      )


def prepare(
  config: ml_collections.ConfigDict, workdir: str, overwrite: bool, *, main_process: bool = True
) -> None:
  """Checks the workdir; the main process clears it when `overwrite`, then writes config.json."""
  check(config, workdir, overwrite)
  if not main_process:
    return
  if overwrite:
    clear(workdir)
  path = RunDir(workdir).config
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      f.write(config_to_json(config))
    os.replace(path + ".tmp", path)
  except OSError as e:
    raise errors.ConfigError(f"--workdir={workdir} is not writable ({e.strerror})") from e


def clear(workdir: str) -> None:
  """Removes every `CLEARED` entry, so that nothing of the previous run is resumed or reported.

  Anything else in the folder (wandb's files, the user's own) stays.
  """
  run = RunDir(workdir)
  for name in CLEARED:
    path = run.entry(name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)


def _read_json(path: str, fix: str) -> Any:
  """The JSON at `path`; one-line ConfigError saying `fix` when it cannot be read."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.ConfigError(f"{path} cannot be read as JSON ({e}); {fix}") from e


def with_defaults(saved: Mapping, defaults: Mapping) -> dict[str, Any]:
  """`saved` with every key it lacks taken from `defaults`, section by section (what an older
  run's config.json stood for, under today's keys)."""
  out = dict(saved)
  for k, v in defaults.items():
    if k not in out:
      out[k] = v
    elif isinstance(out[k], Mapping) and isinstance(v, Mapping):
      out[k] = with_defaults(out[k], v)
  return out


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in `<workdir>/config.json`; a key it lacks (added since the
  run) has its default, so eval and analysis read an older run with today's code."""
  path = RunDir(workdir).config
  if not os.path.isfile(path):
    raise errors.ConfigError(
      f"--workdir={workdir} has no {CONFIG_FILE}; give the folder of a training run or pass "
      "--config"
    )
  saved = _read_json(path, "pass --config")
  if not isinstance(saved, Mapping):
    raise errors.ConfigError(f"{path} holds no config (a JSON object); pass --config")
  return ml_collections.ConfigDict(with_defaults(saved, default_config()))


def resolve_checkpoint(workdir: str, checkpoint: str | None) -> str:
  """The checkpoint folder to restore: `checkpoint` if given, else the workdir's newest."""
  if checkpoint:
    if not os.path.isdir(checkpoint):
      raise errors.CheckpointError(
        f"--checkpoint={checkpoint} is not a folder; pass a step folder such as "
        f"{RunDir(workdir).checkpoint('<step>')}"
      )
    return os.path.abspath(checkpoint)
  last = RunDir(workdir).checkpoints
  found = (
    sorted((int(n) for n in os.listdir(last) if n.isdigit()), reverse=True)
    if os.path.isdir(last)
    else []
  )
  if not found:
    raise errors.CheckpointError(
      f"--workdir={workdir} holds no checkpoint in {LAST_DIR}/; train first or pass "
      "--checkpoint=PATH"
    )
  return os.path.abspath(RunDir(workdir).checkpoint(found[0]))


def read_summary(workdir: str) -> dict[str, Any]:
  """summary.json, or {} when the run has not completed."""
  path = RunDir(workdir).summary
  return _read_json(path, "delete it and rerun the run") if os.path.isfile(path) else {}


def read_analysis(workdir: str) -> dict[str, Any] | None:
  """analysis/analysis.json, or None when the run has not been analysed."""
  path = RunDir(workdir).analysis
  return _read_json(path, "rerun python -m jaxsam.analyze") if os.path.isfile(path) else None


@dataclasses.dataclass(frozen=True)
class Run:
  """A run folder read back: the config, the metrics records and what exists of summary/analysis."""

  path: str
  config: dict[str, Any]
  records: list[dict[str, Any]]
  summary: dict[str, Any]  # {} until the run completes
  analysis: dict[str, Any] | None  # None until jaxsam.analyze has run


def read_run(workdir: str) -> Run:
  """Everything a report needs from one run folder; a folder without config.json is refused."""
  run = RunDir(workdir)
  path = run.config
  if not os.path.isfile(path):
    raise errors.ConfigError(
      f"{workdir} is not a run folder (no {CONFIG_FILE}); give workdirs of launch.py runs"
    )
  return Run(
    path=workdir,
    config=_read_json(path, "give workdirs of launch.py runs"),
    records=writers.read_metrics(run.metrics),
    summary=read_summary(workdir),
    analysis=read_analysis(workdir),
  )


# ------------------------------------------------------------------------------- one writer


class WorkdirInUseError(errors.UserError):
  """Another process (a launch, an eval, an analysis) holds the run folder's lock."""


def _holder_text(workdir: str) -> str:
  """'launch.py (host h, pid 12, since 2026-01-01 10:00:00 UTC)' from the holder file, or a
  vaguer line when the holder has not written it yet."""
  try:
    with open(RunDir(workdir).lock_holder) as f:
      h = json.load(f)
    return f"{h['what']} (host {h['host']}, pid {h['pid']}, since {h['started']})"
  except (OSError, ValueError, KeyError, TypeError):
    return "another process (its host and pid are not recorded yet)"


ACQUIRE_TRIES = 20
HELD_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's "someone holds it"


class RunLock:
  """An exclusive lock on a run folder for as long as a launch, an eval or an analysis writes it.

  `fcntl.flock` on `<workdir>/run.lock`: the kernel drops it when its holder exits however it
  exits (kill -9 included) and, on NFS, when the node's lease lapses, so a rerun is never blocked
  by a dead run (filelock would add a soft fallback that outlives its holder; flock alone is the
  behaviour wanted). Who holds it is written to `run.lock.json`, so that a refused process names
  it. The lock file itself is never removed: a process that opened it before the removal would
  lock the orphan while a newcomer locks a new file.
  """

  def __init__(self, workdir: str, what: str):
    self.workdir = workdir
    self.what = what
    self._fd: int | None = None

  def acquire(self) -> Self:
    """Takes the lock without waiting; WorkdirInUseError naming the holder when it is held.

    Creates the folder (and the empty lock file) when absent, and nothing else.
    """
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(RunDir(self.workdir).lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise errors.ConfigError(f"--workdir={self.workdir} is not writable ({e.strerror})") from e
    # A few tries over a second: `check_not_held` probes hold the lock for microseconds, and a
    # probe must not turn away the launch it races with. A real holder holds it for hours.
    for attempt in range(ACQUIRE_TRIES):
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in HELD_ERRNOS:  # a filesystem without locks: say so, do not block runs
          os.close(fd)
          print(
            f"jaxsam: warning: cannot lock {self.workdir} ({e.strerror}); a second writer "
            "into it would not be refused",
            flush=True,
          )
          return self
        if attempt == ACQUIRE_TRIES - 1:
          os.close(fd)
          raise WorkdirInUseError(in_use_message(self.workdir)) from None
        time.sleep(0.05)
    self._fd = fd
    holder = {
      "what": self.what,
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    path = RunDir(self.workdir).lock_holder
    with open(path + ".tmp", "w") as f:
      json.dump(holder, f)
    os.replace(path + ".tmp", path)
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(OSError):  # the user removed it; the lock itself is what counts
      os.remove(RunDir(self.workdir).lock_holder)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> Self:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def in_use_message(workdir: str) -> str:
  return (
    f"--workdir={workdir} is in use by {_holder_text(workdir)}; one process writes a run "
    "folder at a time: wait for it to end (or stop it), or give another --workdir"
  )


def check_not_held(workdir: str) -> None:
  """WorkdirInUseError when a live process holds the folder's lock; creates and writes nothing.

  A cheap early probe, so that a second launch fails in a second rather than after loading its
  data; `RunLock.acquire` before the first write is what guarantees one writer.
  """
  path = RunDir(workdir).lock
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return  # no lock file: no run has held this folder, or it is not a folder yet
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in HELD_ERRNOS:
      raise WorkdirInUseError(in_use_message(workdir)) from None
  finally:
    os.close(fd)
