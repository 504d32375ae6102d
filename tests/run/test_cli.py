"""jaxsam.cli: every command ends the same way on bad input (one line, exit 2) and on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import pytest

from jaxsam import cli, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_error_is_one_line_on_stderr_and_exit_code_2(capsys):
  @cli.entry
  def main(argv):
    raise errors.ConfigError(f"--size={argv[0]!r} is unknown; known: tiny, small")

  assert main(["huge"]) == 2
  err = capsys.readouterr().err
  assert err == "error: --size='huge' is unknown; known: tiny, small\n"


def test_return_code_passes_through_and_none_is_success():
  assert cli.entry(lambda: None)() == 0
  assert cli.entry(lambda: 3)() == 3


def test_a_bug_is_not_swallowed():
  @cli.entry
  def main():
    raise KeyError("a bug, not bad input")

  with pytest.raises(KeyError):
    main()


def test_ctrl_c_is_exit_130_without_a_traceback():
  # A real SIGINT delivered to a running command (study --dry_run would finish too fast: the
  # command here waits on stdin inside a cli.entry main, as a long run would be busy).
  code = (
    "import sys\n"
    "from jaxsam import cli\n"
    "@cli.entry\n"
    "def main():\n"
    "  print('ready', flush=True)\n"
    "  sys.stdin.read()\n"
    "sys.exit(main())\n"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code],
    cwd=ROOT,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline() == "ready\n"
  time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 130
  assert err == "interrupted\n"


@pytest.mark.parametrize(
  "argv, message",
  [
    (["jaxsam.report", "/nonexistent/run"], "/nonexistent/run"),
    (["jaxsam.landscape_plots", "--runs=a,b", "--labels=x", "--out=o.png"], "1 labels for 2 runs"),
  ],
)
def test_python_m_commands_share_the_handler(argv, message, tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", *argv],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
  assert message in result.stderr
