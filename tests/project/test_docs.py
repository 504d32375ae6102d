"""The docs run as written: no command or path in a tracked Markdown file points into one machine's
own folders (a reader's checkout has none of them); paths are relative to the repository or
placeholders such as `RUNS/`."""

import os
import re
import subprocess

import pytest

from support.paths import ROOT

# An absolute path under a usual machine root, not part of a URL or a longer path.
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|home|root|Users|tmp|mnt|scratch)(?![\w-])")


def tracked_markdown() -> list[str]:
  try:
    out = subprocess.run(
      ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"not a git checkout ({e})")
  return out.split()


def test_machine_path_pattern():
  assert MACHINE_PATH.search("--data=/work/shared/data/x.tar.gz")
  assert MACHINE_PATH.search("`tensorboard --logdir /tmp/run`")
  assert MACHINE_PATH.search("see /home/me/runs")
  for fine in (
    "--data=../shared/data/cifar10-jpeg.tar.gz",
    "https://example.com/home/page",
    "~/.cache/jaxsam/xla",
    "runs/qs/tmp/x",
    "<workdir>/profile/process_0",
  ):
    assert not MACHINE_PATH.search(fine), fine


def test_tracked_docs_hold_no_absolute_machine_paths():
  files = tracked_markdown()
  assert "README.md" in files
  found = []
  for name in files:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if MACHINE_PATH.search(line):
          found.append(f"{name}:{number}: {line.strip()[:160]}")
  assert not found, "absolute paths of one machine in the docs:\n" + "\n".join(found)
