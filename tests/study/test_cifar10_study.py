"""The real-photo study: a launch.py run on a subset of the CIFAR-10 JPEG archive, the study's grid
(every override a key of the locked configs), and the seed table of jaxsam.report."""

import json
import os
import subprocess
import sys

import pytest

from configs import cifar10_sam, cifar10_sgd
from jaxsam import report, study, writers
from jaxsam import workdir as workdir_lib
from support import devices
from support.config_keys import flat_keys
from support.paths import CIFAR10_JPEG, ROOT, needs_archive
from support.runs import failure

pytestmark = pytest.mark.slow  # trains on the real archive


@needs_archive
def test_launch_on_a_noisy_subset_of_the_real_archive(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS=devices.xla_flags(2))
  proc = subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--config=configs/cifar10_sam.py",
      f"--workdir={workdir}",
      "--config.dataset.source=image_folder",
      f"--config.dataset.path={CIFAR10_JPEG}",
      f"--config.dataset.cache_dir={tmp_path / 'cache'}",
      "--config.dataset.train_examples=200",
      "--config.dataset.label_noise=0.4",
      "--config.model.name=resnet8",
      "--config.model.width=4",
      "--config.model.image_size=8",
      "--config.dtype=float32",
      "--config.batch_size=50",
      "--config.sam.m=5",  # the recipe's 32 does not divide 25 images per device
      "--config.eval_batch_size=1000",
      "--config.num_epochs=1",
      "--config.log_every_steps=2",
      "--config.progress_bar=false",
      "--config.wandb.mode=disabled",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, failure(proc)
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["train_examples"] == 200 and summary["label_noise"] == 0.4
  assert summary["steps"] == 4 and summary["completed"]
  records = writers.read_metrics(workdir_lib.RunDir(str(workdir)).metrics)
  evals = [r for r in records if "test/accuracy" in r]
  assert len(evals) == 1 and 0.0 <= evals[0]["test/accuracy"] <= 1.0
  run = report.load_run(str(workdir))
  assert run["train_examples"] == 200 and run["label_noise"] == 0.4
  assert "| label noise | train examples |" in report.markdown([run])


@pytest.mark.parametrize("size", sorted(study.SIZES))
def test_study_grid_is_equal_compute_and_uses_config_keys(size, tmp_path):
  runs = study.plan(study.SIZES[size], CIFAR10_JPEG, str(tmp_path), seeds=[0, 1, 2])
  assert len(runs) == 3 * 2 * 3 and len({r.workdir for r in runs}) == len(runs)
  keys = flat_keys(cifar10_sgd.get_config())
  assert keys == flat_keys(cifar10_sam.get_config())
  for run in runs:
    overrides = [
      a.removeprefix("--config.").split("=", 1)[0] for a in run.argv if a.startswith("--config.")
    ]
    assert set(overrides) <= keys, set(overrides) - keys
  # Equal compute: the 2x SGD arm passes as many images through the model as SAM does.
  cost = {r.name.split("-")[0]: r.images * r.passes for r in runs[:3]}
  assert cost["sgd2x"] == cost["sam"] == 2 * cost["sgd"]


def test_study_dry_run_and_bad_input(tmp_path):
  ok = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxsam.study",
      "--size=cpu",
      f"--data={ROOT}",
      f"--out={tmp_path}",
      "--seeds=4",
      "--dry_run",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert ok.returncode == 0, failure(ok)
  lines = [line for line in ok.stdout.splitlines() if line.startswith("launch.py")]
  assert len(lines) == 6 and all("--config.seed=4" in line for line in lines)
  assert not os.listdir(tmp_path)  # a dry run writes nothing
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxsam.study",
      "--size=cpu",
      f"--data={tmp_path / 'none'}",
      f"--out={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def _fake_run(root, name, *, rho, epochs, seed, accuracies, noise=0.4):
  """A run folder in launch.py's format: config.json, metrics.jsonl and summary.json."""
  run_dir = root / name
  run_dir.mkdir()
  config = {
    "seed": seed,
    "num_epochs": epochs,
    "sam": {"rho": rho, "variant": "sam"},
    "optimizer": {"name": "sgd"},
    "augment": {},
    "dataset": {"label_noise": noise, "train_examples": 4000},
  }
  (run_dir / "config.json").write_text(json.dumps(config))
  with open(run_dir / "metrics.jsonl", "w") as f:
    f.writelines(
      json.dumps({"step": i, "epoch": i * epochs / len(accuracies), "test/accuracy": acc}) + "\n"
      for i, acc in enumerate(accuracies, 1)
    )
  (run_dir / "summary.json").write_text(
    json.dumps({"label_noise": noise, "train_examples": 4000, "wall_time_s": 100.0 + seed})
  )
  return str(run_dir)


def test_seed_table_gives_mean_and_std_per_setting(tmp_path):
  dirs = [
    _fake_run(tmp_path, f"sgd{s}", rho=0.0, epochs=20, seed=s, accuracies=[0.5, a])
    for s, a in ((0, 0.60), (1, 0.62), (2, 0.64))
  ]
  dirs += [
    _fake_run(tmp_path, f"sam{s}", rho=0.05, epochs=20, seed=s, accuracies=[0.7, a])
    for s, a in ((0, 0.70), (1, 0.74))
  ]
  runs = [report.load_run(d) for d in dirs]
  table = report.seed_table(runs).splitlines()
  assert table[2] == (
    "| SGD 20 ep, noise 0.4 | 0.4 | 4000 | 20 | 0,1,2 | 62.00 ± 2.00 | 62.00 ± 2.00 | 101 |"
  )
  assert table[3] == (
    "| SAM(ρ=0.05) 20 ep, noise 0.4 | 0.4 | 4000 | 40 | 0,1 | 72.00 ± 2.83 | 72.00 ± 2.83 | 100 |"
  )
  png = report.write_seed_curves(runs, str(tmp_path / "curves.png"))
  assert os.path.getsize(png) > 10_000
  mean, std, n = report.mean_std([0.60, 0.62, 0.64, None])
  assert n == 3 and mean == pytest.approx(0.62) and std == pytest.approx(0.02)


def test_estimate_is_images_times_flops_over_sustained_rate():
  runs = [study.Run("a", "a", (), images=1000, passes=1), study.Run("b", "b", (), 500, 2)]
  seconds = study.estimate_seconds(runs, {"sgd": 1.0, "sam": 2.0}, peak_tflops=1.0, mfu=0.5)
  assert seconds == pytest.approx((1000 * 1.0 + 500 * 2.0) * 1e9 / 0.5e12)


@needs_archive
def test_study_m_axis_runs_each_sam_arm_per_m_and_reports_m(tmp_path):
  # One command, an m axis on 2 devices (25 images each): SGD once, SAM at m = 5 (five ascent
  # groups per device) and m = 25 (the whole per-device batch); each summary.json says the m it
  # ran, and study.md has an m column and the fit of the noisy train labels at the end.
  out = tmp_path / "study"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxsam.study",
      "--size=smoke",
      f"--data={CIFAR10_JPEG}",
      f"--out={out}",
      "--arms=sgd,sam",
      "--m=5,25",
      "--noise=0.4",
    ],
    cwd=ROOT,
    env=dict(os.environ, XLA_FLAGS=devices.xla_flags(2)),
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, failure(proc)
  assert "3 runs" in proc.stdout
  summaries = {}
  for name in ("sgd", "sam_m5", "sam_m25"):
    with open(out / f"{name}-noise0.4-seed0" / "summary.json") as f:
      summaries[name] = json.load(f)
  assert {k: s["sam_m"] for k, s in summaries.items()} == {"sgd": 0, "sam_m5": 5, "sam_m25": 25}
  assert summaries["sam_m5"]["sam_m_config"] == 5
  for s in summaries.values():
    # 80 of the 200 labels were flipped; the fit of each part is a fraction of its examples.
    fits = [s[f"final_train_accuracy{k}"] for k in ("", "_noisy", "_clean")]
    assert all(0.0 <= f <= 1.0 for f in fits)
    assert s["final_train_accuracy"] == pytest.approx(0.4 * fits[1] + 0.6 * fits[2])
  table = (out / "study.md").read_text()
  header = next(line for line in table.splitlines() if line.startswith("| setting |"))
  assert header.endswith("| m | train acc, given labels % | noise memorised % |")
  rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if "noise 0.4 |" in line}
  assert set(rows) == {
    "SGD 1 ep, noise 0.4",
    "SAM(ρ=0.05, m=25) 1 ep, noise 0.4",
    "SAM(ρ=0.05, m=5) 1 ep, noise 0.4",
  }
  assert "| 5 |" in rows["SAM(ρ=0.05, m=5) 1 ep, noise 0.4"]
  assert "| – |" in rows["SGD 1 ep, noise 0.4"]
