"""bench/gpu_suite.py's bookkeeping: rows that cannot run say why, and the rest still run."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from support.paths import ROOT
from support.runs import failure

_spec = importlib.util.spec_from_file_location(
  "gpu_suite", os.path.join(ROOT, "bench", "gpu_suite.py")
)
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

CASE = suite.Case("tiny", "resnet8", 8, 8, "float32", 10, budget_s=1)


def test_a_missing_config_key_is_a_row_marked_n_a():
  row = suite.Optimizer("future", {"sam.rho": 0.05, "sam.not_a_key": 3}, phase=2)
  config, reason = suite.child_config(CASE, row, batch=8)
  assert config is None and reason == "this jaxsam has no config key sam.not_a_key"
  config, reason = suite.child_config(CASE, suite.OPTIMIZERS[1], batch=8)
  assert reason is None and config.sam.rho == suite.RHO and config.model.image_size == 8


def test_a_model_over_its_budget_is_a_timeout_row_per_optimizer(tmp_path):
  args = suite.parse_args(["--quick", f"--out={tmp_path / 'x.json'}"])
  rows, device = suite.spawn(CASE, list(suite.OPTIMIZERS[:2]), 0.5, args, dict(os.environ))
  assert device is None
  assert [(r["optimizer"], r["status"]) for r in rows] == [("sgd", "timeout"), ("sam", "timeout")]
  assert all("budget" in r["reason"] for r in rows)


def test_table_has_one_line_per_row_with_the_status_where_there_are_no_figures():
  base = {"model": "resnet8", "image_size": 8, "batch": 8, "dtype": "float32", "cifar_stem": False}
  ok = dict(
    base,
    optimizer="sgd",
    status="ok",
    step_ms=2.0,
    images_per_s=4000.0,
    gflop_image=0.01,
    mfu=None,
    peak_bytes=3 * 2**20,
    temp_bytes=2**20,
    compile_s=1.5,
    compile_cached=True,
  )
  oom = dict(base, optimizer="sam", status="oom", reason="RESOURCE_EXHAUSTED")
  lines = suite.table([ok, oom]).splitlines()
  assert len(lines) == 4 and all(line.count("|") == 14 for line in lines)
  assert "| 2.00 | 4,000 | 0.010 | n/a | 3.0 | 1.0 | 1.5 (cached) | ok |" in lines[2]
  assert lines[3].endswith("| oom: RESOURCE_EXHAUSTED |")


def test_out_of_memory_is_told_apart_from_other_failures():
  assert suite.failure_status(RuntimeError("RESOURCE_EXHAUSTED: Out of memory")) == "oom"
  assert suite.failure_status(ValueError("bad shape")) == "error"


def test_device_augmentation_line_says_its_figures_or_why_none(tmp_path):
  args = suite.parse_args(["--quick", f"--out={tmp_path / 'x.json'}"])
  assert suite.run_device_augment(args, 1.0, dict(os.environ)) == {
    "status": "not run",
    "reason": "suite time budget spent",
  }
  rows = [
    {"image_size": 32, "batch": 256, "images_per_s": 51234.4},
    {"image_size": 224, "batch": 256, "images_per_s": 2345.6},
  ]
  (line,) = suite.device_augment_lines({"status": "ok", "rows": rows})
  assert line.endswith("32 px batch 256: 51,234 images/s; 224 px batch 256: 2,346 images/s")
  assert suite.device_augment_lines({"status": "timeout", "reason": "over its 40 s budget"}) == [
    "device augmentation: timeout: over its 40 s budget"
  ]
  assert suite.device_augment_lines(None) == []


def test_vit_cases_time_adamw_and_adamw_sam_and_the_conv_nets_do_not():
  """ViT rows: AdamW and AdamW + SAM with the SAM-ViT recipe's optimizer keys; --quick has a ViT."""
  vits = [c for c in suite.all_cases() if c.model.startswith("vit")]
  assert {c.model for c in vits} == {"vit_s16", "vit_b16", "vit_tiny"}
  assert all(c.family == "adamw" for c in vits)
  adamw = [o for o in suite.OPTIMIZERS if o.family == "adamw"]
  assert [o.name for o in adamw] == ["adamw", "adamw_sam"]
  assert {o.name for o in adamw} <= set(suite.QUICK_OPTIMIZERS)
  vit_case = next(c for c in suite.QUICK_CASES if c.model == "vit_tiny")
  for row, rho in zip(adamw, (0.0, suite.RHO)):
    config, reason = suite.child_config(vit_case, row, batch=8)
    assert reason is None
    assert (config.optimizer.name, config.sam.rho, config.optimizer.grad_clip_norm) == (
      "adamw",
      rho,
      1.0,
    )
  notes = suite.sam_memory_notes(
    [
      {"model": "vit_b16", "optimizer": n, "status": "ok", "temp_bytes": t, "peak_bytes": t}
      for n, t in (("adamw", 2 * suite.MIB), ("adamw_sam", 3 * suite.MIB))
    ]
  )
  assert notes == ["vit_b16: adamw_sam temp 3.0 MiB vs adamw 2.0 MiB = 1.50x (peak 1.50x)"]


def test_real_loop_row_is_resnet18_cifar_on_the_device_pipeline_and_says_its_ratio(tmp_path):
  args = suite.parse_args(["--quick", f"--out={tmp_path / 'x.json'}"])
  assert suite.run_real_loop(args, 1.0, dict(os.environ)) == {
    "status": "not run",
    "reason": "suite time budget spent",
  }
  full, quick = suite.real_loop_arguments(quick=False), suite.real_loop_arguments(quick=True)
  assert full[:2] == quick[:2] == ["--config=configs/cifar10_sgd.py", "--pipeline=device"]
  assert not any("image_size" in a for a in full)  # the config's own 32 px
  assert "--set=model.image_size=8" in quick and "--set=dataset.name=digits" in quick
  result = {
    "status": "ok",
    "model": "resnet18",
    "image_size": 32,
    "dtype": "bfloat16",
    "batch": 256,
    "pipeline": "device",
    "loop_images_per_s": 9700.2,
    "step_images_per_s": 10000.0,
    "efficiency": 0.97002,
  }
  (line,) = suite.real_loop_line(result)
  assert line.startswith("real loop (resnet18 CIFAR stem, 32 px bfloat16, batch 256, dataset.")
  assert line.endswith(
    "launch.py 9,700 images/s / bare step (gather + augment + train step) 10,000 images/s"
    " = **0.970**"
  )
  assert suite.real_loop_line({"status": "timeout", "reason": "over its 60 s budget"}) == [
    "real loop (ResNet-18 CIFAR, device input): timeout: over its 60 s budget"
  ]


@pytest.mark.slow
def test_real_loop_row_runs_at_cpu_sizes_with_tensorflow_blocked(tmp_path):
  """The --quick row end to end: loop_efficiency.py (TensorFlow blocked in it) trains through
  launch.py on the device pipeline and prints a loop efficiency in (0, 1.5)."""
  out = tmp_path / "loop.json"
  script = os.path.join(ROOT, "bench", "loop_efficiency.py")
  code = (
    "import runpy, sys\n"
    "for name in ('tensorflow', 'tensorflow_datasets', 'wandb'):\n"
    "  sys.modules[name] = None\n"
    f"sys.argv = [{script!r}, '--json={out}', *sys.argv[1:]]\n"
    f"runpy.run_path({script!r}, run_name='__main__')\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", code, *suite.real_loop_arguments(quick=True)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert done.returncode == 0, failure(done)
  result = json.loads(out.read_text())
  assert result["status"] == "ok" and result["pipeline"] == "device"
  assert result["model"] == "resnet18" and result["image_size"] == 8
  assert 0 < result["efficiency"] < 1.5
  assert "[dataset.pipeline=device]" in done.stdout
