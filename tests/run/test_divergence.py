"""A non-finite loss stops training with the step number and keeps the last good checkpoint."""

import math
import os
import re

import pytest

from configs import quickstart
from jaxsam import checkpoint as ckpt_lib
from jaxsam import train, writers
from jaxsam import workdir as workdir_lib

pytestmark = pytest.mark.slow  # three training runs


def _tiny_config(**overrides):
  config = quickstart.get_config()
  config.num_epochs = 2
  config.max_steps = 11  # one epoch at batch 128: eval + checkpoint at step 11
  config.model.image_size = 8
  config.model.width = 4
  config.batch_size = 128
  config.sam.rho = 0.0
  config.augment.randaugment.num_ops = 0
  config.log_every_steps = 1
  config.checkpoint_every_epochs = 1
  config.progress_bar = False
  config.wandb.mode = "disabled"
  config.update_from_flattened_dict(overrides)
  return config


def test_nonfinite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  assert train.train_and_evaluate(_tiny_config(), workdir)["steps"] == 11
  # Resume with the largest float32 learning rate (written into config.json, as if the run had
  # diverged on its own; an infinite one is refused as out of its domain): step 12 starts from
  # checkpoint 11 with a finite loss, its update overflows, so step 13's loss is the first
  # non-finite one.
  diverging = _tiny_config(max_steps=14, **{"optimizer.learning_rate": 3e38})
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w") as f:
    f.write(workdir_lib.config_to_json(diverging))
  last_good = os.path.join(workdir, workdir_lib.LAST_DIR, "11")
  with pytest.raises(
    train.TrainingError,
    match=re.escape(f"non-finite train loss at step 13; last good checkpoint: {last_good}"),
  ):
    train.train_and_evaluate(diverging, workdir)

  checkpointer = ckpt_lib.Checkpointer(workdir, keep=2)
  try:
    assert checkpointer.steps() == [11]  # nothing non-finite was saved
  finally:
    checkpointer.close()
  records = writers.read_metrics(workdir_lib.RunDir(workdir).metrics)
  train_losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
  assert all(math.isfinite(v) for v in train_losses.values())
  assert max(train_losses) == 12  # logged up to the last finite step
  # The kept checkpoint still resumes: with the original config the run completes.
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w") as f:
    f.write(workdir_lib.config_to_json(_tiny_config(max_steps=14)))
  assert train.train_and_evaluate(_tiny_config(max_steps=14), workdir)["steps"] == 14
