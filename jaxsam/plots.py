"""Learning curves from metrics.jsonl records: train/test loss and accuracy against epoch.

`write_curves` draws one run (the workdir's `curves.png`, refreshed at every eval) or several
(`jaxsam.report`'s combined figure). Matplotlib's object API with the Agg canvas: no pyplot
global state and no display needed.
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
  """(epochs, values) of the records holding a finite number under `key`."""
  xs, ys = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and math.isfinite(v):
      xs.append(float(r["epoch"]))
      ys.append(float(v))
  return xs, ys


def curves_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "") -> Figure:
  """Two panels (loss, accuracy %); per run, train is a solid line and test a dashed one."""
  fig = Figure(figsize=(11, 4.2), dpi=100)
  FigureCanvasAgg(fig)
  loss_ax, acc_ax = fig.subplots(1, 2)
  colors = [f"C{i % 10}" for i in range(len(runs))]
  for color, (name, records) in zip(colors, runs.items()):
    prefix = f"{name} " if name else ""
    for split, style in (("train", "-"), ("test", "--")):
      marker = "o" if split == "test" else None
      x, y = _series(records, f"{split}/loss")
      if x:
        loss_ax.plot(
          x, y, style, color=color, marker=marker, markersize=3, label=f"{prefix}{split}"
        )
      x, y = _series(records, f"{split}/accuracy")
      if x:
        acc_ax.plot(
          x,
          [100 * v for v in y],
          style,
          color=color,
          marker=marker,
          markersize=3,
          label=f"{prefix}{split}",
        )
  loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
  acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def write_curves(
  runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str, title: str = ""
) -> str:
  """Draws `runs` ({label: records}) to a PNG at `path`, replaced atomically; returns the path."""
  return save_png(curves_figure(runs, title), path)


def save_png(fig: Figure, path: str) -> str:
  """Writes `fig` as a PNG at `path` through a temporary file, so a reader never sees half of it."""
  tmp = path + ".tmp"
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)
  return path


def mean_test_curves_figure(
  groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], title: str = ""
) -> Figure:
  """Test accuracy (%) against epoch per group of runs: the mean over the group's runs at each
  evaluated epoch, with a ± one-standard-deviation band."""
  fig = Figure(figsize=(8, 4.8), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for i, (name, runs) in enumerate(groups.items()):
    by_epoch: dict[float, list[float]] = {}
    for records in runs:
      for x, y in zip(*_series(records, "test/accuracy"), strict=True):
        by_epoch.setdefault(x, []).append(100 * y)
    xs = sorted(by_epoch)
    means = [sum(by_epoch[x]) / len(by_epoch[x]) for x in xs]
    stds = [
      math.sqrt(sum((v - m) ** 2 for v in by_epoch[x]) / max(len(by_epoch[x]) - 1, 1))
      for x, m in zip(xs, means, strict=True)
    ]
    color = f"C{i % 10}"
    ax.plot(xs, means, "-o", color=color, markersize=3, label=f"{name} (n={len(runs)})")
    ax.fill_between(
      xs,
      [m - s for m, s in zip(means, stds, strict=True)],
      [m + s for m, s in zip(means, stds, strict=True)],
      color=color,
      alpha=0.15,
    )
  ax.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title=title)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize="small")
  fig.tight_layout()
  return fig


def write_mean_test_curves(
  groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], path: str, title: str = ""
) -> str:
  """Draws `mean_test_curves_figure` to a PNG at `path`, replaced atomically; returns the path."""
  return save_png(mean_test_curves_figure(groups, title), path)
