"""Time to first step of a launch.py run: cold (an empty XLA compilation cache) against warm.

  python bench/first_step.py [--repeats=3] [--config=configs/quickstart.py]

Each repeat makes a fresh cache folder, runs launch.py once into it (cold: compiles and fills it)
and once more (warm: reads it). A run is timed from starting the process to the first line of
its metrics.jsonl, written with log_every_steps=1 once step 1's metrics are back on the host, so
it covers imports, data loading, model init and the first step's compile and run; the process is
then killed. Cold and warm runs alternate, so both see the same machine load and file caches.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from jaxsam import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_step_seconds(config: str, cache: str, workdir: str, timeout_s: float) -> float:
  """Seconds from launching to the first metrics line; the run is killed right after."""
  metrics = workdir_lib.RunDir(workdir).metrics
  command = [
    sys.executable,
    os.path.join(ROOT, "launch.py"),
    f"--config={config}",
    f"--workdir={workdir}",
    f"--compilation_cache={cache}",
    "--config.log_every_steps=1",
    "--config.progress_bar=False",
    "--config.wandb.mode=disabled",
  ]
  start = time.perf_counter()
  proc = subprocess.Popen(
    command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  try:
    while time.perf_counter() - start < timeout_s:
      if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
        return time.perf_counter() - start
      if proc.poll() is not None:
        raise SystemExit(
          f"error: launch.py exited {proc.returncode} before its first step: "
          f"{(proc.stderr.read().strip().splitlines() or ['no output'])[-1]}"
        )
      time.sleep(0.05)
    raise SystemExit(f"error: no first step within {timeout_s:.0f} s")
  finally:
    proc.kill()
    proc.wait()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--repeats", type=int, default=3, help="cold/warm pairs")
  parser.add_argument("--timeout_s", type=float, default=600.0)
  args = parser.parse_args()
  cold, warm = [], []
  load_before = os.getloadavg()
  for i in range(args.repeats):
    with tempfile.TemporaryDirectory() as tmp:
      cache = os.path.join(tmp, "xla")
      cold.append(first_step_seconds(args.config, cache, os.path.join(tmp, "cold"), args.timeout_s))
      entries = len([f for f in os.listdir(cache) if f.endswith("-cache")])
      warm.append(first_step_seconds(args.config, cache, os.path.join(tmp, "warm"), args.timeout_s))
      print(
        f"pair {i + 1}: cold {cold[-1]:.1f} s ({entries} cache entries written), warm "
        f"{warm[-1]:.1f} s",
        flush=True,
      )
  print(
    f"{args.config}: time to first step, median of {args.repeats}: cold "
    f"{statistics.median(cold):.1f} s, warm {statistics.median(warm):.1f} s "
    f"({', '.join(f'{c:.1f}/{w:.1f}' for c, w in zip(cold, warm))})"
  )
  print(
    "load average (1/5/15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f"
    % (load_before + os.getloadavg())
  )


if __name__ == "__main__":
  main()
