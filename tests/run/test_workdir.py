"""The run folder: its table of entries, config diffs, checks, --overwrite, and reading it back."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import quickstart
from jaxsam import errors, report
from jaxsam import workdir as workdir_lib
from support import devices
from support.paths import ROOT
from support.runs import failure

DIRS = {
  workdir_lib.LAST_DIR,
  workdir_lib.BEST_DIR,
  workdir_lib.CORRUPT_DIR,
  workdir_lib.ANALYSIS_DIR,
  workdir_lib.WANDB_DIR,
}


def _config(**overrides) -> ml_collections.ConfigDict:
  config = quickstart.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def _fill(workdir) -> None:
  """Every entry of the table, as a folder holding one file or as a file."""
  os.makedirs(workdir, exist_ok=True)
  for name in workdir_lib.ENTRIES:
    path = os.path.join(workdir, name)
    if name in DIRS:
      os.makedirs(path)
      with open(os.path.join(path, "x"), "w") as f:
        f.write("old")
    else:
      with open(path, "w") as f:
        f.write("{}")


def test_the_table_names_every_file_and_folder_and_the_writers_use_it():
  names = {v for k, v in vars(workdir_lib).items() if k.endswith(("_FILE", "_DIR"))}
  assert names - set(workdir_lib.ENTRIES) == {workdir_lib.ANALYSIS_FILE}  # inside analysis/
  kept = {workdir_lib.WANDB_DIR, workdir_lib.LOCK_FILE, workdir_lib.LOCK_HOLDER_FILE}
  assert set(workdir_lib.CLEARED) == set(workdir_lib.ENTRIES) - kept
  assert {"analysis", "eval.json", "config.json", "checkpoints"} <= set(workdir_lib.CLEARED)
  assert all(e.what and "\n" not in e.what for e in workdir_lib.ENTRIES.values())
  run = workdir_lib.RunDir("w")
  assert run.analysis == os.path.join("w", "analysis", "analysis.json")
  assert run.checkpoint(7) == os.path.join("w", "checkpoints", "7")
  assert (run.metrics, run.summary, run.eval, run.weights, run.lock) == tuple(
    os.path.join("w", n)
    for n in ("metrics.jsonl", "summary.json", "eval.json", "weights.json", "run.lock")
  )
  assert [run.entry(n) for n in workdir_lib.ENTRIES] == [
    os.path.join("w", n) for n in workdir_lib.ENTRIES
  ]


def test_config_diff_names_leaves_and_leaves_out_allowed_keys_and_sections():
  old = {"seed": 0, "sam": {"rho": 0.05, "m": 0}, "wandb": {"mode": "auto", "project": "a"}}
  new = {
    "seed": 1,
    "sam": {"rho": 0.1, "m": 0},
    "wandb": {"mode": "offline", "project": "b"},
    "extra": 1,
  }
  assert workdir_lib.config_diff(old, new) == [
    "extra",
    "sam.rho",
    "seed",
    "wandb.mode",
    "wandb.project",
  ]
  assert workdir_lib.config_diff(old, new, {"seed", "wandb."}) == ["extra", "sam.rho"]
  assert workdir_lib.config_diff({"sam": {"rho": 1}}, {"sam": 2}) == ["sam"]


def test_config_diff_reads_a_key_an_older_config_lacks_as_its_default():
  """A key added since a run was made is no change at its default, a change at another value."""
  defaults = {"seed": 0, "sam": {"rho": 0.05, "every": 1}, "new": {"a": 1}}
  old = {"seed": 0, "sam": {"rho": 0.05}}
  assert workdir_lib.config_diff(old, defaults, defaults=defaults) == []
  new = {"seed": 0, "sam": {"rho": 0.05, "every": 2}, "new": {"a": 3}}
  assert workdir_lib.config_diff(old, new, defaults=defaults) == ["new.a", "sam.every"]
  assert workdir_lib.config_diff(old, defaults) == ["new", "sam.every"]  # no defaults: changes
  # A key the new config lacks (removed from the code) is still a change.
  assert workdir_lib.config_diff({"gone": 1, "seed": 0}, {"seed": 0}, defaults=defaults) == ["gone"]


def _drop_keys(config_json, *dotted: str) -> None:
  """Deletes keys from a run's config.json, as a config.json written before they existed."""
  with open(config_json) as f:
    saved = json.load(f)
  for name in dotted:
    *parents, leaf = name.split(".")
    section = saved
    for p in parents:
      section = section[p]
    del section[leaf]
  with open(config_json, "w") as f:
    json.dump(saved, f)


def test_check_accepts_an_older_config_without_a_key_at_its_default(tmp_path):
  workdir = str(tmp_path / "run")
  workdir_lib.prepare(_config(), workdir, overwrite=False)
  _drop_keys(os.path.join(workdir, "config.json"), "label_smoothing", "dataset.max_image_pixels")
  workdir_lib.check(_config(), workdir, overwrite=False)
  filled = workdir_lib.config_to_json(workdir_lib.read_config(workdir))
  assert filled == workdir_lib.config_to_json(_config())  # the two keys at their defaults
  with pytest.raises(errors.ConfigError, match=r"differs in label_smoothing\)"):
    workdir_lib.check(_config(label_smoothing=0.1), workdir, overwrite=False)


@pytest.mark.parametrize(
  "key, value, resumes, analyses",
  [
    ("max_steps", 3, True, True),
    ("wandb.mode", "offline", True, True),
    ("wandb.project", "other", False, True),
    ("num_epochs", 7, False, True),
    ("checkpoint_keep", 9, False, True),
    ("optimizer.learning_rate", 0.5, False, False),
    ("model.width", 4, False, False),
    ("dataset.cache_dir", "/elsewhere", True, True),
    ("dataset.label_noise", 0.4, False, False),
  ],
)
def test_what_may_change_on_resume_and_what_may_differ_for_analysis(key, value, resumes, analyses):
  old, new = _config().to_dict(), _config(**{key: value}).to_dict()
  assert (not workdir_lib.config_diff(old, new, workdir_lib.RESUME_MAY_CHANGE)) == resumes
  assert (not workdir_lib.config_diff(old, new, workdir_lib.ANALYSIS_MAY_DIFFER)) == analyses


def test_check_refuses_a_file_an_unwritable_path_and_another_config(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(errors.ConfigError, match=f"--workdir={afile} is a file"):
    workdir_lib.check(_config(), str(afile), overwrite=False)
  with pytest.raises(errors.ConfigError, match="is not writable"):
    workdir_lib.check(_config(), str(afile / "sub"), overwrite=True)
  workdir = str(tmp_path / "run")
  workdir_lib.prepare(_config(), workdir, overwrite=False)
  with pytest.raises(errors.ConfigError) as e:
    workdir_lib.check(_config(seed=3, num_epochs=9), workdir, overwrite=False)
  assert str(e.value) == (
    f"--workdir={workdir} holds a run of another config (differs in "
    "num_epochs, seed); use a new --workdir, or --overwrite to replace it"
  )
  workdir_lib.check(_config(max_steps=5), workdir, overwrite=False)
  workdir_lib.check(_config(seed=3), workdir, overwrite=True)
  (tmp_path / "run" / "config.json").write_text("{not json")
  with pytest.raises(errors.ConfigError, match="cannot be read as JSON .*--overwrite"):
    workdir_lib.check(_config(), workdir, overwrite=False)


def test_clear_removes_every_cleared_entry_and_keeps_the_rest(tmp_path):
  _fill(tmp_path)
  (tmp_path / "notes.txt").write_text("mine")
  workdir_lib.clear(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["notes.txt", "run.lock", "run.lock.json", "wandb"]
  workdir_lib.clear(str(tmp_path / "absent"))  # nothing to clear is no error


def test_prepare_with_overwrite_leaves_only_the_new_config(tmp_path):
  _fill(tmp_path)
  workdir_lib.prepare(_config(seed=5), str(tmp_path), overwrite=True)
  # The lock and its holder stay: the process overwriting the folder holds them.
  assert sorted(os.listdir(tmp_path)) == ["config.json", "run.lock", "run.lock.json", "wandb"]
  assert workdir_lib.read_config(str(tmp_path)).seed == 5
  _fill(tmp_path / "other")
  workdir_lib.prepare(_config(), str(tmp_path / "other"), overwrite=True, main_process=False)
  assert len(os.listdir(tmp_path / "other")) == len(workdir_lib.ENTRIES)  # process 0 clears


def test_read_config_and_resolve_checkpoint_bad_input(tmp_path):
  with pytest.raises(errors.ConfigError, match=f"--workdir={tmp_path} has no config.json"):
    workdir_lib.read_config(str(tmp_path))
  (tmp_path / "config.json").write_text("[")
  with pytest.raises(errors.ConfigError, match="cannot be read as JSON .*; pass --config$"):
    workdir_lib.read_config(str(tmp_path))
  with pytest.raises(errors.CheckpointError, match="holds no checkpoint in checkpoints/"):
    workdir_lib.resolve_checkpoint(str(tmp_path), None)
  for step in ("2", "10", "3.orbax-checkpoint-tmp-1"):
    os.makedirs(tmp_path / "checkpoints" / step)
  assert workdir_lib.resolve_checkpoint(str(tmp_path), None) == str(tmp_path / "checkpoints" / "10")
  with pytest.raises(errors.CheckpointError, match="--checkpoint=nope is not a folder"):
    workdir_lib.resolve_checkpoint(str(tmp_path), "nope")


def test_read_run_reads_config_metrics_summary_and_analysis(tmp_path):
  with pytest.raises(errors.ConfigError, match="is not a run folder"):
    workdir_lib.read_run(str(tmp_path))
  (tmp_path / "config.json").write_text(workdir_lib.config_to_json(_config()))
  run = workdir_lib.read_run(str(tmp_path))
  assert run.config["seed"] == 0 and run.records == [] and run.summary == {}
  assert run.analysis is None
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "epoch": 1, "test/accuracy": null}\n')
  (tmp_path / "summary.json").write_text('{"completed": true}')
  os.makedirs(tmp_path / "analysis")
  (tmp_path / "analysis" / "analysis.json").write_text('{"hessian": {"lambda_max": 3.0}}')
  run = workdir_lib.read_run(str(tmp_path))
  assert run.records[0]["step"] == 1 and run.summary == {"completed": True}
  assert run.analysis["hessian"]["lambda_max"] == 3.0
  (tmp_path / "analysis" / "analysis.json").write_text('{"hessian": ')
  with pytest.raises(errors.ConfigError, match="analysis.json cannot be read as JSON"):
    workdir_lib.read_run(str(tmp_path))


def _env() -> dict:
  return dict(
    os.environ, XLA_FLAGS=devices.xla_flags(2), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2"
  )


def _launch(workdir, *args):
  env = _env()
  proc = subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--config=configs/quickstart.py",
      f"--workdir={workdir}",
      "--config.model.image_size=8",
      "--config.model.width=4",
      "--config.batch_size=128",
      "--config.progress_bar=False",
      "--config.wandb.mode=disabled",
      *args,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, failure(proc)


@pytest.mark.slow
def test_a_run_whose_config_json_lacks_keys_resumes_with_todays_code(tmp_path):
  """A real run's config.json without two keys (as written before they existed) resumes: the
  rerun continues from its checkpoint and writes today's full config back."""
  workdir = tmp_path / "run"
  _launch(workdir, "--config.max_steps=2")
  _drop_keys(workdir / "config.json", "label_smoothing", "dataset.max_image_pixels")
  evaluated = subprocess.run(  # no --config: the run's config.json, the two keys at defaults
    [sys.executable, "launch.py", "--mode=eval", f"--workdir={workdir}"],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert evaluated.returncode == 0, failure(evaluated)
  assert json.loads((workdir / "eval.json").read_text())["step"] == 2
  _launch(workdir, "--config.max_steps=4")
  steps = [r["step"] for r in workdir_lib.read_run(str(workdir)).records if "train/loss" in r]
  assert steps[-1] == 4 and json.loads((workdir / "summary.json").read_text())["steps"] == 4
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # resumed: step 2 kept
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["label_smoothing"] == 0.0 and saved["dataset"]["max_image_pixels"] == 89_478_485


@pytest.mark.slow
def test_overwrite_leaves_nothing_of_the_old_run(tmp_path):
  """A 2-epoch run, analysed and evaluated, then overwritten by a 1-epoch run: the report shows
  the new run alone (no lambda_max of the old model, no old checkpoints, metrics or eval)."""
  workdir = tmp_path / "run"
  _launch(workdir, "--config.num_epochs=2")
  os.makedirs(workdir / "analysis")
  (workdir / "analysis" / "analysis.json").write_text('{"hessian": {"lambda_max": 99.0}}')
  (workdir / "analysis" / "landscape_1d.png").write_bytes(b"png")
  (workdir / "eval.json").write_text('{"top1": 0.5}')
  (workdir / "wandb_run_id").write_text("old-id\n")
  os.makedirs(workdir / "wandb" / "offline-run-old")
  assert report.load_run(str(workdir))["lambda_max"] == 99.0
  old_steps = sorted(os.listdir(workdir / "checkpoints"))

  _launch(workdir, "--config.num_epochs=1", "--overwrite")
  assert sorted(os.listdir(workdir)) == [
    "best",
    "checkpoints",
    "config.json",
    "curves.png",
    "metrics.jsonl",
    "run.lock",  # released (its holder file gone), never removed
    "summary.json",
    "wandb",
  ]
  assert os.listdir(workdir / "wandb") == ["offline-run-old"]  # wandb's history is the user's
  assert sorted(os.listdir(workdir / "checkpoints")) == ["11"] != old_steps
  run = report.load_run(str(workdir))
  assert run["lambda_max"] is None and run["planned_epochs"] == 1 and run["epochs"] == 1
  assert max(r["step"] for r in run["records"]) == 11  # 1,437 digits // 128 per epoch
  assert json.loads((workdir / "summary.json").read_text())["steps"] == 11
  assert "λ_max" not in report.markdown([run])
