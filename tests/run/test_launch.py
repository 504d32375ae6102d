"""launch.py end to end: config files, overrides, bad input, and the workdir contract."""

import glob
import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (the loader launch.py uses)

from configs import common
from support import devices
from support.paths import ROOT
from support.runs import failure

CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
QUICK = [
  "--config.num_epochs=1",
  "--config.model.image_size=8",
  "--config.batch_size=64",
  "--config.log_every_steps=5",
  "--config.progress_bar=False",
  "--config.wandb.mode=disabled",
]


def read(path):
  with open(path) as f:
    return f.read()


def launch(*args, cwd=ROOT, timeout=300):
  env = dict(os.environ, XLA_FLAGS=devices.xla_flags(2))
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch.py"), *args],
    cwd=cwd,
    check=False,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )


def load_config(path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize(
  "path",
  [p for p in CONFIG_FILES if os.path.basename(p) not in ("common.py", "__init__.py")],
  ids=os.path.basename,
)
def test_every_config_file_loads_with_every_base_key(path):
  config = load_config(path)
  base = common.get_base_config()

  def keys(d, prefix=""):
    return {prefix + k for k, v in d.items() if not hasattr(v, "items")} | {
      x for k, v in d.items() if hasattr(v, "items") for x in keys(v, prefix + k + ".")
    }

  assert keys(config) == keys(base)
  doc = read(path)
  assert "python launch.py --config=configs/" in doc  # the docstring gives the command


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quick") / "run")
  result = launch(
    "--config=configs/quickstart.py", f"--workdir={workdir}", "--config.seed=7", *QUICK
  )
  assert result.returncode == 0, failure(result)
  return workdir, result


@pytest.mark.slow
def test_quick_run_writes_the_workdir_contract(quick_run):
  workdir, result = quick_run
  config = json.loads(read(os.path.join(workdir, "config.json")))
  assert config["seed"] == 7 and config["model"]["image_size"] == 8  # overrides resolved
  records = [json.loads(line) for line in read(os.path.join(workdir, "metrics.jsonl")).splitlines()]
  train = [r for r in records if "train/loss" in r]
  evals = [r for r in records if "test/accuracy" in r]
  assert train and evals
  for r in records:
    assert {"step", "epoch"} <= set(r)
  for r in train:
    assert {"train/loss", "train/accuracy", "lr", "images_per_sec"} <= set(r)
  assert {"test/loss", "test/accuracy", "test/top5"} <= set(evals[-1])
  assert train[-1]["step"] == 22  # 1,437 digits // 64 = 22 steps in the epoch
  summary = json.loads(read(os.path.join(workdir, "summary.json")))
  assert summary["final_test_accuracy"] == pytest.approx(evals[-1]["test/accuracy"])
  assert summary["steps"] == 22 and summary["num_devices"] == 2
  assert {"best_test_accuracy", "wall_time_s"} <= set(summary)
  assert "epoch   1" in result.stdout  # one summary line per epoch


def assert_one_line_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  err = result.stderr.strip()
  assert "Traceback" not in err, err
  last = err.splitlines()[-1]
  for fragment in fragments:
    assert fragment in last, last


def test_unknown_config_key_is_one_line_error(tmp_path):
  result = launch(
    "--config=configs/quickstart.py", f"--workdir={tmp_path}/w", "--config.sam.rhoo=0.1"
  )
  assert_one_line_error(result, "rhoo")
  assert not os.path.exists(tmp_path / "w")


def test_wrong_typed_override_is_one_line_error(tmp_path):
  result = launch(
    "--config=configs/quickstart.py", f"--workdir={tmp_path}/w", "--config.batch_size=lots"
  )
  assert_one_line_error(result, "lots")
  assert not os.path.exists(tmp_path / "w")


def test_missing_config_file_is_one_line_error(tmp_path):
  result = launch("--config=configs/nope.py", f"--workdir={tmp_path}/w")
  assert_one_line_error(result, "nope.py")


TINY = [
  "--config.max_steps=5",
  "--config.model.image_size=8",
  "--config.model.width=4",
  "--config.batch_size=64",
  "--config.log_every_steps=5",
  "--config.progress_bar=False",
  "--config.wandb.mode=disabled",
]


@pytest.mark.slow
def test_profile_steps_write_a_trace_into_the_workdir(tmp_path):
  workdir = tmp_path / "w"
  result = launch(
    "--config=configs/quickstart.py", f"--workdir={workdir}", "--profile_steps=2:4", *TINY
  )
  assert result.returncode == 0, failure(result)
  assert os.listdir(workdir / "profile") == ["process_0"]  # one folder per process
  traces = glob.glob(str(workdir / "profile" / "process_0" / "plugins" / "profile" / "*" / "*"))
  assert any(t.endswith(".xplane.pb") for t in traces), traces
  assert any(t.endswith("perfetto_trace.json.gz") for t in traces), traces  # ui.perfetto.dev
  records = [json.loads(line) for line in read(workdir / "metrics.jsonl").splitlines()]
  waits = [r["time/input_wait_ms"] for r in records if "train/loss" in r]
  assert waits and all(w >= 0 for w in waits)


@pytest.mark.slow
def test_profile_steps_past_the_run_warn_and_train_on(tmp_path):
  result = launch(
    "--config=configs/quickstart.py", f"--workdir={tmp_path}/w", "--profile_steps=7:9", *TINY
  )
  assert result.returncode == 0, failure(result)
  assert "warning: --profile_steps=7:9 goes past the run's 5 steps; no step is traced" in (
    result.stderr
  )
  assert not os.path.exists(tmp_path / "w" / "profile")


@pytest.mark.parametrize("value", ["4:2", "3:3", "-1:4", "2-4", "a:b", "5"])
def test_malformed_profile_steps_is_one_line_error(tmp_path, value):
  result = launch(
    "--config=configs/quickstart.py", f"--workdir={tmp_path}/w", f"--profile_steps={value}"
  )
  assert_one_line_error(result, f"--profile_steps={value}", "START:END")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_workdir_that_is_a_file_is_refused_and_left_alone(tmp_path):
  path = tmp_path / "afile"
  path.write_text("precious")
  result = launch("--config=configs/quickstart.py", f"--workdir={path}", *QUICK)
  assert_one_line_error(result, str(path))
  assert path.read_text() == "precious"


@pytest.mark.slow
def test_unwritable_workdir_is_one_line_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  result = launch("--config=configs/quickstart.py", f"--workdir={blocker}/sub", *QUICK)
  assert_one_line_error(result, "not writable")


@pytest.mark.slow
def test_workdir_of_another_config_is_refused(quick_run):
  workdir, _ = quick_run
  before = read(os.path.join(workdir, "metrics.jsonl"))
  result = launch(
    "--config=configs/quickstart.py",
    f"--workdir={workdir}",
    *QUICK,
    "--config.optimizer.learning_rate=0.5",
  )
  assert_one_line_error(result, "optimizer.learning_rate", "--overwrite")
  assert read(os.path.join(workdir, "metrics.jsonl")) == before


@pytest.mark.slow
def test_bad_config_value_exits_2_with_one_line_and_creates_nothing(tmp_path):
  result = launch(
    "--config=configs/quickstart.py", f"--workdir={tmp_path}/w", *QUICK, "--config.sam.rho=-1.0"
  )
  assert_one_line_error(result, "rho=-1.0")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
  "key,value,fragment",
  [
    ("sam.variant", "bsam", "bsam"),
    ("model.name", "resnet9000", "resnet9000"),
    ("batch_size", 63, "batch_size=63"),
    ("dataset.name", "imagenet_nope", "imagenet_nope"),
    ("augment.randaugment.magnitude", 11, "11"),
    ("schedule.name", "wavy", "wavy"),
    ("optimizer.name", "lion9", "lion9"),
    ("dtype", "float8", "float8"),
    ("sam.m", 3, "sam.m=3"),
  ],
)
def test_bad_config_values_raise_user_errors_before_the_workdir_exists(
  tmp_path, key, value, fragment
):
  from jaxsam import errors, train

  config = load_config(os.path.join(ROOT, "configs", "quickstart.py"))
  config.sam.rho = 0.05
  node, *path = [config] + key.split(".")
  for part in path[:-1]:
    node = node[part]
  node[path[-1]] = value
  with pytest.raises(errors.UserError, match=fragment) as info:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert "\n" not in str(info.value)
  assert not os.path.exists(tmp_path / "w")
