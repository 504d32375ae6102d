"""Metric sinks: metrics.jsonl (resume truncation, kill mid-line), wandb mode resolution, and a real
offline wandb run read back from its `.wandb` file (no network)."""

import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsam import errors, writers
from jaxsam import workdir as workdir_lib


def _wandb_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {
      "mode": "offline",
      "project": "jaxsam-test",
      "entity": "",
      "name": "",
      "tags": "a, b",
      "group": "g",
      "log_checkpoints": False,
    }
  )
  config.update(overrides)
  return config


def wandb_records(run_file: str):
  """Records of a `.wandb` transaction log (LevelDB log format of wandb Record protobufs).

  wandb >= 0.19 reads these only in its Go core; this is the format's reference layout: a 7-byte
  header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks with a 7-byte header
  (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
  """
  from wandb.proto import wandb_internal_pb2

  with open(run_file, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", run_file
  pos, block, buf = 7, 32768, b""
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:  # block trailer padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    if kind == 0 and length == 0:
      pos += left
      continue
    chunk = data[pos + 7 : pos + 7 + length]
    pos += 7 + length
    buf = chunk if kind in (1, 2) else buf + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(buf)
      yield record


def wandb_history(run_file: str) -> list[dict]:
  rows = []
  for record in wandb_records(run_file):
    if record.WhichOneof("record_type") == "history":
      rows.append(
        {
          item.key or "/".join(item.nested_key): json.loads(item.value_json)
          for item in record.history.item
        }
      )
  return rows


def strict_json(text: str):
  """json.loads that rejects the NaN / Infinity tokens JSON does not have."""

  def reject(token):
    raise ValueError(f"non-JSON constant {token}")

  return json.loads(text, parse_constant=reject)


def test_jsonl_roundtrip_nan_and_resume_truncation(tmp_path):
  w = writers.JsonlWriter(workdir_lib.RunDir(str(tmp_path)).metrics)
  for step in (1, 2, 3, 4):
    w.write({"step": step, "epoch": step / 2, "train/loss": float("nan") if step == 2 else 1.0})
  w.close()
  path = workdir_lib.RunDir(tmp_path).metrics
  with open(path) as f:
    assert strict_json(f.readlines()[1]) == {"step": 2, "epoch": 1.0, "train/loss": None}
  records = writers.read_metrics(path)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert math.isnan(records[1]["train/loss"])  # null reads back as NaN: a metric is a number
  # A resumed run drops what was logged after its checkpoint, then appends.
  w = writers.JsonlWriter(workdir_lib.RunDir(str(tmp_path)).metrics, resume_step=2)
  w.write({"step": 3, "epoch": 1.5, "train/loss": 0.5})
  w.close()
  with open(path) as f:
    assert [strict_json(line)["train/loss"] for line in f] == [1.0, None, 0.5]
  # A fresh start (step 0) drops a killed run's records.
  writers.JsonlWriter(workdir_lib.RunDir(str(tmp_path)).metrics, resume_step=0).close()
  assert writers.read_metrics(path) == []


def test_metrics_with_nonfinite_strings_still_read(tmp_path):
  """Files that hold non-finite values as the strings "nan", "inf", "-inf" read as floats."""
  path = workdir_lib.RunDir(tmp_path).metrics
  with open(path, "w") as f:
    f.write(
      '{"step": 1, "epoch": 0.5, "train/loss": 1.0, "sam/gap": "nan"}\n'
      '{"step": 2, "epoch": 1.0, "train/loss": "inf", "sam/gap": "-inf"}\n'
    )
  records = writers.read_metrics(path)
  assert math.isnan(records[0]["sam/gap"])
  assert records[1]["train/loss"] == math.inf and records[1]["sam/gap"] == -math.inf
  writers.truncate_after(path, 1)  # a rewrite stores them as null
  with open(path) as f:
    assert [strict_json(line) for line in f] == [
      {"step": 1, "epoch": 0.5, "train/loss": 1.0, "sam/gap": None}
    ]


def test_write_json_makes_every_nonfinite_value_null(tmp_path):
  path = str(tmp_path / "out.json")
  writers.write_json(
    path,
    {
      "a": np.float32(np.nan),
      "b": [1.5, float("inf"), -np.inf],
      "c": {"d": np.array([0.25, np.nan]), "e": (jnp.asarray(2.0),)},
      "f": "nan",
      "g": None,
      "h": 3,
    },
  )
  with open(path) as f:
    assert strict_json(f.read()) == {
      "a": None,
      "b": [1.5, None, None],
      "c": {"d": [0.25, None], "e": [2.0]},
      "f": "nan",
      "g": None,
      "h": 3,
    }
  assert not os.path.exists(path + ".tmp")


def test_read_metrics_skips_only_a_cut_last_line(tmp_path):
  path = workdir_lib.RunDir(tmp_path).metrics
  with open(path, "w") as f:
    f.write('{"step": 1, "epoch": 0.5}\n{"step": 2, "ep')  # killed mid-write
  assert writers.read_metrics(path) == [{"step": 1, "epoch": 0.5}]
  writers.truncate_after(path, 5)
  with open(path, "w") as f:
    f.write('{"step": 1, "ep\n{"step": 2, "epoch": 1}\n')
  with pytest.raises(json.JSONDecodeError):
    writers.read_metrics(path)


def test_wandb_mode_resolution(tmp_path):
  no_netrc = str(tmp_path / "absent-netrc")
  env = {"NETRC": no_netrc}
  assert writers.resolve_wandb_mode("auto", env) == "offline"
  assert writers.resolve_wandb_mode("auto", {**env, "WANDB_API_KEY": "x" * 40}) == "online"
  netrc_file = tmp_path / "netrc"
  netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
  os.chmod(netrc_file, 0o600)
  assert writers.resolve_wandb_mode("auto", {"NETRC": str(netrc_file)}) == "online"
  other = tmp_path / "other-netrc"
  other.write_text("machine example.com login u password p\n")
  os.chmod(other, 0o600)
  assert writers.resolve_wandb_mode("auto", {"NETRC": str(other)}) == "offline"
  # WANDB_MODE decides `auto` when set; an explicit config mode always wins.
  assert writers.resolve_wandb_mode("auto", {**env, "WANDB_MODE": "disabled"}) == "disabled"
  assert writers.resolve_wandb_mode("auto", {**env, "WANDB_MODE": "dryrun"}) == "offline"
  assert writers.resolve_wandb_mode("offline", {"WANDB_MODE": "disabled"}) == "offline"
  assert writers.resolve_wandb_mode("disabled", {"WANDB_API_KEY": "x" * 40}) == "disabled"
  with pytest.raises(errors.ConfigError, match=r"wandb.mode='cloud' is unknown; known: auto"):
    writers.resolve_wandb_mode("cloud", env)


def test_disabled_wandb_creates_nothing(tmp_path):
  assert (
    writers.create_wandb_writer(
      _wandb_config(mode="disabled"), workdir_lib.RunDir(str(tmp_path)), {}, environ={}
    )
    is None
  )
  assert os.listdir(tmp_path) == []


def test_offline_wandb_run_holds_metrics_and_resumes_same_id(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # nothing outside tmp, whatever wandb defaults
  monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  run_config = {"seed": 3, "optimizer": {"learning_rate": 0.1}}
  records = [
    {"step": 5, "epoch": 0.5, "train/loss": 2.0, "lr": 0.1},
    {"step": 10, "epoch": 1.0, "train/loss": 1.5, "lr": 0.05},
    {"step": 10, "epoch": 1, "test/loss": 1.25, "test/accuracy": 0.75},
  ]
  writer = writers.create_wandb_writer(
    _wandb_config(), workdir_lib.RunDir(workdir), run_config, environ={"WANDB_MODE": "disabled"}
  )
  assert writer is not None and writer.run.settings.mode == "offline"
  for r in records:
    writer.write(r)
  writer.finish({"final_test_accuracy": 0.75})
  writer.close()
  import wandb

  wandb.teardown()  # the wandb service finishes writing the .wandb file when it shuts down
  run_id = writers.read_wandb_run_id(workdir_lib.RunDir(workdir).wandb_id)
  assert run_id == writer.run.id
  files = glob.glob(
    os.path.join(workdir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb")
  )
  assert len(files) == 1, os.listdir(os.path.join(workdir, "wandb"))
  history = wandb_history(files[0])
  # Train and test records of one step share a wandb row (x-axis = train step).
  assert [(h["_step"], h.get("train/loss"), h.get("test/accuracy")) for h in history] == [
    (5, 2.0, None),
    (10, 1.5, 0.75),
  ]
  assert history[1]["lr"] == 0.05 and history[1]["test/loss"] == 1.25
  run = next(r.run for r in wandb_records(files[0]) if r.WhichOneof("record_type") == "run")
  config = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert config["optimizer"] == {"learning_rate": 0.1} and config["seed"] == 3
  assert sorted(run.tags) == ["a", "b"] and run.run_group == "g" and run.display_name == "run"
  summary = {}
  for r in wandb_records(files[0]):
    if r.WhichOneof("record_type") == "summary":
      summary.update(
        {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update}
      )
  assert summary["final_test_accuracy"] == 0.75
  # Rerunning in the same workdir continues the same wandb run id.
  again = writers.create_wandb_writer(
    _wandb_config(), workdir_lib.RunDir(workdir), run_config, environ={}
  )
  assert again.run.id == run_id
  again.close()


def test_offline_wandb_run_prints_one_jaxsam_line(tmp_path, monkeypatch, capfd):
  """`auto` without credentials: no wandb banner or summary block, one line with `wandb sync`."""
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
  for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT", "WANDB_QUIET"):
    monkeypatch.delenv(key, raising=False)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  no_netrc = {"NETRC": str(tmp_path / "no_netrc")}
  capfd.readouterr()
  writer = writers.create_wandb_writer(
    _wandb_config(mode="auto"), workdir_lib.RunDir(workdir), {}, environ=no_netrc
  )
  assert writer.run.settings.mode == "offline"
  for step in range(1, 4):
    writer.write({"step": step, "epoch": step / 3, "train/loss": 1.0 / step})
  writer.finish({"final_test_accuracy": 0.5})
  writer.close()
  import wandb

  wandb.teardown()
  out, err = capfd.readouterr()
  sync_dir = writer.run.settings.sync_dir
  assert os.path.isdir(sync_dir) and sync_dir.startswith(os.path.join(workdir, "wandb"))
  assert (out + err).splitlines() == [writers.offline_run_line(sync_dir)]
  assert f"`wandb sync {sync_dir}`" in out


def test_wandb_console_settings():
  assert writers.wandb_console_settings("offline") == {"silent": True}
  # Online keeps wandb's link to the run: quiet drops the banner and summary, not the link.
  assert writers.wandb_console_settings("online") == {"quiet": True}


class _FakeRun:
  def __init__(self):
    self.calls = []

  def mark_preempting(self):
    self.calls.append("mark_preempting")


class _FakeWandb:
  """Stands in for WandbWriter: records what the RunWriter asks of it."""

  def __init__(self):
    self.run, self.records, self.closed = _FakeRun(), [], []

  def write(self, record):
    self.records.append(record)

  def log_checkpoint(self, path, step, aliases):
    self.run.calls.append(("artifact", path, step, aliases))

  def finish(self, summary):
    self.run.calls.append(("summary", summary))

  def close(self, exit_code=0):
    self.closed.append(exit_code)


def test_run_writer_owns_every_wandb_call(tmp_path):
  wandb = _FakeWandb()
  sink = writers.RunWriter(
    [writers.JsonlWriter(workdir_lib.RunDir(str(tmp_path)).metrics)], wandb, log_checkpoints=True
  )
  sink.write({"step": 1, "epoch": 0.5, "train/loss": 1.0})
  sink.log_checkpoint("ckpt/1", 1, best=True)
  sink.mark_preempting()
  sink.finish({"steps": 1})
  sink.close(exit_code=1)
  assert wandb.records == [{"step": 1, "epoch": 0.5, "train/loss": 1.0}]
  assert wandb.run.calls == [
    ("artifact", "ckpt/1", 1, ["latest", "step-1", "best"]),
    "mark_preempting",
    ("summary", {"steps": 1}),
  ]
  assert wandb.closed == [1]
  assert writers.read_metrics(workdir_lib.RunDir(tmp_path).metrics) == wandb.records
  # Without log_checkpoints no artifact; without wandb (or on process k > 0) every call is a no-op.
  quiet = _FakeWandb()
  writers.RunWriter([], quiet).log_checkpoint("ckpt/2", 2, best=False)
  assert quiet.run.calls == []
  nothing = writers.RunWriter()
  for call in (
    lambda: nothing.write({"step": 1}),
    nothing.mark_preempting,
    lambda: nothing.finish({}),
    nothing.close,
  ):
    call()
