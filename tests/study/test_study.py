"""The original study's config end to end: torchvision ImageNet-layout ResNet-50 weights converted
once, CIFAR-100 in torchvision's archive format, SAM + RandAugment, two steps through launch.py."""

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from jaxsam import checkpoint, run_setup
from jaxsam import state as state_lib
from jaxsam import workdir as workdir_lib
from jaxsam.models import pretrained
from support import devices
from support.cifar_files import write_cifar
from support.paths import ROOT
from support.runs import failure

pytestmark = pytest.mark.slow


def run(*args):
  env = dict(os.environ, XLA_FLAGS=devices.xla_flags(2))
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  """Runs configs/sam_ra.py for 2 steps on converted torchvision weights and a CIFAR archive."""
  import torch
  import torchvision

  tmp = tmp_path_factory.mktemp("study")
  torch.manual_seed(0)
  torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp / "resnet50.pth")
  weights = tmp / "resnet50.msgpack"
  converted = run(
    "-m",
    "jaxsam.convert",
    "--model=resnet50",
    f"--input={tmp / 'resnet50.pth'}",
    f"--output={weights}",
  )
  assert converted.returncode == 0, failure(converted)
  archive, _, _, _ = write_cifar(
    tmp, "cifar-100-python", True, np.random.default_rng(0), per_batch=12
  )
  workdir = tmp / "run"
  # 64 px instead of the config's 224 keeps this CI test to a minute; the code path is the same.
  # lr 0: SAM's two passes run, BN statistics move, and the saved params must be the imported ones.
  result = run(
    "launch.py",
    "--config=configs/sam_ra.py",
    f"--workdir={workdir}",
    f"--config.model.pretrained={weights}",
    "--config.dataset.source=cifar_python",
    f"--config.dataset.path={archive}",
    "--config.max_steps=2",
    "--config.batch_size=8",
    "--config.sam.m=0",  # the per-device batch: the recipe's 64 is more than this batch of 8
    "--config.eval_batch_size=8",
    "--config.optimizer.learning_rate=0.0",
    "--config.model.image_size=64",
    "--config.wandb.mode=disabled",
    "--config.progress_bar=False",
  )
  assert result.returncode == 0, failure(result)
  return workdir, weights, result


def test_study_config_runs_two_sam_steps(study_run):
  workdir, _, result = study_run
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 2 and summary["completed"]
  assert summary["num_devices"] == 2 and summary["sam_m"] == 4  # m = per-device batch
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "test/accuracy" in r] == [1, 2]  # 1 step per epoch
  train_records = [r for r in records if "train/loss" in r]
  assert train_records and all(np.isfinite(r["sam/perturbed_loss"]) for r in train_records)
  assert "final test accuracy" in result.stdout


def test_study_run_trains_the_converted_backbone(study_run):
  """The saved backbone is the converted torchvision one (lr 0 keeps it), not a fresh init; the
  100-class head (ImageNet has 1000) is fresh; BN statistics moved; normalisation is ImageNet's."""
  workdir, weights, _ = study_run
  config = workdir_lib.read_config(str(workdir))
  assert config.model.pretrained == str(weights)
  setup = run_setup.build_setup(config)
  np.testing.assert_allclose(setup.step_config.mean, [0.485, 0.456, 0.406], atol=1e-6)
  tx, _ = run_setup.setup_optimizer(config, setup)
  abstract = state_lib.abstract_state(setup.model, tx, setup.step_config, setup.mesh)
  state, _ = checkpoint.restore(os.path.join(workdir, "checkpoints", "2"), abstract)
  zeros = jax.tree.map(
    lambda s: np.zeros(s.shape, s.dtype),
    {"params": abstract.params, "batch_stats": abstract.batch_stats},
  )
  imported = pretrained.load_pretrained(str(weights), config.model, zeros)
  flat_imported = flax.traverse_util.flatten_dict(imported["params"], sep="/")
  flat_saved = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  assert flat_saved.keys() == flat_imported.keys()
  for name, value in flat_imported.items():
    if not name.startswith("fc/"):
      np.testing.assert_array_equal(flat_saved[name], value, err_msg=name)
  assert flat_saved["fc/kernel"].shape == (2048, 100)
  stats = jax.device_get(state.batch_stats)
  assert not np.array_equal(stats["bn1"]["mean"], imported["batch_stats"]["bn1"]["mean"])
