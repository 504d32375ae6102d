"""The table of config domains: it covers every key, every shipped config lies inside it, and for
every key an out-of-domain value is one line naming the key, the value and what is accepted,
before any folder exists (in process for the whole table, through launch.py for a handful)."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import common, quickstart
from jaxsam import analyze, config_schema, errors, evaluate, study, train
from jaxsam import workdir as workdir_lib
from support import devices
from support.paths import ROOT

CONFIG_FILES = sorted(
  p
  for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
  if os.path.basename(p) not in ("common.py", "__init__.py")
)


def load_config(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def with_value(config, key, value) -> ml_collections.ConfigDict:
  """A copy of `config` with `key` set to `value`, whatever its type (as config.json may hold)."""
  tree = config.to_dict()
  node, *path = [tree, *key.split(".")]
  for part in path[:-1]:
    node = node[part]
  node[path[-1]] = value
  return ml_collections.ConfigDict(tree)


def test_every_config_key_has_a_domain_and_every_domain_a_key():
  """A key added to configs/common.py without a domain fails here."""
  keys = set(config_schema.flatten(common.get_base_config()))
  assert keys - set(config_schema.DOMAINS) == set(), "keys without a domain"
  assert set(config_schema.DOMAINS) - keys == set(), "domains of keys that do not exist"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_shipped_config_and_default_is_inside_its_domains(path):
  assert config_schema.problems(load_config(path)) == []
  assert config_schema.problems(common.get_base_config(), num_devices=2) == []


@pytest.mark.parametrize("key", sorted(config_schema.DOMAINS))
def test_every_key_out_of_domain_is_one_line_before_any_folder(key, tmp_path):
  """The walk: each key's out-of-domain value through `train_and_evaluate`, launch.py's entry."""
  domain = config_schema.DOMAINS[key]
  config = with_value(quickstart.get_config(), key, domain.outside)
  assert not domain.ok(domain.outside)
  workdir = tmp_path / "w"
  with pytest.raises(errors.ConfigError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"{key}={domain.outside!r} is invalid; accepted: "), message
  assert domain.accepted in message and domain.accepted
  assert not os.path.exists(workdir)


@pytest.mark.parametrize(
  "overrides,fragment",
  [
    ({"batch_size": 63}, "batch_size=63 is invalid; accepted: a multiple of the device count 8"),
    ({"eval_batch_size": 100}, "eval_batch_size=100 is invalid; accepted: a multiple of the"),
    ({"batch_size": 64, "accum_steps": 3}, "accum_steps=3 is invalid; accepted: an integer >= 1"),
    (
      {"augment.autoaugment": "cifar10", "augment.randaugment.num_ops": 2},
      "are both set; accepted: one of them",
    ),
  ],
)
def test_relations_between_keys_and_devices(overrides, fragment, tmp_path):
  config = quickstart.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(errors.ConfigError, match=fragment):
    train.train_and_evaluate(config, str(tmp_path / "w"))  # conftest: 8 CPU devices
  assert not os.path.exists(tmp_path / "w")


def test_in_memory_takes_any_case_as_the_streaming_module_does():
  config = quickstart.get_config()
  for value in ("True", "FALSE", "auto"):
    config.dataset.in_memory = value
    assert config_schema.problems(config) == []


def test_every_violation_is_listed_and_the_error_counts_the_rest():
  config = with_value(quickstart.get_config(), "log_every_steps", 0)
  config = with_value(config, "num_epochs", -1)
  assert sorted(config_schema.problems(config)) == [
    "log_every_steps=0 is invalid; accepted: an integer >= 1",
    "num_epochs=-1 is invalid; accepted: an integer >= 1",
  ]
  with pytest.raises(errors.ConfigError, match=r"\(and 1 more\)"):
    config_schema.validate(config)


def test_eval_and_analyze_check_the_runs_config_json_before_the_lock_or_a_checkpoint(tmp_path):
  tree = quickstart.get_config().to_dict()
  tree["optimizer"]["weight_decay"] = -1.0
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(tree))
  with pytest.raises(errors.ConfigError, match=r"optimizer.weight_decay=-1.0 is invalid"):
    evaluate.evaluate_checkpoint(None, str(tmp_path))
  with pytest.raises(errors.ConfigError, match=r"optimizer.weight_decay=-1.0 is invalid"):
    analyze.analyze(str(tmp_path))
  assert os.listdir(tmp_path) == [workdir_lib.CONFIG_FILE]


def test_study_checks_every_planned_run_before_any_folder(tmp_path):
  runs = study.plan(study.SIZES["cpu"], str(tmp_path), str(tmp_path / "out"), seeds=[-1])
  with pytest.raises(errors.ConfigError, match=r"run sgd-noise0-seed-1: seed=-1 is invalid"):
    study.check_configs(runs, ROOT)
  study.check_configs(study.plan(study.SIZES["cpu"], str(tmp_path), str(tmp_path), [0]), ROOT)
  assert not os.path.exists(tmp_path / "out")


def launch(*args):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch.py"), *args],
    cwd=ROOT,
    check=False,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, XLA_FLAGS=devices.xla_flags(2)),
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "override,line",
  [
    ("log_every_steps=0", "log_every_steps=0 is invalid; accepted: an integer >= 1"),
    ("num_epochs=0", "num_epochs=0 is invalid; accepted: an integer >= 1"),
    ("max_steps=-5", "max_steps=-5 is invalid; accepted: an integer >= 0"),
    ("checkpoint_keep=0", "checkpoint_keep=0 is invalid; accepted: an integer >= 1"),
    (
      "optimizer.learning_rate=-0.1",
      "optimizer.learning_rate=-0.1 is invalid; accepted: a finite number >= 0",
    ),
  ],
)
def test_launch_exits_2_with_the_line_and_no_folder(override, line, tmp_path):
  result = launch(
    "--config=configs/quickstart.py", f"--workdir={tmp_path}/w", f"--config.{override}"
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == f"error: {line}"
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_study_exits_2_on_an_out_of_domain_run_and_writes_nothing(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxsam.study",
      "--size=cpu",
      f"--data={ROOT}",
      f"--out={tmp_path}/out",
      "--seeds=-1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert "seed=-1 is invalid; accepted: an integer >= 0" in result.stderr.splitlines()[-1]
  assert not os.path.exists(tmp_path / "out")
