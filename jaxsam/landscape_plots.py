"""Pictures of `jaxsam.analyze` results: 1-D and 2-D loss landscapes, and runs side by side.

Matplotlib's object API on the Agg canvas (no pyplot state, no display), as `jaxsam.plots`.

  python -m jaxsam.landscape_plots --runs=runs/sgd,runs/sam --labels=SGD,SAM --out=compare.png

draws the runs' 1-D landscapes in one panel with their Hessian lambda_max and trace beside.
"""

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxsam import cli, errors
from jaxsam import workdir as workdir_lib

LINE_FILE = "landscape_1d.png"
CONTOUR_FILE = "landscape_2d.png"


def _save(fig: Figure, path: str) -> str:
  FigureCanvasAgg(fig)
  fig.savefig(path + ".tmp.png", dpi=120, bbox_inches="tight")
  os.replace(path + ".tmp.png", path)
  return path


def _floats(values) -> np.ndarray:
  """Numbers as read from analysis.json, where null stands for a non-finite value: NaN."""
  return np.array(values, np.float64)  # None -> NaN


def line_figure(line: Mapping[str, Sequence[float]], title: str = "") -> Figure:
  """Train loss (left axis) and accuracy (right axis) along one direction."""
  fig = Figure(figsize=(5.5, 3.8), layout="constrained")
  ax = fig.add_subplot()
  x = _floats(line["x"])
  ax.plot(x, _floats(line["loss"]), color="tab:blue", marker=".", label="train loss")
  ax.set_xlabel("step along a filter-normalised direction")
  ax.set_ylabel("train loss", color="tab:blue")
  acc = ax.twinx()
  acc.plot(x, 100 * _floats(line["accuracy"]), color="tab:orange", ls="--", label="train accuracy")
  acc.set_ylabel("train accuracy (%)", color="tab:orange")
  ax.axvline(0.0, color="grey", lw=0.5)
  ax.set_title(title or "1-D loss landscape")
  return fig


def contour_figure(surface: Mapping[str, Any], title: str = "") -> Figure:
  """Filled contours of train loss and accuracy on the 2-D grid; the checkpoint at the origin."""
  fig = Figure(figsize=(10, 4.2), layout="constrained")
  x, y = _floats(surface["x"]), _floats(surface["y"])
  # log10 of the loss: it grows by orders of magnitude towards the edges and linear contours
  # would spend every level there, leaving the basin around the checkpoint one flat colour.
  panels = (
    ("loss", "log10 train loss", "viridis", lambda z: np.log10(np.maximum(z, 1e-12))),
    ("accuracy", "train accuracy (%)", "magma", lambda z: 100 * z),
  )
  for i, (key, label, cmap, transform) in enumerate(panels):
    ax = fig.add_subplot(1, 2, i + 1)
    z = transform(_floats(surface[key]).T)  # [x, y] -> rows are y for contourf
    filled = ax.contourf(x, y, z, levels=20, cmap=cmap)
    ax.contour(x, y, z, levels=10, colors="white", linewidths=0.4)
    fig.colorbar(filled, ax=ax, label=label)
    ax.plot([0], [0], marker="+", color="red", ms=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_aspect("equal")
    ax.set_title(label)
  fig.suptitle(title or "2-D loss landscape")
  return fig


def write_landscape_plots(
  landscape: Mapping[str, Any], out_dir: str, title: str = ""
) -> dict[str, str]:
  """Writes the 1-D line plot and the 2-D contour plot; returns {"landscape_1d": path, ...}."""
  return {
    "landscape_1d": _save(line_figure(landscape["1d"], title), os.path.join(out_dir, LINE_FILE)),
    "landscape_2d": _save(
      contour_figure(landscape["2d"], title), os.path.join(out_dir, CONTOUR_FILE)
    ),
  }


def comparison_figure(analyses: Mapping[str, Mapping[str, Any]], title: str = "") -> Figure:
  """Runs side by side: 1-D train-loss landscapes in one panel, lambda_max and trace in two more."""
  fig = Figure(figsize=(13, 4), layout="constrained")
  ax = fig.add_subplot(1, 3, 1)
  labels = list(analyses)
  colors = [f"C{i}" for i in range(len(labels))]
  for label, color in zip(labels, colors):
    line = analyses[label]["landscape"]["1d"]
    ax.plot(_floats(line["x"]), _floats(line["loss"]), color=color, marker=".", label=label)
  ax.set_xlabel("step along a filter-normalised direction")
  ax.set_yscale("log")  # the walls rise by orders of magnitude; the basin needs the resolution
  ax.set_ylabel("train loss (log scale)")
  ax.set_title("1-D loss landscape")
  ax.legend()
  for i, (key, err, name) in enumerate(
    (("lambda_max", None, "Hessian $\\lambda_{max}$"), ("trace", "trace_stderr", "Hessian trace"))
  ):
    bar = fig.add_subplot(1, 3, i + 2)
    values = _floats([analyses[lb]["hessian"][key] for lb in labels])
    errs = _floats([analyses[lb]["hessian"][err] for lb in labels]) if err else None
    bar.bar(labels, values, yerr=errs, color=colors, capsize=4)
    for j, v in enumerate(values):
      top = v + (errs[j] if errs is not None else 0.0)
      bar.annotate(
        f"{v:.3g}", (j, top), ha="center", va="bottom", xytext=(0, 3), textcoords="offset points"
      )
    bar.set_title(name + (" (Hutchinson, $\\pm$1 s.e.)" if err else ""))
  if title:
    fig.suptitle(title)
  return fig


@cli.entry
def main(argv: Sequence[str] | None = None) -> int:
  """`--runs=A,B --labels=a,b --out=PNG`: compare the analysis.json of several runs."""
  p = argparse.ArgumentParser(prog="python -m jaxsam.landscape_plots")
  p.add_argument("--runs", required=True, help="comma list of run folders holding analysis/")
  p.add_argument("--labels", default="", help="comma list of labels (default: folder names)")
  p.add_argument("--out", required=True, help="PNG path")
  p.add_argument("--title", default="")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  runs = [r for r in args.runs.split(",") if r]
  labels = [lb for lb in args.labels.split(",") if lb] or [
    os.path.basename(os.path.normpath(r)) for r in runs
  ]
  if len(labels) != len(runs):
    raise errors.ConfigError(f"{len(labels)} labels for {len(runs)} runs")
  analyses = {}
  for label, run in zip(labels, runs):
    path = workdir_lib.RunDir(run).analysis
    analyses[label] = workdir_lib.read_analysis(run)
    if analyses[label] is None:
      raise errors.DataError(
        f"{path} does not exist; run python -m jaxsam.analyze --workdir={run} first"
      )
    if "hessian" not in analyses[label] or "landscape" not in analyses[label]:
      raise errors.DataError(
        f"{path} lacks hessian or landscape; analyse with --what=hessian,landscape"
      )
  _save(comparison_figure(analyses, args.title), args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
