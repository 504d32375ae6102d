"""Metric sinks. Each record is one dict with `step` and `epoch`; only process 0 writes.

`metrics.jsonl` is the source of truth (one JSON object per line); other sinks mirror it:
`WandbWriter` logs every record to Weights & Biases (online, offline or disabled), with the
resolved config, a final summary and optionally checkpoint artifacts. A resumed run continues the
same wandb run: its id lives in `<workdir>/wandb_run_id`. The training loop sees one `RunWriter`,
which owns every sink call (so no loop code knows about wandb). Paths come from the caller
(`jaxsam.workdir.RunDir`): this module knows no file name of the run folder.
"""

import json
import math
import netrc
import os
import sys
from collections.abc import Mapping
from typing import Any, Protocol

from jaxsam import errors

WANDB_MODES = ("auto", "online", "offline", "disabled")
WANDB_HOST = "api.wandb.ai"
WANDB_INIT_TIMEOUT_S = 30.0  # an unreachable server falls back to offline after this long


class Writer(Protocol):
  def write(self, record: dict[str, Any]) -> None: ...
  def close(self) -> None: ...


class RunPaths(Protocol):
  """What the sinks need of a run folder (`jaxsam.workdir.RunDir` is one)."""

  root: str  # wandb keeps its files under it
  metrics: str  # metrics.jsonl
  wandb_id: str  # the wandb run id a resume continues


def json_safe(value: Any) -> Any:
  """`value` as plain JSON data: arrays as lists, array scalars as numbers, NaN and inf as None.

  JSON has no NaN or infinity: null keeps the key and the file valid JSON for every reader, and a
  metric stays a number or null (never a string). Metrics, summary, eval and analysis files use it.
  """
  if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
    value = value.tolist()
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def dumps_json(value: Any, **kwargs) -> str:
  """json.dumps of `json_safe(value)`; allow_nan=False, so nothing non-finite slips through."""
  return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` as indented JSON (see `json_safe`), atomically (tmp + rename)."""
  text = dumps_json(value, indent=2)  # before opening: a failure leaves no half-written file
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


# Non-finite floats as older metrics.jsonl files hold them (strings); read back as floats.
_NONFINITE_STRINGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _metric_value(value: Any) -> Any:
  """A metrics.jsonl value as a float where it stands for a non-finite one (null or a string)."""
  if value is None:
    return math.nan
  if isinstance(value, str):
    return _NONFINITE_STRINGS.get(value, value)
  return value


class JsonlWriter:
  """Appends records to `path` (a run's metrics.jsonl), flushed per line so a kill loses nothing."""

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    if resume_step is not None:
      truncate_after(self.path, resume_step)
    self._file = open(self.path, "a")  # noqa: SIM115 (open for the run; closed in close())

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(dumps_json(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (a missing file has none).

  Non-finite values (null, or the strings "nan", "inf", "-inf" of older files) read as float NaN
  and inf, so that a metric is always a number. A last line cut short by a kill mid-write is
  skipped: it belongs to steps the resumed run redoes.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append({k: _metric_value(v) for k, v in json.loads(line).items()})
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
  return records


def truncate_after(path: str, step: int) -> None:
  """Drops records past `step` (written after the checkpoint a run resumes from)."""
  records = read_metrics(path)
  kept = [r for r in records if r["step"] <= step]
  if len(kept) != len(records):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(dumps_json(r) + "\n" for r in kept)
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


def wandb_credentials_found(
  environ: Mapping[str, str], netrc_path: str | None = None, host: str = WANDB_HOST
) -> bool:
  """True when wandb could log in without a prompt: WANDB_API_KEY, or a netrc entry for `host`.

  The same two sources wandb reads; checked here so that `wandb.mode=auto` never waits on a login.
  """
  if environ.get("WANDB_API_KEY"):
    return True
  path = netrc_path or environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
  try:
    return netrc.netrc(path).authenticators(host) is not None
  except (OSError, netrc.NetrcParseError):
    return False


# WANDB_MODE values wandb itself accepts, as our modes.
_ENV_MODES = {
  "online": "online",
  "run": "online",
  "offline": "offline",
  "dryrun": "offline",
  "disabled": "disabled",
}


def resolve_wandb_mode(mode: str, environ: Mapping[str, str], netrc_path: str | None = None) -> str:
  """The mode wandb runs in: an explicit config mode wins; `auto` follows WANDB_MODE when set,
  else online with credentials (see `wandb_credentials_found`) and offline without."""
  if mode not in WANDB_MODES:
    raise errors.ConfigError(f"wandb.mode={mode!r} is unknown; known: {', '.join(WANDB_MODES)}")
  if mode != "auto":
    return mode
  env_mode = _ENV_MODES.get(environ.get("WANDB_MODE", "").strip().lower())
  if env_mode:
    return env_mode
  return "online" if wandb_credentials_found(environ, netrc_path) else "offline"


def read_wandb_run_id(path: str) -> str | None:
  """The wandb run id saved at `path` (`RunDir.wandb_id`), or None before the first run."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().strip() or None


def _write_wandb_run_id(path: str, run_id: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(run_id + "\n")
  os.replace(path + ".tmp", path)


class WandbWriter:
  """Mirrors metrics.jsonl records to one wandb run; x-axis = train step, `epoch` logged too."""

  def __init__(self, run):
    self.run = run
    self._closed = False
    # A resumed online run already holds the steps up to `starting_step`: wandb rejects (with a
    # warning each) steps below its current one, and those values were logged by the killed run.
    self._first_step = int(getattr(run, "starting_step", 0) or 0)

  def write(self, record: dict[str, Any]) -> None:
    step = int(record["step"])
    if step < self._first_step:
      return
    # Plain floats, NaN included: wandb charts NaN as a gap, where metrics.jsonl writes null.
    self.run.log(
      {k: v.item() if hasattr(v, "item") else v for k, v in record.items() if k != "step"},
      step=step,
    )

  def log_checkpoint(self, path: str, step: int, aliases: list[str]) -> None:
    """Uploads one checkpoint folder as a `model` artifact named after the run."""
    import wandb

    artifact = wandb.Artifact(f"{self.run.id}-checkpoint", type="model", metadata={"step": step})
    artifact.add_dir(path)
    self.run.log_artifact(artifact, aliases=aliases)

  def finish(self, summary: dict[str, Any]) -> None:
    self.run.summary.update(json_safe(dict(summary)))

  def close(self, exit_code: int = 0) -> None:
    """Ends the run (uploads what is left when online); exit_code != 0 marks it failed."""
    if not self._closed:
      self._closed = True
      self.run.finish(exit_code=exit_code)


def create_wandb_writer(
  wandb_config, paths: RunPaths, run_config: dict[str, Any], *, environ: Mapping[str, str]
) -> WandbWriter | None:
  """Starts (or resumes) the workdir's wandb run as `wandb_config` says; None when disabled.

  Args:
    wandb_config: the config's `wandb` section (mode, project, entity, name, tags, group).
    paths: the run folder's paths (`jaxsam.workdir.RunDir`); wandb writes under
      `<workdir>/wandb/` and the run id goes to `paths.wandb_id`, so that rerunning the same
      command continues the same wandb run.
    run_config: the resolved config, logged as the wandb run's config.
    environ: the process environment (WANDB_MODE, WANDB_API_KEY, NETRC), which decides `auto`.

  An online start that fails (no network, bad key) falls back to offline with a warning line:
  training never waits on wandb, and an offline run can be uploaded later with `wandb sync`.
  """
  mode = resolve_wandb_mode(wandb_config.mode, environ)
  if mode == "disabled":
    return None
  try:
    import wandb
  except ImportError:  # training never needs wandb: run without it, and say so once
    print(
      f"warning: wandb is not installed: wandb.mode={wandb_config.mode} runs as disabled "
      "(pip install wandb to log there)",
      file=sys.stderr,
    )
    return None

  kwargs = {
    "project": wandb_config.project or None,
    "entity": wandb_config.entity or None,
    "name": wandb_config.name or os.path.basename(os.path.normpath(os.path.abspath(paths.root))),
    "group": wandb_config.group or None,
    "tags": [t.strip() for t in wandb_config.tags.split(",") if t.strip()] or None,
    "config": run_config,
    "dir": paths.root,
    "resume": "allow",
    "id": read_wandb_run_id(paths.wandb_id),
  }
  try:
    wandb_run = wandb.init(
      mode=mode,
      settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, **wandb_console_settings(mode)),
      **kwargs,
    )
  except Exception as e:  # wandb raises CommError, UsageError, timeouts...: all mean "not online"
    if mode != "online":
      raise
    print(
      f"warning: wandb online start failed ({type(e).__name__}: "
      f"{(str(e).splitlines() or [''])[0][:200]}); logging offline",
      file=sys.stderr,
    )
    mode = "offline"
    wandb_run = wandb.init(
      mode=mode, settings=wandb.Settings(**wandb_console_settings(mode)), **kwargs
    )
  if mode == "offline":
    print(offline_run_line(wandb_run.settings.sync_dir), flush=True)
  _write_wandb_run_id(paths.wandb_id, wandb_run.id)
  return WandbWriter(wandb_run)


def wandb_console_settings(mode: str) -> dict[str, bool]:
  """wandb.Settings that keep its console output to what a user acts on.

  Offline: silent (no banner, no history and summary block; jaxsam prints one line instead, see
  `offline_run_line`). Online: quiet, which keeps wandb's run link at the start and the end.
  """
  return {"silent": True} if mode == "offline" else {"quiet": True}


def offline_run_line(sync_dir: str) -> str:
  """The one line an offline run prints: where the run is and the command that uploads it."""
  return f"jaxsam: wandb run saved offline in {sync_dir}; upload it with `wandb sync {sync_dir}`"


class RunWriter:
  """Every sink of one training run behind one interface; the training loop calls nothing else.

  Records go to metrics.jsonl and wandb; checkpoints become wandb artifacts when
  `log_checkpoints`; a preemption marks the wandb run as preempting; `close(exit_code)` ends it
  (non-zero: failed). A RunWriter with no sinks (processes other than 0) does nothing.
  """

  def __init__(
    self,
    writers: list[Writer] = (),
    wandb: WandbWriter | None = None,
    log_checkpoints: bool = False,
  ):
    self._writers = list(writers) + [wandb] * (wandb is not None)
    self._wandb = wandb
    self._log_checkpoints = log_checkpoints and wandb is not None

  def write(self, record: dict[str, Any]) -> None:
    for w in self._writers:
      w.write(record)

  def log_checkpoint(self, path: str, step: int, *, best: bool) -> None:
    if self._log_checkpoints:
      self._wandb.log_checkpoint(path, step, ["latest", f"step-{step}"] + ["best"] * best)

  def mark_preempting(self) -> None:
    if self._wandb is not None:
      self._wandb.run.mark_preempting()

  def finish(self, summary: dict[str, Any]) -> None:
    if self._wandb is not None:
      self._wandb.finish(summary)

  def close(self, exit_code: int = 0) -> None:
    if self._wandb is not None:
      self._wandb.close(exit_code=exit_code)
    for w in self._writers:
      if w is not self._wandb:
        w.close()


def create_run_writer(
  config, paths: RunPaths, *, start_step: int, main_process: bool, environ: Mapping[str, str]
) -> RunWriter:
  """The run's sinks: metrics.jsonl (records past `start_step` dropped: the resumed run redoes
  them) and wandb as `config.wandb` says; no sinks on processes other than 0."""
  if not main_process:
    return RunWriter()
  jsonl = JsonlWriter(paths.metrics, resume_step=start_step)
  try:
    wandb = create_wandb_writer(config.wandb, paths, config.to_dict(), environ=environ)
  except BaseException:
    jsonl.close()
    raise
  return RunWriter([jsonl], wandb, log_checkpoints=config.wandb.log_checkpoints)
