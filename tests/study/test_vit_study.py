"""The study's model axis: `--model=vit_tiny` plans AdamW vs AdamW + SAM on the ResNet arms'
budget, and a tiny grid of it trains end to end on the real archive and reports."""

import os

import pytest

from configs import cifar10_vit_tiny
from jaxsam import study
from support.config_keys import flat_keys
from support.paths import CIFAR10_JPEG, needs_archive

pytestmark = pytest.mark.slow  # launches training processes


def test_vit_grid_keeps_the_resnet_budget_and_uses_config_keys(tmp_path):
  size = study.SIZES["cpu"]
  vit = study.plan(
    size, CIFAR10_JPEG, str(tmp_path), [0, 1, 2], model="vit_tiny", arms=("adamw", "adamw_sam")
  )
  resnet = study.plan(size, CIFAR10_JPEG, str(tmp_path), [0, 1, 2])
  assert len(vit) == 12 and {r.name.split("-")[0] for r in vit} == {"adamw", "adamw_sam"}
  keys = flat_keys(cifar10_vit_tiny.get_config())
  for run in vit:
    flags = dict(a.removeprefix("--config.").split("=", 1) for a in run.argv[3:])
    assert set(flags) <= keys, set(flags) - keys
    assert flags["model.name"] == "vit_tiny" and run.argv[1] == f"--config={study.VIT_TINY}"
    for key in ("num_epochs", "batch_size", "dataset.train_examples", "model.image_size"):
      assert (
        flags[key]
        == dict(a.removeprefix("--config.").split("=", 1) for a in resnet[0].argv[3:])[key]
      )
  cost = {r.name.split("-")[0]: (r.images, r.passes) for r in vit[:2]}
  assert cost == {"adamw": (resnet[0].images, 1), "adamw_sam": (resnet[0].images, 2)}


@needs_archive
def test_a_tiny_vit_grid_trains_and_reports(tmp_path):
  tiny = study.Size(
    epochs=1,
    seeds=(0,),
    overrides={
      "model.image_size": 8,
      "dtype": "float32",
      "dataset.train_examples": 96,
      "dataset.cache_dir": str(tmp_path / "cache"),
      "batch_size": 48,
      "eval_batch_size": 1000,
      "log_every_steps": 1,
    },
    why="test",
  )
  runs = study.plan(
    tiny,
    CIFAR10_JPEG,
    str(tmp_path),
    [0],
    noises=[0.4],
    model="vit_tiny",
    arms=("adamw", "adamw_sam"),
  )
  study.execute(runs, str(tmp_path), study.repo_root())
  assert all(study.finished(r.workdir) for r in runs)
  with open(study.write_report(runs, str(tmp_path), "test", None)) as f:
    text = f.read()
  assert "AdamW+SAM(ρ=0.05)" in text and "| AdamW |" in text
  assert os.path.isfile(tmp_path / "study_curves.png")


def test_estimate_compiles_the_models_network():
  """--estimate's FLOPs are vit_tiny's with --model=vit_tiny: SAM twice AdamW, not the ResNet's."""
  size = study.SIZES["cpu"]
  vit = study.step_gflops_per_image(size, "vit_tiny")
  resnet = study.step_gflops_per_image(size)
  assert vit["sam"] == pytest.approx(2 * vit["sgd"], rel=0.05)
  assert vit["sgd"] != pytest.approx(resnet["sgd"], rel=0.05)
