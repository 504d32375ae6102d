"""Command line: `python launch.py --config=configs/quickstart.py [--workdir=DIR] [--config.KEY=V]`.

Thin by design: parses flags, then calls `jaxsam.train.train_and_evaluate` (or the eval mode).
Bad input (unknown key, wrong type, missing file, bad workdir...) prints one line and exits 2.
"""

import datetime
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxsam import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file (configs/*.py); override keys with --config.KEY=V.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run folder (default runs/<config-name>-<UTC timestamp>); rerun to resume."
)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train, or eval a saved model.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "eval: checkpoint folder (default latest).")
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "Start afresh in a workdir that holds a run (of any config): its files "
  "(jaxsam.workdir.CLEARED: config, metrics, checkpoints, eval.json, analysis/...) go first.",
)
# Multi-process runs (jaxsam.distributed); under SLURM all three are read from the job.
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "Multi-process: host:port of process 0 (same on every process)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process, 0..N-1.")
_DIST_TIMEOUT = flags.DEFINE_integer(
  "distributed_timeout_s", 300, "Multi-process: seconds to wait for the coordinator and peers."
)
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  None,
  "Persistent XLA compilation cache folder, so a rerun or resume "
  "does not compile again ('' = off; default $JAX_COMPILATION_CACHE_DIR, else "
  "~/.cache/jaxsam/xla).",
)
_PROFILE_STEPS = flags.DEFINE_string(
  "profile_steps",
  None,
  "START:END: a jax.profiler trace of train steps START to END - 1 in "
  "<workdir>/profile/process_<N>/ (one folder per process), for TensorBoard or ui.perfetto.dev.",
)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, but a bad flag is one line and exit code 2 (absl's default prints usage, 1)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports an unknown --config.KEY as AttributeError/KeyError, a wrong type as
    # TypeError/ValueError: all are the user's flags, none deserves a traceback.
    message = " ".join(re.sub(r"[\\'\"]+", "", str(e).replace("\\n", " ")).split())
    kind = "unknown config key" if isinstance(e, (AttributeError, KeyError)) else "bad flag"
    cli.fail(f"{kind}: {message or type(e).__name__}")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{name}-{stamp}")


@cli.entry
def main(argv: list[str]) -> None:
  # orbax logs every save step at INFO; jaxsam's own per-epoch lines are the run's log.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; flags look like --config.KEY=VALUE")
  if _CONFIG.value is None and _MODE.value == "train":
    cli.fail("--config is required, e.g. --config=configs/quickstart.py")
  if _MODE.value == "eval" and not _WORKDIR.value:
    cli.fail(
      "--mode=eval needs --workdir=DIR (a training run's folder; its config.json is used "
      "unless --config is given)"
    )
  # --mode=eval may go without --config (then the workdir's config.json is used).
  config_file = (
    flags.FLAGS["config"].config_filename.split(":")[0] if _CONFIG.value is not None else None
  )
  if config_file is not None and not os.path.isfile(config_file):
    cli.fail(
      f"--config={config_file} does not exist; give a config file such as configs/quickstart.py"
    )
  from jaxsam import profiling  # light: imports no JAX

  profile_steps = profiling.parse_steps(_PROFILE_STEPS.value)
  # Imported here so that `--help` and flag errors stay fast and never touch JAX or TF.
  if not flags.FLAGS["verbosity"].present:
    from jaxsam import quiet

    quiet.quiet_start()  # TF/XLA's C++ start-up logs off; --verbosity keeps them (debugging)
  from jaxsam import compile_cache

  warning = compile_cache.enable(compile_cache.resolve(_COMPILATION_CACHE.value, os.environ))
  if warning:  # a run without the cache is slower to start, not wrong
    print(f"warning: {warning}", file=sys.stderr)
  from jaxsam import distributed

  # Before anything touches a JAX backend; the environment tells SLURM jobs apart.
  distributed.initialize(
    distributed.resolve(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, env=os.environ
    ),
    timeout_s=_DIST_TIMEOUT.value,
  )
  from jaxsam import parallel, train

  if _WORKDIR.value is None and not parallel.is_single_process():
    cli.fail("a multi-process run needs --workdir=DIR, one folder that every process can reach")

  workdir = _WORKDIR.value or default_workdir(config_file)
  if _MODE.value == "eval" and not os.path.isdir(workdir):
    cli.fail(f"--workdir={workdir} is not a folder; give a training run's folder")
  try:
    if _MODE.value == "train":
      summary = train.train_and_evaluate(
        _CONFIG.value, workdir, overwrite=_OVERWRITE.value, profile_steps=profile_steps
      )
      if (
        summary["completed"]
        and summary["final_test_accuracy"] is not None
        and parallel.is_main_process()
      ):
        print(
          f"jaxsam: done in {summary['wall_time_s']:.0f}s: final test accuracy "
          f"{100 * summary['final_test_accuracy']:.2f}% (best "
          f"{100 * summary['best_test_accuracy']:.2f}%), workdir {workdir}"
        )
    else:
      from jaxsam import evaluate

      evaluate.evaluate_checkpoint(_CONFIG.value, workdir, checkpoint=_CHECKPOINT.value)
  except train.TrainingError as e:
    cli.fail(str(e), code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
