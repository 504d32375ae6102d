"""Tests for `dataset.pipeline`: the device pipeline (the train split on the devices, each step
gathered and augmented there) gives the tf.data batches bit for bit, the loop trains the same with
either, a run resumed on the other pipeline continues the same stream, and bad settings are one
line. The in-memory data is scikit-learn's digits made 32 x 32 RGB (no network).
"""

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from jaxsam import config_schema, parallel
from jaxsam.data import datasource, device_input
from jaxsam.errors import ConfigError
from support import devices
from support.paths import ROOT
from support.runs import failure


def _config(pipeline: str, **augment):
  config = common.use_randaugment(common.get_base_config(), num_ops=2, magnitude=9)
  config.dataset.name = "digits"
  config.dataset.pipeline = pipeline
  config.batch_size = 64
  config.seed = 3
  config.augment.crop_padding, config.augment.flip, config.augment.cutout_size = 4, True, 8
  for key, value in augment.items():
    config.augment[key] = value
  if config.augment.autoaugment:
    config.augment.randaugment.num_ops = 0  # one policy at a time
  return config


@pytest.fixture(scope="module")
def digits():
  return datasource.load(_config("tf"), main=False)


def _tf_batches(data, config, start, n):
  return list(itertools.islice(data.train_input(config, size=32)(start, 0, 1), n))


def _device_batches(data, config, start, n, mesh):
  """As the loop gets them: host rows sharded by DevicePrefetch, then the on-device program."""
  train = data.train_input(config, size=32, mesh=mesh)
  prefetch = parallel.DevicePrefetch(
    itertools.islice(train(start, 0, 1), n), mesh, transform=train.on_device
  )
  return [parallel.fetch(batch) for batch in prefetch]


@pytest.mark.parametrize(
  "augment",
  [{}, {"crop_fill": "constant"}, {"autoaugment": "cifar10"}],
  ids=["crop-flip-cutout-randaugment", "constant-fill", "autoaugment"],
)
def test_first_device_batches_equal_tf_batches_bitwise(digits, augment):
  mesh = parallel.make_mesh()  # 8 CPU devices: the batch is sharded 8 ways
  expected = _tf_batches(digits, _config("tf", **augment), 0, 3)
  got = _device_batches(digits, _config("device", **augment), 0, 3, mesh)
  assert len(got) == 3
  for a, b in zip(expected, got, strict=True):
    assert b["image"].dtype == np.uint8 and b["image"].shape == a["image"].shape
    np.testing.assert_array_equal(b["image"], a["image"])
    np.testing.assert_array_equal(b["label"], a["label"])
  assert not np.array_equal(got[0]["image"], got[1]["image"])  # steps differ


def test_device_batches_from_a_later_step_continue_the_tf_stream(digits):
  # Step 25 lies in the second epoch (22 steps each): a new permutation and positions past it.
  mesh = parallel.make_mesh(jax.devices()[:2])
  expected = _tf_batches(digits, _config("tf"), 25, 2)
  got = _device_batches(digits, _config("device"), 25, 2, mesh)
  for a, b in zip(expected, got, strict=True):
    np.testing.assert_array_equal(b["image"], a["image"])
    np.testing.assert_array_equal(b["label"], a["label"])


def test_train_split_is_held_once_per_process_split_over_its_devices(digits, capsys):
  """Any step may take any row, so the process holds them all, once: each of its 8 devices a
  contiguous eighth (the last padded), and the start-up line says so with the bytes."""
  mesh = parallel.make_mesh()
  train = digits.train_input(_config("device"), size=32, mesh=mesh, main=True)
  line = capsys.readouterr().out.strip()
  images = digits.arrays.train.images
  assert train.images.dtype == np.uint8 and train.local == 8
  shards = sorted(train.images.addressable_shards, key=lambda s: s.index[0].start or 0)
  per_device = -(-len(images) // 8)
  assert [s.data.shape[0] for s in shards] == [per_device] * 8
  held = np.concatenate([np.asarray(s.data) for s in shards])
  np.testing.assert_array_equal(held[: len(images)], images)
  assert not held[len(images) :].any()  # the padding rows are zeros, never gathered
  assert train.bytes_per_device() == per_device * images[0].nbytes
  assert line.startswith("jaxsam: input pipeline device (dataset.pipeline=device)")
  mib = images.nbytes / 2**20
  assert f"uint8 ({mib:.1f} MiB) replicated once per process (1 copy:" in line
  assert f"over each process's 8 device(s) ({per_device * images[0].nbytes / 2**20:.1f} MiB" in line


def test_auto_picks_tf_when_tensorflow_is_importable_and_says_why(digits, capsys):
  train = digits.train_input(_config("auto"), size=32, main=True)
  assert not hasattr(train, "on_device")
  assert "tf.data on the host (dataset.pipeline=auto: TensorFlow is importable)" in (
    capsys.readouterr().out
  )


def test_auto_picks_device_when_tensorflow_is_blocked():
  code = (
    "import sys; sys.modules['tensorflow'] = None\n"
    "from jaxsam.data import device_input\n"
    "import ml_collections\n"
    "print(device_input.resolve_pipeline(ml_collections.ConfigDict({'pipeline': 'auto'}), False))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout
  assert "('device', 'dataset.pipeline=auto: TensorFlow is not importable')" in out


def test_device_with_streamed_data_is_one_line_error():
  config = _config("device")
  with pytest.raises(ConfigError, match="dataset.pipeline='device' needs the train split in"):
    device_input.resolve_pipeline(config.dataset, streamed=True)
  assert device_input.resolve_pipeline(_config("auto").dataset, streamed=True)[0] == "tf"


def test_streamed_source_asked_for_device_is_one_line_error(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for i in range(8):
      folder = tmp_path / "set" / split / f"c{i % 2}"
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
  config = _config("device")
  config.batch_size = 4
  config.dataset.source, config.dataset.name = "image_folder", "set"
  config.dataset.path, config.dataset.cache_dir = str(tmp_path / "set"), str(tmp_path / "cache")
  config.dataset.in_memory = "false"
  streamed = datasource.load(config, main=False)
  assert isinstance(streamed, datasource.Streamed)
  with pytest.raises(ConfigError) as error:
    streamed.train_input(config, size=16)
  assert "\n" not in str(error.value) and "dataset.in_memory='true'" in str(error.value)


def test_unknown_pipeline_is_rejected_by_the_schema():
  config = _config("gpu")
  with pytest.raises(ConfigError, match="dataset.pipeline"):
    config_schema.validate(config, num_devices=1)


# launch.py in a process where TensorFlow, tensorflow_datasets and wandb cannot be imported.
BLOCKED = (
  "import runpy, sys\n"
  "for name in ('tensorflow', 'tensorflow_datasets', 'wandb'): sys.modules[name] = None\n"
  "sys.argv = sys.argv[1:]\n"
  "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _launch(workdir, *extra, blocked=False):
  env = dict(os.environ, XLA_FLAGS=devices.xla_flags(2))
  return subprocess.run(
    [
      sys.executable,
      *(["-c", BLOCKED] if blocked else []),
      os.path.join(ROOT, "launch.py"),
      "--config=configs/quickstart.py",
      f"--workdir={workdir}",
      "--config.seed=5",
      "--config.model.image_size=8",
      "--config.log_every_steps=1",
      "--config.progress_bar=False",
      "--config.wandb.mode=disabled",
      "--config.augment.cutout_size=6",
      *extra,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    check=False,
  )


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_launch_trains_the_same_losses_with_either_pipeline(tmp_path):
  losses = {}
  for name in ("tf", "device"):
    workdir = str(tmp_path / name)
    result = _launch(workdir, "--config.max_steps=3", f"--config.dataset.pipeline={name}")
    assert result.returncode == 0, failure(result)
    assert f"jaxsam: input pipeline {'device' if name == 'device' else 'tf.data'}" in (
      result.stdout
    )
    losses[name] = _losses(workdir)
  assert sorted(losses["tf"]) == [1, 2, 3]
  assert losses["device"] == losses["tf"]


@pytest.mark.slow
def test_launch_trains_on_digits_with_tensorflow_tfds_and_wandb_blocked(tmp_path):
  # dataset.pipeline=auto picks the device pipeline; the run trains, evaluates, checkpoints and
  # summarises, with the losses of the tf.data run (test_launch_trains_the_same_losses...).
  blocked, plain = str(tmp_path / "blocked"), str(tmp_path / "plain")
  result = _launch(blocked, "--config.max_steps=3", blocked=True)
  assert result.returncode == 0, failure(result)
  assert "input pipeline device (dataset.pipeline=auto: TensorFlow is not importable)" in (
    result.stdout
  )
  for name in ("summary.json", "curves.png", "checkpoints"):
    assert os.path.exists(os.path.join(blocked, name)), name
  plain_run = _launch(plain, "--config.max_steps=3", "--config.dataset.pipeline=tf")
  assert plain_run.returncode == 0, failure(plain_run)
  assert _losses(blocked) == _losses(plain)
  # Evaluation, the report and the analysis of that run, all with the three blocked.
  evaluated = _launch(blocked, "--config.max_steps=3", "--mode=eval", blocked=True)
  assert evaluated.returncode == 0, failure(evaluated)
  assert os.path.exists(os.path.join(blocked, "eval.json"))
  for module, args in (
    ("jaxsam.report", [blocked]),
    (
      "jaxsam.analyze",
      [f"--workdir={blocked}", "--what=hessian", "--top_k=1", "--hessian_iters=3"],
    ),
  ):
    done = _blocked_module(module, *args)
    assert done.returncode == 0, (module, failure(done))
  assert os.path.isdir(os.path.join(blocked, "analysis"))


def _blocked_module(module, *args):
  """`python -m module args` with TensorFlow, tensorflow_datasets and wandb blocked."""
  code = (
    "import runpy, sys\n"
    "for name in ('tensorflow', 'tensorflow_datasets', 'wandb'): sys.modules[name] = None\n"
    f"sys.argv = [{module!r}, *sys.argv[1:]]\n"
    f"runpy.run_module({module!r}, run_name='__main__')"
  )
  return subprocess.run(
    [sys.executable, "-c", code, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
    env=dict(os.environ, PYTHONPATH=ROOT),
  )


def test_tfds_name_without_tensorflow_is_one_line_error(tmp_path):
  workdir = str(tmp_path / "run")
  result = _launch(workdir, "--config.dataset.name=cifar10", blocked=True)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: dataset.name='cifar10' is read through tfds, which needs")
  assert not os.path.exists(workdir)


def test_streaming_and_wandb_without_tensorflow_or_wandb(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel

  for split in ("train", "test"):
    for i in range(4):
      folder = tmp_path / "set" / split / f"c{i % 2}"
      folder.mkdir(parents=True, exist_ok=True)
      Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
  code = f"""
import sys
for name in ('tensorflow', 'tensorflow_datasets', 'wandb'): sys.modules[name] = None
from configs import common
from jaxsam import errors, writers
from jaxsam import workdir as workdir_lib
import jaxsam.data
config = common.get_base_config()
config.dataset.source, config.dataset.name = 'image_folder', 'set'
config.dataset.path, config.dataset.in_memory = {str(tmp_path / "set")!r}, 'false'
config.dataset.cache_dir = {str(tmp_path / "cache")!r}
try:
  jaxsam.data.load(config, main=False)
except errors.ConfigError as e:
  print('streaming:', e)
config.wandb.mode = 'online'
run_dir = workdir_lib.RunDir({str(tmp_path)!r})
print('writer:', writers.create_wandb_writer(config.wandb, run_dir, {{}}, environ={{}}))
"""
  done = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
  )
  assert done.returncode == 0, failure(done)
  assert "streaming: dataset 'set' streams from its files, which needs TensorFlow" in done.stdout
  assert "writer: None" in done.stdout
  assert "warning: wandb is not installed: wandb.mode=online runs as disabled" in done.stderr


@pytest.mark.slow
def test_resume_on_the_other_pipeline_continues_the_same_stream(tmp_path):
  whole = str(tmp_path / "whole")
  whole_run = _launch(whole, "--config.max_steps=4", "--config.dataset.pipeline=tf")
  assert whole_run.returncode == 0, failure(whole_run)
  split = str(tmp_path / "split")
  # Checkpoint at step 2 (max_steps ends the run with a save), then resume on the device.
  first = _launch(split, "--config.max_steps=2", "--config.dataset.pipeline=tf")
  assert first.returncode == 0, failure(first)
  second = _launch(split, "--config.max_steps=4", "--config.dataset.pipeline=device")
  assert second.returncode == 0, failure(second)
  assert "resuming at step 2" in second.stdout
  assert _losses(split) == _losses(whole)


@pytest.mark.parametrize("source", ["cifar_python", "image_folder"])
def test_in_memory_sources_train_without_tensorflow_with_the_tf_batches(tmp_path, source):
  # cifar_python (pickled batches) and an image folder decoded by PIL, loaded and augmented in a
  # process where TensorFlow, tfds and wandb cannot be imported: the first batch is tf.data's.
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from support.cifar_files import write_cifar  # pylint: disable=import-outside-toplevel

  config = _config("tf")
  config.batch_size = 8
  config.dataset.name, config.dataset.source = "cifar10", source
  config.dataset.cache_dir, config.dataset.in_memory = str(tmp_path / "cache"), "true"
  if source == "cifar_python":
    path = write_cifar(tmp_path, "cifar-10-batches-py", False, np.random.default_rng(0))[0]
  else:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
      for i in range(12):
        folder = tmp_path / "set" / split / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    path, config.dataset.name = tmp_path / "set", "set"
  config.dataset.path = str(path)
  out = tmp_path / "device.npy"
  code = f"""
import sys
for name in ('tensorflow', 'tensorflow_datasets', 'wandb'): sys.modules[name] = None
import numpy as np, ml_collections
from jaxsam import parallel
import jaxsam.data
config = ml_collections.ConfigDict({config.to_dict()!r})
config.dataset.pipeline = 'auto'
data = jaxsam.data.load(config, main=False)
train = data.train_input(config, size=0, main=True)
mesh = parallel.make_mesh()
batch = next(parallel.DevicePrefetch(train(0, 0, 1), mesh, transform=train.on_device))
np.save({str(out)!r}, parallel.fetch(batch['image']))
"""
  done = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
  )
  assert done.returncode == 0, failure(done)
  assert "input pipeline device (dataset.pipeline=auto: TensorFlow is not importable)" in (
    done.stdout
  )
  data = datasource.load(config, main=False)
  expected = next(data.train_input(config, size=0)(0, 0, 1))["image"]
  np.testing.assert_array_equal(np.load(out), expected)


def test_quiet_start_and_auto_where_tensorflow_is_not_installed():
  # Not installed (no entry in sys.modules, the import machinery finds nothing): the command-line
  # quiet start, which imports TensorFlow to silence it, goes on, and auto picks the device.
  code = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] == 'tensorflow':
      raise ModuleNotFoundError(f'No module named {name!r}')
sys.meta_path.insert(0, Absent())
from jaxsam import quiet
quiet.quiet_start()
from jaxsam.data import device_input
print(device_input.tensorflow_importable(), 'tensorflow' in sys.modules)
"""
  done = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
    env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
  )
  assert done.returncode == 0, failure(done)
  assert done.stdout.split() == ["False", "False"]


def test_the_loop_runs_the_device_gather_as_its_own_program_unless_fused(digits):
  """FUSE_INTO_STEP off (bench/device_fusion.py: no faster fused): the gather + augment is
  DevicePrefetch's transform and the step the tf.data one; fused, the step is wrapped instead;
  tf.data input has neither."""
  train = digits.train_input(_config("device"), size=32, mesh=parallel.make_mesh())
  assert not device_input.FUSE_INTO_STEP and not train.fused
  assert device_input.loop_parts(train) == (train.on_device, None)
  train.fused = True
  assert device_input.loop_parts(train) == (None, train.fuse)
  assert device_input.loop_parts(digits.train_input(_config("tf"), size=32)) == (None, None)
