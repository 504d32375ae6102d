"""jaxsam.compile_cache and launch.py's --compilation_cache: on by default, off with '', warns."""

import os
import subprocess
import sys

import pytest

from jaxsam import compile_cache
from support.paths import ROOT
from support.runs import failure

TINY = [
  "--config=configs/quickstart.py",
  "--config.num_epochs=1",
  "--config.max_steps=2",
  "--config.model.image_size=8",
  "--config.progress_bar=False",
  "--config.wandb.mode=disabled",
]


def launch(workdir, *args, env=None):
  env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV} | (env or {})
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch.py"), *TINY, f"--workdir={workdir}", *args],
    cwd=ROOT,
    check=False,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )


def test_flag_then_environment_then_the_user_cache_folder():
  env = {compile_cache.ENV: "/env/xla"}
  assert compile_cache.resolve("/flag/xla", env) == "/flag/xla"
  assert compile_cache.resolve("", env) == ""  # off, even when the environment names a folder
  assert compile_cache.resolve(None, env) == "/env/xla"
  assert compile_cache.resolve(None, {}) == os.path.expanduser("~/.cache/jaxsam/xla")
  # $JAXSAM_CACHE moves the default (JAX's own variable still wins over it).
  assert compile_cache.resolve(None, {"JAXSAM_CACHE": "/scratch/js"}) == "/scratch/js/xla"
  assert compile_cache.resolve(None, {**env, "JAXSAM_CACHE": "/scratch/js"}) == "/env/xla"
  assert compile_cache.resolve("~/x", {}) == os.path.expanduser("~/x")


def test_unwritable_reason(tmp_path):
  assert compile_cache.unwritable_reason(str(tmp_path / "new" / "xla")) is None
  assert os.path.isdir(tmp_path / "new" / "xla")  # created
  (tmp_path / "file").write_text("")
  reason = compile_cache.unwritable_reason(str(tmp_path / "file" / "xla"))
  assert reason and "Error" in reason


@pytest.mark.slow  # a launch.py run
def test_launch_writes_entries_to_the_environments_folder(tmp_path):
  cache = tmp_path / "xla"
  result = launch(tmp_path / "run", env={compile_cache.ENV: str(cache)})
  assert result.returncode == 0, failure(result)
  assert compile_cache.entries(str(cache)), os.listdir(cache)  # at least the train step


@pytest.mark.slow  # a launch.py run
def test_empty_flag_turns_the_cache_off(tmp_path):
  cache = tmp_path / "xla"
  result = launch(tmp_path / "run", "--compilation_cache=", env={compile_cache.ENV: str(cache)})
  assert result.returncode == 0, failure(result)
  assert not compile_cache.entries(str(cache))


@pytest.mark.slow  # a launch.py run
def test_unwritable_folder_is_a_one_line_warning_and_the_run_goes_on(tmp_path):
  (tmp_path / "file").write_text("")
  result = launch(tmp_path / "run", f"--compilation_cache={tmp_path / 'file' / 'xla'}")
  assert result.returncode == 0, failure(result)
  warnings = [line for line in result.stderr.splitlines() if "compilation cache" in line]
  assert len(warnings) == 1 and warnings[0].startswith("warning: compilation cache "), warnings
  assert "not writable" in warnings[0]
  assert os.path.isfile(tmp_path / "run" / "summary.json")
