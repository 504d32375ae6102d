"""The study's report: `python -m jaxsam.report RUN_DIR... [--output=report_curves.png]`.

Prints Markdown: the augmentation x optimizer table of best / final test accuracy (the original
report's table, rows and columns read from each run's config.json), then one row per run with the
settings that differ between the runs (and the Hessian's top eigenvalue when `analysis/
analysis.json` has one); writes the runs' learning curves in one PNG.
"""

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from jaxsam import errors, plots, writers

ANALYSIS_FILE = os.path.join("analysis", "analysis.json")
AUGMENT_ORDER = ("crop-flip", "cutout", "randaugment", "autoaugment")
# Flattened config keys never worth a column: bookkeeping, not experimental settings.
IGNORED_KEYS = ("wandb.", "progress_bar", "log_every_steps", "checkpoint_", "dataset.data_dir",
                "dataset.download", "dataset.path")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def augmentation_label(config: dict) -> str:
  """cutout / randaugment / autoaugment / crop-flip (joined by '+' when several are on)."""
  aug = config.get("augment", {})
  parts = []
  if aug.get("autoaugment"):
    parts.append("autoaugment")
  if aug.get("randaugment", {}).get("num_ops", 0):
    parts.append("randaugment")
  if aug.get("cutout_size", 0):
    parts.append("cutout")
  return "+".join(parts) or "crop-flip"


def optimizer_label(config: dict) -> str:
  """SGD, or SAM(ρ=0.05) / ASAM(ρ=...) / GSAM(ρ=...) (prefixed by a non-SGD base optimizer)."""
  name = config.get("optimizer", {}).get("name", "sgd")
  base = {"sgd": "SGD", "adamw": "AdamW"}.get(name, name)
  sam = config.get("sam", {})
  if not sam.get("rho"):
    return base
  label = f"{sam.get('variant', 'sam').upper()}(ρ={sam['rho']:g})"
  return label if name == "sgd" else f"{base}+{label}"


def load_run(run_dir: str) -> dict[str, Any]:
  """A run's config, metrics, best/final test accuracy and (if analysed) λ_max."""
  config_path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(config_path):
    raise errors.ConfigError(f"{run_dir} is not a run folder (no config.json); give workdirs of "
                             "launch.py runs")
  with open(config_path) as f:
    config = json.load(f)
  records = writers.read_metrics(os.path.join(run_dir, writers.METRICS_FILE))
  accuracies = [r["test/accuracy"] for r in records
                if isinstance(r.get("test/accuracy"), float) and math.isfinite(r["test/accuracy"])]
  epochs = [r["epoch"] for r in records if "test/accuracy" in r]
  lambda_max = None
  analysis_path = os.path.join(run_dir, ANALYSIS_FILE)
  if os.path.isfile(analysis_path):
    with open(analysis_path) as f:
      lambda_max = (json.load(f).get("hessian") or {}).get("lambda_max")
  return {
      "dir": run_dir, "config": config, "records": records,
      "augmentation": augmentation_label(config), "optimizer": optimizer_label(config),
      "best": max(accuracies) if accuracies else None,
      "final": accuracies[-1] if accuracies else None,
      "epochs": epochs[-1] if epochs else 0,
      "planned_epochs": config.get("num_epochs"),
      "lambda_max": lambda_max,
  }


def differing_settings(runs: Sequence[dict]) -> list[str]:
  """Config keys whose values are not the same in every run (bookkeeping keys left out)."""
  flat = [flatten(r["config"]) for r in runs]
  keys = sorted(set().union(*flat))
  return [k for k in keys if not k.startswith(IGNORED_KEYS)
          and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def _pct(x: float | None) -> str:
  return "–" if x is None else f"{100 * x:.2f}"


def _order(values, preferred) -> list[str]:
  return sorted(set(values), key=lambda v: (preferred.index(v) if v in preferred else
                                            len(preferred), v))


def markdown(runs: Sequence[dict]) -> str:
  """The two tables: augmentation x optimizer (best / final %), and one row per run."""
  augs = _order([r["augmentation"] for r in runs], AUGMENT_ORDER)
  opts = _order([r["optimizer"] for r in runs], ("SGD",))
  lines = ["Test accuracy (%), best / final:", "",
           "| augmentation | " + " | ".join(opts) + " |",
           "|---|" + "---|" * len(opts)]
  for aug in augs:
    cells = []
    for opt in opts:
      here = [(i, r) for i, r in enumerate(runs, 1)
              if r["augmentation"] == aug and r["optimizer"] == opt]
      tag = len(here) > 1  # several runs share a cell: name them by their row below
      cells.append("<br>".join(f"{_pct(r['best'])} / {_pct(r['final'])}" + (f" (#{i})" * tag)
                               for i, r in here) or "")
    lines.append(f"| {aug} | " + " | ".join(cells) + " |")
  diff = [k for k in differing_settings(runs)]
  show_lambda = any(r["lambda_max"] is not None for r in runs)
  header = ["#", "run", "augmentation", "optimizer", *diff, "epochs", "best %", "final %"]
  header += ["λ_max"] * show_lambda
  lines += ["", "Runs" + (" (settings that differ between them)" if diff else "") + ":", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, r in enumerate(runs, 1):
    flat = flatten(r["config"])
    epochs = f"{r['epochs']:g}/{r['planned_epochs']}" if r["planned_epochs"] else f"{r['epochs']:g}"
    row = [str(i), os.path.basename(os.path.normpath(r["dir"])), r["augmentation"],
           r["optimizer"], *(json.dumps(flat.get(k)) if isinstance(flat.get(k), str) else
                             str(flat.get(k)) for k in diff),
           epochs, _pct(r["best"]), _pct(r["final"])]
    if show_lambda:
      row.append("–" if r["lambda_max"] is None else f"{r['lambda_max']:.4g}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def write_report_curves(runs: Sequence[dict], path: str) -> str:
  labelled = {f"#{i} {r['augmentation']} {r['optimizer']}": r["records"]
              for i, r in enumerate(runs, 1)}
  return plots.write_curves(labelled, path, title="test (dashed) and train (solid)")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxsam.report", description=__doc__.split(
      "\n")[0])
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="launch.py workdirs")
  parser.add_argument("--output", default="report_curves.png",
                      help="combined curves PNG (default: report_curves.png)")
  args = parser.parse_args(argv)
  try:
    runs = [load_run(d) for d in args.run_dirs]
    print(markdown(runs))
    print(f"\ncurves: {write_report_curves(runs, args.output)}")
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
