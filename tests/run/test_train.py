"""The training loop's bookkeeping: window means, the SAM step count in summary.json, timing."""

import math
import time
import warnings

import pytest

from configs import quickstart
from jaxsam import train


def test_window_mean_ignores_nan_only_in_sam_keys():
  window = [
    {"train/loss": 1.0, "sam/active": 1.0, "sam/gap": 0.5},
    {"train/loss": 3.0, "sam/active": 0.0, "sam/gap": math.nan},
  ]
  assert train.window_mean(window) == {"train/loss": 2.0, "sam/active": 0.5, "sam/gap": 0.5}
  window[0]["train/loss"] = math.nan
  assert math.isnan(train.window_mean(window)["train/loss"])


def test_window_without_a_sam_step_gives_nan_without_warnings():
  window = [{"train/loss": 1.0, "sam/gap": math.nan}, {"train/loss": 2.0, "sam/gap": math.nan}]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    means = train.window_mean(window)
  assert means["train/loss"] == 1.5 and math.isnan(means["sam/gap"])


def test_sam_steps_sums_sam_active_else_the_default():
  assert train.sam_steps([{"sam/active": 1.0}, {"sam/active": 0.0}, {"sam/active": 1.0}], 0.0) == 2
  assert train.sam_steps([{"train/loss": 1.0}] * 3, 1.0) == 3
  assert train.sam_steps([{"train/loss": 1.0}] * 3, 0.0) == 0


def test_train_clock_counts_only_timed_sections():
  clock = train.TrainClock()
  with clock.timed():
    time.sleep(0.05)
  time.sleep(0.2)  # e.g. eval: not training
  with clock.timed():
    time.sleep(0.05)
  assert 0.09 < clock.lap() < 0.2
  assert clock.lap() == 0.0  # a lap starts where the previous ended


def _tiny_config(rho: float):
  config = quickstart.get_config()
  config.max_steps = 3
  config.model.image_size = 8
  config.model.width = 4
  config.batch_size = 128
  config.sam.rho = rho
  config.augment.randaugment.num_ops = 0
  config.log_every_steps = 1
  config.progress_bar = False
  config.wandb.mode = "disabled"
  return config


@pytest.mark.slow
@pytest.mark.parametrize("rho, fraction", [(0.0, 0.0), (0.05, 1.0)])
def test_summary_sam_fraction_of_plain_sgd_and_sam(tmp_path, rho, fraction):
  summary = train.train_and_evaluate(_tiny_config(rho), str(tmp_path / "run"))
  assert summary["steps"] == 3 and summary["sam_fraction"] == fraction


def test_device_prefetch_keeps_order_and_one_batch_ahead():
  import numpy as np

  from jaxsam import parallel

  pulled = []

  def source():
    for i in range(4):
      pulled.append(i)
      yield {"x": np.full((mesh.devices.size, 3), i, np.float32)}

  mesh = parallel.make_mesh()
  batches = parallel.DevicePrefetch(source(), mesh)
  first = next(batches)
  assert pulled == [0, 1]  # the next batch is already placed
  assert float(first["x"][0, 0]) == 0 and first["x"].sharding == parallel.batch_sharded(mesh)
  assert [float(b["x"][0, 0]) for b in batches] == [1, 2, 3]
  assert batches.mean_wait_ms() >= 0
  assert math.isnan(batches.mean_wait_ms())  # nothing handed out since


def test_startup_line_says_when_m_follows_the_device_count():
  config = quickstart.get_config()
  config.sam.m = 0
  assert train.sam_m_text(config, 32) == (
    "32 (sam.m=0: the per-device batch, so results depend on the device count)"
  )
  config.sam.m = 16
  assert train.sam_m_text(config, 16) == "16"
  config.sam.rho = 0.0
  assert train.sam_m_text(config, 0) == "n/a (rho=0)"


def test_a_fresh_run_record_is_the_checkpoint_meta_runs_have_always_saved():
  """A fresh run's meta (a contract with existing checkpoints): no eval fields before an eval."""
  assert train.RunProgress.fresh().to_meta() == {
    "epoch": 0,
    "best_accuracy": None,
    "best_epoch": None,
    "window": [],
    "wall_time": 0.0,
    "sam_steps": 0.0,
  }


def test_a_resumed_run_record_restores_every_field_and_counts_old_checkpoints_sam_steps():
  meta = {
    "epoch": 3,
    "best_accuracy": 0.5,
    "best_epoch": 2,
    "window": [{"train/loss": 1.0}],
    "wall_time": 12.5,
    "sam_steps": 7.0,
    "last_accuracy": 0.4,
    "evaluated_epoch": 3,
  }
  progress = train.RunProgress.restored(meta, step=30, default_sam_active=1.0)
  assert progress.to_meta() == meta
  progress.window.append({"train/loss": 2.0})  # the loop's window is its own list
  assert meta["window"] == [{"train/loss": 1.0}]
  # A checkpoint from before the SAM step count: each of its steps counts as the run's default.
  older = {k: v for k, v in meta.items() if k != "sam_steps"}
  assert train.RunProgress.restored(older, step=30, default_sam_active=1.0).sam_steps == 30.0
  assert train.RunProgress.restored(older, step=30, default_sam_active=0.0).sam_steps == 0.0
