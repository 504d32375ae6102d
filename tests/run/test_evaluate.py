"""Eval-only mode reproduces the logged test metrics of a checkpoint; workdir guards; bad input."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import quickstart
from jaxsam import checkpoint as ckpt_lib
from jaxsam import errors, evaluate, run_setup, train, writers
from jaxsam import workdir as workdir_lib
from support import devices
from support.paths import ROOT
from support.runs import failure


def _tiny_config(**overrides) -> ml_collections.ConfigDict:
  config = quickstart.get_config()
  config.num_epochs = 2
  config.max_steps = 14  # eval + checkpoint at step 11 (epoch 1) and 14 (the last step)
  config.model.image_size = 8
  config.model.width = 4
  config.batch_size = 128
  config.eval_batch_size = 64  # 360 test images: the last batch is padded
  config.checkpoint_every_epochs = 1
  config.progress_bar = False
  config.wandb.mode = "disabled"
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval") / "run")
  summary = train.train_and_evaluate(_tiny_config(), workdir)
  assert summary["completed"] and summary["steps"] == 14
  evals = [
    r for r in writers.read_metrics(workdir_lib.RunDir(workdir).metrics) if "test/accuracy" in r
  ]
  assert [r["step"] for r in evals] == [11, 14]
  return workdir, {r["step"]: r for r in evals}


@pytest.mark.slow
def test_eval_reproduces_logged_metrics_of_final_checkpoint(run):
  workdir, logged = run
  result = evaluate.evaluate_checkpoint(None, workdir)  # config from the workdir's config.json
  assert result["step"] == 14 and result["checkpoint"].endswith(os.path.join("checkpoints", "14"))
  assert result["top1"] == logged[14]["test/accuracy"]
  assert result["top5"] == logged[14]["test/top5"]
  assert result["loss"] == pytest.approx(logged[14]["test/loss"], rel=1e-6, abs=1e-7)
  assert result["count"] == 360
  with open(os.path.join(workdir, workdir_lib.EVAL_FILE)) as f:
    assert json.load(f) == result
  # Per-class accuracies weighted by class sizes give back top-1.
  config = workdir_lib.read_config(workdir)
  labels = run_setup.build_setup(config).data.arrays.test.labels
  sizes = np.bincount(labels, minlength=10)
  assert len(result["per_class_accuracy"]) == 10
  assert np.dot(result["per_class_accuracy"], sizes) / sizes.sum() == pytest.approx(
    result["top1"], abs=1e-6
  )  # per-class ratios are float32


@pytest.mark.slow
def test_eval_of_an_earlier_checkpoint(run):
  workdir, logged = run
  path = os.path.join(workdir, workdir_lib.LAST_DIR, "11")
  result = evaluate.evaluate_checkpoint(None, workdir, checkpoint=path)
  assert result["step"] == 11 and result["top1"] == logged[11]["test/accuracy"]


@pytest.mark.slow
def test_launch_eval_mode_writes_eval_json(run, tmp_path):
  workdir, logged = run
  env = dict(
    os.environ, XLA_FLAGS=devices.xla_flags(8), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2"
  )
  best = ckpt_lib.Checkpointer(workdir, 2)
  best_path = best.best_path()
  best.close()
  proc = subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--mode=eval",
      f"--workdir={workdir}",
      f"--checkpoint={best_path}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, failure(proc)
  with open(os.path.join(workdir, workdir_lib.EVAL_FILE)) as f:
    result = json.load(f)
  step = result["step"]
  assert (
    result["top1"]
    == logged[step]["test/accuracy"]
    == max(r["test/accuracy"] for r in logged.values())
  )
  assert "jaxsam eval:" in proc.stdout
  bad = subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--mode=eval",
      f"--workdir={workdir}",
      f"--checkpoint={tmp_path}/nope",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
    f"error: --checkpoint={tmp_path}/nope is not a folder; pass a step folder such as "
    f"{workdir}/checkpoints/<step>"
  )


def test_eval_bad_input(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"has no config.json; give the folder of a "):
    evaluate.evaluate_checkpoint(None, str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    f.write(workdir_lib.config_to_json(_tiny_config()))
  with pytest.raises(errors.CheckpointError, match=r"holds no checkpoint in checkpoints/"):
    evaluate.evaluate_checkpoint(None, str(tmp_path))


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_unless_overwrite(run, tmp_path):
  workdir, _ = run
  other = _tiny_config(**{"optimizer.learning_rate": 0.3, "seed": 1})
  with pytest.raises(errors.ConfigError) as e:
    workdir_lib.prepare(other, workdir, overwrite=False)
  assert str(e.value) == (
    f"--workdir={workdir} holds a run of another config (differs in optimizer.learning_rate, "
    "seed); use a new --workdir, or --overwrite to replace it"
  )
  # Keys that only change how a run is watched may differ on resume.
  workdir_lib.prepare(
    _tiny_config(**{"max_steps": 0, "wandb.mode": "offline"}), workdir, overwrite=False
  )
  # --overwrite replaces the old run: its checkpoints and metrics go, other files stay.
  copy = str(tmp_path / "copy")
  import shutil

  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, "notes.txt"), "w") as f:
    f.write("mine")
  workdir_lib.prepare(other, copy, overwrite=True)
  assert sorted(os.listdir(copy)) == ["config.json", "notes.txt", "run.lock"]  # lock kept
  with open(os.path.join(copy, "config.json")) as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.3
