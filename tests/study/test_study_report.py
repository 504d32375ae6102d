"""study.md: one section per label-noise level, mean ± std over seeds first, then that level's
runs setting by setting; its command line carries no absolute path of the machine it ran on."""

import json
import os

from jaxsam import study
from support.paths import ROOT


def _run(root, name, *, rho, noise, seed, final):
  """A finished run folder as launch.py writes it, for the study's cpu size (flips, no crop)."""
  run_dir = root / name
  run_dir.mkdir()
  config = {
    "seed": seed,
    "num_epochs": 40,
    "sam": {"rho": rho, "variant": "sam"},
    "optimizer": {"name": "sgd"},
    "augment": {"crop_padding": 0, "flip": True},
    "dataset": {"label_noise": noise, "train_examples": 1500},
  }
  (run_dir / "config.json").write_text(json.dumps(config))
  (run_dir / "metrics.jsonl").write_text(
    "".join(
      json.dumps({"step": i, "epoch": 20 * i, "test/accuracy": a}) + "\n"
      for i, a in enumerate([final + 0.01, final], 1)
    )
  )
  (run_dir / "summary.json").write_text(json.dumps({"completed": True, "wall_time_s": 90.0}))
  return study.Run(name, str(run_dir), (), images=0, passes=1)


def test_study_md_groups_runs_by_noise_level_mean_first(tmp_path):
  runs = [  # the study's own order: seed-major, then noise, then arm
    _run(tmp_path, f"{arm}-noise{noise:g}-seed{seed}", rho=rho, noise=noise, seed=seed, final=f)
    for seed in (1, 0)
    for noise in (0.4, 0.0)
    for arm, rho in (("sgd", 0.0), ("sam", 0.05))
    for f in [(0.40 if noise else 0.60) + rho + seed / 100]
  ]
  path = study.write_report(runs, str(tmp_path), "python -m jaxsam.study --size=cpu", 600.0)
  with open(path) as f:
    text = f.read()
  clean, noisy = text.split("## Label noise 0\n")[1].split("## Label noise 0.4\n")
  for section, noise in ((clean, "0"), (noisy, "0.4")):
    assert section.index("mean ± std over seeds") < section.index("| # | run |")
    rows = [line for line in section.splitlines() if line.startswith("| ") and "-seed" in line]
    # Grouped by setting, seeds in order; every row of this section has its noise level only.
    assert [row.split(" | ")[1] for row in rows] == [
      f"sgd-noise{noise}-seed0",
      f"sgd-noise{noise}-seed1",
      f"sam-noise{noise}-seed0",
      f"sam-noise{noise}-seed1",
    ]
    assert all(row.split(" | ")[2] == "flip" for row in rows)  # crop_padding=0: flips only
  assert "| SGD 40 ep | 0 | 1500 | 40 | 0,1 | 61.50 ± 0.71 | 60.50 ± 0.71 | 90 |" in clean
  assert "| SAM(ρ=0.05) 40 ep, noise 0.4 | 0.4 | 1500 | 80 | 0,1 | " in noisy
  assert "best / final" not in text  # the per-optimizer cross table is the report's, not here


def test_study_command_is_relative_to_the_repository():
  parent = os.path.dirname(ROOT)
  argv = [
    "--size=cpu",
    f"--data={os.path.join(parent, 'shared', 'data', 'cifar10.tar.gz')}",
    "--out",
    os.path.join(ROOT, "runs", "study_cpu"),
    "--seeds=0",
  ]
  assert study.portable_command(argv, ROOT) == (
    "python -m jaxsam.study --size=cpu --data=../shared/data/cifar10.tar.gz --out "
    "runs/study_cpu --seeds=0"
  )
  far = ["--data=/srv/datasets/cifar10.tar.gz", "--out=/srv/runs/study"]
  if os.path.relpath("/srv", ROOT).startswith(os.pardir + os.sep + os.pardir):
    assert study.portable_command(far, ROOT) == (
      "python -m jaxsam.study --data=DATA/cifar10.tar.gz --out=RUNS/study"
    )
