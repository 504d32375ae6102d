"""The study's report: `python -m jaxsam.report RUN_DIR... [--output=report_curves.png]`.

Prints Markdown: the augmentation x optimizer table of best / final test accuracy (the original
report's table, rows and columns read from each run's config.json), then one row per run with the
settings that differ between the runs (and the Hessian's top eigenvalue when the run has been
analysed); writes the runs' learning curves in one PNG. Run folders are read by
`jaxsam.workdir.read_run`.
"""

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from jaxsam import cli, plots
from jaxsam import workdir as workdir_lib

AUGMENT_ORDER = ("none", "flip", "crop", "crop-flip", "cutout", "randaugment", "autoaugment")
# Flattened config keys never worth a column: bookkeeping, not experimental settings.
IGNORED_KEYS = (
  "wandb.",
  "progress_bar",
  "log_every_steps",
  "checkpoint_",
  "dataset.data_dir",
  "dataset.download",
  "dataset.path",
  "dataset.cache_dir",
)
# Shown as their own columns when a run uses them.
DATA_COLUMNS = ("dataset.label_noise", "dataset.train_examples")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def augmentation_label(config: dict) -> str:
  """cutout / randaugment / autoaugment / crop-flip (joined by '+' when several are on); the
  geometric base alone is crop-flip, flip (no random crop), crop (no flip) or none."""
  aug = config.get("augment", {})
  crop, flip = aug.get("crop_padding", 4), aug.get("flip", True)
  base = {
    (True, True): "crop-flip",
    (False, True): "flip",
    (True, False): "crop",
    (False, False): "none",
  }[(bool(crop), bool(flip))]
  parts = []
  if aug.get("autoaugment"):
    parts.append("autoaugment")
  if aug.get("randaugment", {}).get("num_ops", 0):
    parts.append("randaugment")
  if aug.get("cutout_size", 0):
    parts.append("cutout")
  return "+".join(parts) or base


def optimizer_label(config: dict) -> str:
  """SGD (SGD(BN per 16) with ghost batch norm), or SAM(ρ=0.05) / SAM(ρ=0.05, m=16) /
  LOOKSAM(ρ=..., every 5) / SAM(ρ=..., from 80%)... (prefixed by a non-SGD base optimizer)."""
  name = config.get("optimizer", {}).get("name", "sgd")
  base = {"sgd": "SGD", "adamw": "AdamW"}.get(name, name)
  sam = config.get("sam", {})
  if not sam.get("rho"):
    ghost = config.get("model", {}).get("ghost_batch_size", 0)  # batch norm per group, no ascent
    return f"{base}(BN per {ghost})" if ghost else base
  extras = [f"ρ={sam['rho']:g}"]
  if sam.get("m") and sam.get("variant", "sam") != "msam":
    extras.append(f"m={sam['m']}")
  if sam.get("every", 1) > 1:
    extras.append(f"every {sam['every']}")
  if sam.get("start_fraction", 0):
    extras.append(f"from {100 * sam['start_fraction']:g}%")
  label = f"{sam.get('variant', 'sam').upper()}({', '.join(extras)})"
  return label if name == "sgd" else f"{base}+{label}"


def load_run(run_dir: str) -> dict[str, Any]:
  """A run's config, metrics, best/final test accuracy and (if analysed) λ_max."""
  run = workdir_lib.read_run(run_dir)
  config, records, summary = run.config, run.records, run.summary
  accuracies = [
    r["test/accuracy"]
    for r in records
    if isinstance(r.get("test/accuracy"), float) and math.isfinite(r["test/accuracy"])
  ]
  epochs = [r["epoch"] for r in records if "test/accuracy" in r]
  dataset = config.get("dataset", {})
  lambda_max = ((run.analysis or {}).get("hessian") or {}).get("lambda_max")
  return {
    "dir": run_dir,
    "config": config,
    "records": records,
    "augmentation": augmentation_label(config),
    "optimizer": optimizer_label(config),
    "best": max(accuracies) if accuracies else None,
    "final": accuracies[-1] if accuracies else None,
    "epochs": epochs[-1] if epochs else 0,
    "planned_epochs": config.get("num_epochs"),
    "lambda_max": lambda_max,
    "label_noise": dataset.get("label_noise", 0.0),
    "train_examples": dataset.get("train_examples", 0),  # the subset asked for; 0 = all
    "num_train": summary.get("train_examples"),  # the examples the run trained on
    "wall_time_s": summary.get("wall_time_s"),
    "sam_fraction": summary.get("sam_fraction"),
    "sam_m": summary.get("sam_m"),  # examples per ascent group the run used (0: no ascent)
    "train_fit": summary.get("final_train_accuracy"),  # on the labels trained on, at the end
    "train_fit_noisy": summary.get("final_train_accuracy_noisy"),  # relabelled examples only
    "seed": config.get("seed"),
  }


def differing_settings(runs: Sequence[dict]) -> list[str]:
  """Config keys whose values are not the same in every run (bookkeeping keys left out)."""
  flat = [flatten(r["config"]) for r in runs]
  keys = sorted(set().union(*flat))
  return [
    k
    for k in keys
    if not k.startswith(IGNORED_KEYS)
    and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
  ]


def _pct(x: float | None) -> str:
  return "–" if x is None else f"{100 * x:.2f}"


def _order(values, preferred) -> list[str]:
  return sorted(
    set(values), key=lambda v: (preferred.index(v) if v in preferred else len(preferred), v)
  )


def markdown(runs: Sequence[dict], cross_table: bool = True) -> str:
  """The two tables: augmentation x optimizer (best / final %), and one row per run
  (the runs' table alone when not `cross_table`)."""
  augs = _order([r["augmentation"] for r in runs], AUGMENT_ORDER)
  opts = _order([r["optimizer"] for r in runs], ("SGD",))
  lines = [
    "Test accuracy (%), best / final:",
    "",
    "| augmentation | " + " | ".join(opts) + " |",
    "|---|" + "---|" * len(opts),
  ]
  for aug in augs:
    cells = []
    for opt in opts:
      here = [
        (i, r) for i, r in enumerate(runs, 1) if r["augmentation"] == aug and r["optimizer"] == opt
      ]
      tag = len(here) > 1  # several runs share a cell: name them by their row below
      cells.append(
        "<br>".join(f"{_pct(r['best'])} / {_pct(r['final'])}" + (f" (#{i})" * tag) for i, r in here)
        or ""
      )
    lines.append(f"| {aug} | " + " | ".join(cells) + " |")
  diff = [k for k in differing_settings(runs) if k not in DATA_COLUMNS]
  show_data = any(r["label_noise"] or r["train_examples"] for r in runs)
  show_lambda = any(r["lambda_max"] is not None for r in runs)
  header = ["#", "run", "augmentation", "optimizer", *diff]
  header += ["label noise", "train examples"] * show_data
  header += ["epochs", "best %", "final %"] + ["λ_max"] * show_lambda
  lines = lines if cross_table else []
  extra = m_columns(runs)
  header += [name for name, _ in extra]
  lines += [
    *[""] * cross_table,
    "Runs" + (" (settings that differ between them)" if diff else "") + ":",
    "",
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
  ]
  for i, r in enumerate(runs, 1):
    flat = flatten(r["config"])
    epochs = f"{r['epochs']:g}/{r['planned_epochs']}" if r["planned_epochs"] else f"{r['epochs']:g}"
    row = [
      str(i),
      os.path.basename(os.path.normpath(r["dir"])),
      r["augmentation"],
      r["optimizer"],
      *(
        json.dumps(flat.get(k)) if isinstance(flat.get(k), str) else str(flat.get(k)) for k in diff
      ),
    ]
    row += [f"{r['label_noise']:g}", str(r["train_examples"] or "all")] * show_data
    row += [epochs, _pct(r["best"]), _pct(r["final"])]
    if show_lambda:
      row.append("–" if r["lambda_max"] is None else f"{r['lambda_max']:.4g}")
    row += [cell([r]).replace(" ± 0.00", "") for _, cell in extra]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


# Keys that tell the seeds of one setting apart; everything else must agree within a group.
SEED_KEYS = ("seed",)


def group_by_setting(runs: Sequence[dict]) -> dict[str, list[dict]]:
  """Runs that differ only in their seed (and bookkeeping), under a label naming the setting."""
  groups: dict[str, list[dict]] = {}
  keys: dict[str, str] = {}
  for r in runs:
    flat = {
      k: v
      for k, v in flatten(r["config"]).items()
      if k not in SEED_KEYS and not k.startswith(IGNORED_KEYS)
    }
    key = json.dumps(flat, sort_keys=True)
    if key not in keys:
      label = f"{r['optimizer']} {r['planned_epochs']} ep"
      if r["label_noise"]:
        label += f", noise {r['label_noise']:g}"
      keys[key] = label if label not in keys.values() else f"{label} ({len(keys) + 1})"
    groups.setdefault(keys[key], []).append(r)
  return groups


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
  """Mean and sample standard deviation (ddof 1; 0 for one value) of the values that exist."""
  xs = [v for v in values if v is not None]
  if not xs:
    return None, None, 0
  mean = sum(xs) / len(xs)
  var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
  return mean, math.sqrt(var), len(xs)


def _pct_pm(values: Sequence[float | None]) -> str:
  mean, std, n = mean_std(values)
  return "–" if n == 0 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def passes_per_step(config: dict, sam_fraction: float | None = None) -> float:
  """Forward-backward passes of one step, on average: 1 for the base optimizer and for MSAM,
  1 + the fraction of SAM steps for SAM and its periodic/adaptive variants (2 when every step)."""
  sam = config.get("sam", {})
  if not sam.get("rho"):
    return 1
  if sam.get("variant") == "msam":
    return 1
  return 1 + (1.0 if sam_fraction is None else sam_fraction)


def seed_table(runs: Sequence[dict]) -> str:
  """One row per setting: test accuracy mean ± std over its seeds, the seeds, cost and wall time.

  Cost is epochs x passes per step, in SGD-epochs: equal cost means equal compute.
  """
  header = (
    "| setting | label noise | train examples | cost (SGD epochs) | seeds | best % | "
    "final % | wall s / run |"
  )
  extra = m_columns(runs)
  header += "".join(f" {name} |" for name, _ in extra)
  lines = [header, "|" + "---|" * (8 + len(extra))]
  for label, group in group_by_setting(runs).items():
    first = group[0]
    fraction, _, _ = mean_std([r.get("sam_fraction") for r in group])
    cost = (first["planned_epochs"] or 0) * passes_per_step(first["config"], fraction)
    wall, _, _ = mean_std([r["wall_time_s"] for r in group])
    seeds = ",".join(str(r["seed"]) for r in group)
    lines.append(
      f"| {label} | {first['label_noise']:g} | {first['train_examples'] or 'all'} | "
      f"{cost:.3g} | {seeds} | {_pct_pm([r['best'] for r in group])} | "
      f"{_pct_pm([r['final'] for r in group])} | "
      f"{'–' if wall is None else f'{wall:.0f}'} |"
      + "".join(f" {cell(group)} |" for _, cell in extra)
    )
  return "\n".join(lines)


def _m_cell(runs: Sequence[dict]) -> str:
  values = sorted({r["sam_m"] for r in runs if r.get("sam_m") is not None})
  return ",".join(str(v) if v else "–" for v in values) or "?"


def m_columns(runs: Sequence[dict]) -> list[tuple[str, Any]]:
  """(header, cell of a group of runs) of the columns shown when the runs' summaries have them:
  SAM's ascent group size m (– for no ascent), and the fit of the train labels at the end (all,
  and the relabelled ones: how much of the label noise the model memorised)."""
  columns = []
  if any(r.get("sam_m") for r in runs):
    columns.append(("m", _m_cell))
  if any(r.get("train_fit") is not None for r in runs):
    columns.append(("train acc, given labels %", lambda g: _pct_pm([r["train_fit"] for r in g])))
  if any(r.get("train_fit_noisy") is not None for r in runs):
    columns.append(("noise memorised %", lambda g: _pct_pm([r.get("train_fit_noisy") for r in g])))
  return columns


def write_seed_curves(runs: Sequence[dict], path: str) -> str:
  """Test accuracy against epoch, mean ± std over each setting's seeds, one line per setting."""
  groups = {label: [r["records"] for r in group] for label, group in group_by_setting(runs).items()}
  return plots.write_mean_test_curves(groups, path, title="test accuracy, mean ± std over seeds")


def write_report_curves(runs: Sequence[dict], path: str) -> str:
  labelled = {
    f"#{i} {r['augmentation']} {r['optimizer']}": r["records"] for i, r in enumerate(runs, 1)
  }
  return plots.write_curves(labelled, path, title="test (dashed) and train (solid)")


@cli.entry
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m jaxsam.report", description=__doc__.split("\n")[0]
  )
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="launch.py workdirs")
  parser.add_argument(
    "--output", default="report_curves.png", help="combined curves PNG (default: report_curves.png)"
  )
  args = parser.parse_args(argv)
  runs = [load_run(d) for d in args.run_dirs]
  if any(len(g) > 1 for g in group_by_setting(runs).values()):
    print("Test accuracy (%), mean ± std over seeds:\n\n" + seed_table(runs) + "\n")
  print(markdown(runs))
  print(f"\ncurves: {write_report_curves(runs, args.output)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
