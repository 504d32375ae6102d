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

CURVES_FILE = "curves.png"


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
        loss_ax.plot(x, y, style, color=color, marker=marker, markersize=3,
                     label=f"{prefix}{split}")
      x, y = _series(records, f"{split}/accuracy")
      if x:
        acc_ax.plot(x, [100 * v for v in y], style, color=color, marker=marker, markersize=3,
                    label=f"{prefix}{split}")
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


def write_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
                 title: str = "") -> str:
  """Draws `runs` ({label: records}) to a PNG at `path`, replaced atomically; returns the path."""
  fig = curves_figure(runs, title)
  tmp = path + ".tmp"
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)
  return path
