"""A quiet start: the quickstart's captured output begins with jaxsam's own line, holds one line
per epoch and none of TensorFlow's C++ start-up notices or wandb's banner and summary block."""

import os
import platform
import re
import subprocess
import sys

import pytest

from jaxsam import quiet
from support.paths import ROOT
from support.runs import failure

# What TensorFlow 2.21 prints on `import tensorflow` before its logging reads the environment.
ABSL_NOTICE = (
  "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)
ONEDNN_LINE = (
  "I0000 00:00:1796514511.641356    6026 port.cc:153] oneDNN custom operations are on. You may "
  "see slightly different numerical results due to floating-point round-off errors."
)


def _env(tmp_path, **extra) -> dict[str, str]:
  """The environment of a fresh user: no wandb credentials, every wandb folder under tmp."""
  # conftest's TF_ENABLE_ONEDNN_OPTS=0, TF_CPP_MIN_LOG_LEVEL and WANDB_* are not a user's.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TF_"))}
  env.update(
    PYTHONPATH=ROOT,
    NETRC=str(tmp_path / "no_netrc"),
    WANDB_DIR=str(tmp_path),
    WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
    WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
    **extra,
  )
  return env


def test_drop_noise_keeps_every_line_but_the_start_up_notices():
  warning = "W0000 00:00:1796514511.641356    6026 cpu_feature_guard.cc:227] something to see"
  error = "E1205 23:48:35.123456    6026 gpu_device.cc:2] could not load the driver"
  text = f"{ABSL_NOTICE}\n{ONEDNN_LINE}\n{warning}\nplain Python warning\n{error}\n"
  assert quiet.drop_noise(text) == f"{warning}\nplain Python warning\n{error}\n"
  assert quiet.drop_noise("no newline at the end") == "no newline at the end"


def test_filtered_stderr_drops_native_notices_and_replays_the_rest(capfd):
  with quiet.filtered_stderr():
    os.write(2, f"{ABSL_NOTICE}\n{ONEDNN_LINE}\n".encode())  # as C++ writes it: to fd 2
    os.write(2, b"E0000 00:00:1.5    1 x.cc:1] a real error\nplain line\n")
  assert capfd.readouterr().err == "E0000 00:00:1.5    1 x.cc:1] a real error\nplain line\n"
  with pytest.raises(RuntimeError), quiet.filtered_stderr():  # an exception: fd 2 comes back
    os.write(2, b"kept\n")
    raise RuntimeError("boom")
  os.write(2, b"after\n")
  assert capfd.readouterr().err == "kept\nafter\n"


@pytest.mark.slow
def test_quiet_start_silences_tensorflow_import_and_tf_cpp_min_log_level_0_restores_it(tmp_path):
  code = "from jaxsam import quiet; quiet.quiet_start(); import tensorflow as tf; print(tf.ones(2))"
  run = [sys.executable, "-c", code]
  kwargs = {"capture_output": True, "text": True, "cwd": ROOT}
  quiet_run = subprocess.run(run, check=False, env=_env(tmp_path), **kwargs)
  assert quiet_run.returncode == 0 and quiet_run.stderr == "", quiet_run.stderr
  loud = subprocess.run(run, check=False, env=_env(tmp_path, TF_CPP_MIN_LOG_LEVEL="0"), **kwargs)
  assert loud.returncode == 0, failure(loud)
  if platform.machine() in ("x86_64", "AMD64"):  # TF's x86 builds turn oneDNN on and say so
    assert "oneDNN custom operations are on" in loud.stderr, loud.stderr


@pytest.mark.slow
def test_quickstart_output_starts_with_jaxsam_and_has_no_wandb_banner(tmp_path):
  """The README's first command as a new user runs it: wandb auto, no credentials (offline)."""
  workdir = tmp_path / "qs"
  result = subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--config=configs/quickstart.py",
      f"--workdir={workdir}",
      f"--compilation_cache={tmp_path / 'xla'}",
    ],
    env=_env(tmp_path, WANDB_MODE="offline"),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=900,
    check=False,
  )
  output = result.stdout
  assert result.returncode == 0, output[-3000:]
  # tqdm redraws its bar with carriage returns: every \r or \n ends a screen line.
  lines = [line.strip() for line in re.split(r"[\r\n]", output) if line.strip()]
  assert lines[0].startswith("jaxsam: "), lines[:5]
  epochs = [line for line in lines if re.match(r"epoch +\d+ \| step", line)]
  assert len(epochs) == 15, epochs
  assert not [line for line in lines if line.startswith("wandb")], output[-3000:]
  assert not [line for line in lines if "oneDNN" in line or "absl::InitializeLog" in line]
  offline = [line for line in lines if "wandb sync" in line]
  assert len(offline) == 1 and offline[0].startswith("jaxsam: wandb run saved offline in ")
  assert str(workdir / "wandb" / "offline-run-") in offline[0]
  assert lines[-1].startswith("jaxsam: done in ") and "final test accuracy" in lines[-1]


@pytest.mark.slow
def test_analyze_command_line_starts_quietly(tmp_path):
  """`python -m jaxsam.analyze` loads TF and JAX too: its bad-input error is its only line."""
  result = subprocess.run(
    [sys.executable, "-m", "jaxsam.analyze", f"--workdir={tmp_path}"],
    env=_env(tmp_path),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 2, result.stderr
  assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
  assert result.stderr.startswith(f"error: --workdir={tmp_path} has no config.json")
