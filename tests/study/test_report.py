"""`python -m jaxsam.report` on two tiny real runs (SGD + crop/flip, SAM + Cutout)."""

import json
import os
import subprocess
import sys

import pytest

from jaxsam import plots, report, writers
from jaxsam import workdir as workdir_lib
from support import devices
from support.paths import ROOT
from support.runs import failure

TINY = [
  "--config=configs/quickstart.py",
  "--config.num_epochs=1",
  "--config.max_steps=3",
  "--config.model.image_size=8",
  "--config.model.width=4",
  "--config.batch_size=128",
  "--config.eval_batch_size=128",
  "--config.progress_bar=false",
  "--config.wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("report")
  env = dict(
    os.environ, XLA_FLAGS=devices.xla_flags(2), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2"
  )
  no_ra = "--config.augment.randaugment.num_ops=0"
  variants = {
    "sgd": ["--config.sam.rho=0.0", no_ra],
    "sam": ["--config.sam.rho=0.05", no_ra, "--config.augment.cutout_size=4"],
  }
  procs = {
    name: subprocess.Popen(
      [sys.executable, "launch.py", f"--workdir={tmp / name}", *TINY, *extra],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for name, extra in variants.items()
  }
  for proc in procs.values():
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
  os.makedirs(tmp / "sam" / "analysis")
  with open(tmp / "sam" / "analysis" / "analysis.json", "w") as f:
    json.dump({"hessian": {"lambda_max": 12.5}}, f)
  return str(tmp / "sgd"), str(tmp / "sam")


def _final_accuracy(run_dir):
  return [
    r for r in writers.read_metrics(workdir_lib.RunDir(run_dir).metrics) if "test/accuracy" in r
  ][-1]["test/accuracy"]


@pytest.mark.slow
def test_report_table_and_curves(run_dirs, tmp_path):
  sgd, sam = run_dirs
  out_png = tmp_path / "combined.png"
  proc = subprocess.run(
    [sys.executable, "-m", "jaxsam.report", sgd, sam, f"--output={out_png}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, failure(proc)
  lines = proc.stdout.splitlines()
  a, b = (f"{100 * _final_accuracy(d):.2f}" for d in (sgd, sam))
  # One test eval per run: best == final.
  assert "| augmentation | SGD | SAM(ρ=0.05) |" in lines
  assert f"| crop | {a} / {a} |  |" in lines
  assert f"| cutout |  | {b} / {b} |" in lines
  header = next(line for line in lines if line.startswith("| # |"))
  # m: the examples per SAM ascent the run used (64 per device here; – for SGD); then the fit
  # of the train labels at the end, from summary.json.
  assert header == (
    "| # | run | augmentation | optimizer | augment.cutout_size | sam.rho | epochs "
    "| best % | final % | λ_max | m | train acc, given labels % |"
  )
  fits = [f"{100 * report.load_run(d)['train_fit']:.2f}" for d in (sgd, sam)]
  assert f"| 1 | sgd | crop | SGD | 0 | 0.0 | 1/1 | {a} | {a} | – | – | {fits[0]} |" in lines
  assert (
    f"| 2 | sam | cutout | SAM(ρ=0.05) | 4 | 0.05 | 1/1 | {b} | {b} | 12.5 | 64 | {fits[1]} |"
    in lines
  )
  from PIL import Image

  with Image.open(out_png) as image:
    assert image.format == "PNG"


def _reject(token):
  raise ValueError(f"non-JSON constant {token}")


def _strict_lines(path):
  """Every line of a JSON-lines file, parsed without the NaN / Infinity tokens JSON lacks."""
  with open(path) as f:
    return [json.loads(line, parse_constant=_reject) for line in f]


def _is_number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool)


@pytest.mark.slow
def test_metrics_hold_numbers_only_and_sam_keys_only_with_sam(run_dirs):
  sgd, sam = run_dirs
  for run_dir in run_dirs:
    records = _strict_lines(workdir_lib.RunDir(run_dir).metrics)
    assert records
    for r in records:
      for k, v in r.items():
        assert v is None or _is_number(v), (run_dir, k, v)
    with open(os.path.join(run_dir, "summary.json")) as f:
      summary = json.load(f, parse_constant=_reject)
    assert not any(isinstance(v, str) for v in summary.values()), summary
  plain = _strict_lines(workdir_lib.RunDir(sgd).metrics)
  assert not [k for r in plain for k in r if k.startswith("sam/")]
  train = [r for r in _strict_lines(workdir_lib.RunDir(sam).metrics) if "train/loss" in r]
  sam_keys = {
    "sam/rho",
    "sam/perturbed_loss",
    "sam/gap",
    "sam/clean_grad_norm",
    "sam/grad_norm",
    "sam/cosine",
  }
  assert train and all(sam_keys <= set(r) for r in train)
  assert all(_is_number(r[k]) for r in train for k in sam_keys)


@pytest.mark.slow
def test_report_reads_metrics_with_nonfinite_strings(run_dirs, tmp_path):
  """A metrics.jsonl holding non-finite values as "nan" / "inf" strings still loads and plots."""
  sgd, _ = run_dirs
  old = tmp_path / "old"
  os.makedirs(old)
  with open(os.path.join(sgd, "config.json")) as f:
    (old / "config.json").write_text(f.read())
  with open(old / workdir_lib.METRICS_FILE, "w") as f:
    f.write(
      '{"step": 2, "epoch": 0.5, "train/loss": 2.0, "train/accuracy": 0.25, "lr": 0.1, '
      '"sam/rho": 0.0, "sam/perturbed_loss": "nan", "sam/gap": "nan"}\n'
      '{"step": 4, "epoch": 1.0, "train/loss": "inf", "train/accuracy": 0.5, "lr": 0.1, '
      '"sam/perturbed_loss": "nan", "sam/gap": "-inf"}\n'
      '{"step": 4, "epoch": 1, "test/loss": 1.5, "test/accuracy": 0.625, "test/top5": 1.0}\n'
    )
  run = report.load_run(str(old))
  assert run["best"] == run["final"] == 0.625 and run["epochs"] == 1
  assert "| crop | 62.50 / 62.50 |" in report.markdown([run])
  out_png = tmp_path / "old.png"
  report.write_report_curves([run], str(out_png))
  plots.write_curves({"": run["records"]}, str(tmp_path / "curves.png"))
  from PIL import Image

  for png in (out_png, tmp_path / "curves.png"):
    with Image.open(png) as image:
      assert image.format == "PNG"


def test_labels_from_config():
  base = {
    "optimizer": {"name": "sgd"},
    "sam": {"rho": 0.0, "variant": "sam"},
    "augment": {"cutout_size": 0, "randaugment": {"num_ops": 0}, "autoaugment": ""},
  }
  assert report.augmentation_label(base) == "crop-flip"
  flips_only = json.loads(json.dumps(base))
  flips_only["augment"].update(crop_padding=0, flip=True)
  assert report.augmentation_label(flips_only) == "flip"
  flips_only["augment"]["flip"] = False
  assert report.augmentation_label(flips_only) == "none"
  assert report.optimizer_label(base) == "SGD"
  ra = json.loads(json.dumps(base))
  ra["augment"]["randaugment"]["num_ops"] = 2
  ra["augment"]["cutout_size"] = 16
  assert report.augmentation_label(ra) == "randaugment+cutout"
  aa = json.loads(json.dumps(base))
  aa["augment"]["autoaugment"] = "cifar10"
  assert report.augmentation_label(aa) == "autoaugment"
  gsam = json.loads(json.dumps(base))
  gsam["sam"] = {"rho": 0.1, "variant": "gsam"}
  assert report.optimizer_label(gsam) == "GSAM(ρ=0.1)"
  gsam["optimizer"]["name"] = "adamw"
  assert report.optimizer_label(gsam) == "AdamW+GSAM(ρ=0.1)"


def test_not_a_run_dir_is_one_line_exit_2(tmp_path, capsys):
  assert report.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert (
    err == f"error: {tmp_path} is not a run folder (no config.json); give workdirs of "
    "launch.py runs"
  )


def test_sweep_grid_renders_valid_launch_flags():
  """Every grid point of sweeps/lr_wd_rho.yaml, rendered by wandb's own `${args}` code, parses as
  launch.py's locked --config.* overrides and sets the intended values."""
  import itertools

  import yaml
  from absl import flags
  from ml_collections import config_flags
  from wandb.sdk.launch.sweeps import utils as sweep_utils

  with open(os.path.join(ROOT, "sweeps", "lr_wd_rho.yaml")) as f:
    sweep = yaml.safe_load(f)
  assert sweep["method"] == "grid" and sweep["program"] == "launch.py"
  params = sweep["parameters"]
  grid = {k: v["values"] for k, v in params.items() if "values" in v}
  fixed = {k: v["value"] for k, v in params.items() if "value" in v}
  assert set(grid) == {
    "config.optimizer.learning_rate",
    "config.optimizer.weight_decay",
    "config.sam.rho",
  }
  config_arg = next(a for a in sweep["command"] if a.startswith("--config="))
  points = list(itertools.product(*grid.values()))
  assert len(points) == 27
  for point in points:
    values = {**dict(zip(grid, point)), **fixed}
    args = sweep_utils.create_sweep_command_args(
      {"args": {k: {"value": v} for k, v in values.items()}}
    )["args"]
    argv = ["launch.py", config_arg, *args]
    flag_values = flags.FlagValues()
    # As launch.py defines it; sys_argv: the override flags are registered from the argv at hand.
    config_flags.DEFINE_config_file(
      "config", None, flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
      flag_values(argv)
    finally:
      os.chdir(cwd)
    config = flag_values.config
    assert config.optimizer.learning_rate == values["config.optimizer.learning_rate"]
    assert config.optimizer.weight_decay == values["config.optimizer.weight_decay"]
    assert config.sam.rho == values["config.sam.rho"]
