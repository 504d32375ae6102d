"""The streamed recipe configs (ImageNet ResNet-50 SAM, Flowers-102 fine-tuning) load as launch.py
loads them, stay locked, and every key they set resolves in the modules that read it: the model,
the optimizer and its schedule, the streamed-input checks and the in-memory/streamed choice. No
dataset, weight file or network is touched."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common
from jaxsam import models, optim
from jaxsam.data import augment, choice, transforms
from support.paths import ROOT
from support.runs import failure

IMAGENET = os.path.join(ROOT, "configs", "imagenet_resnet50_sam.py")
FLOWERS = os.path.join(ROOT, "configs", "finetune_flowers102_sam.py")
VIT_S16 = os.path.join(ROOT, "configs", "imagenet_vit_s16_sam.py")
VIT_FINETUNE = os.path.join(ROOT, "configs", "vit_b16_sam_finetune.py")
VIT_TINY = os.path.join(ROOT, "configs", "cifar10_vit_tiny.py")
# ResNet-50's parameters with a 1000-class head (torchvision's count), and with Flowers' 102.
RESNET50_PARAMS = 25_557_032
RESNET50_102_PARAMS = RESNET50_PARAMS - 2048 * (1000 - 102) - (1000 - 102)


def parse(path: str, *overrides: str):
  """The config as launch.py's flag parses it (locked), with `--config.KEY=V` overrides."""
  argv = ["launch.py", f"--config={path}", *overrides]
  values = flags.FlagValues()
  # sys_argv: the override flags are defined from the command line they will parse.
  config_flags.DEFINE_config_file(
    "config", None, "config file", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def param_count(config, num_classes: int) -> int:
  model = models.create_model(config.model, num_classes, jnp.dtype(config.dtype))
  x = jnp.zeros((1, config.model.image_size, config.model.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(
    lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False)
  )
  return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes["params"]))


@pytest.mark.parametrize(
  "path", [IMAGENET, FLOWERS, VIT_S16, VIT_FINETUNE, VIT_TINY], ids=os.path.basename
)
def test_recipe_config_is_locked_and_overridable(path):
  config = parse(path, "--config.sam.rho=0.1", "--config.num_epochs=3")
  assert config.sam.rho == 0.1 and config.num_epochs == 3
  with pytest.raises((AttributeError, KeyError)):
    parse(path, "--config.sam.rhoo=0.1")  # a typo is refused, not added
  with pytest.raises(AttributeError):
    config.optimizer.new_key = 1


@pytest.mark.parametrize("path", [IMAGENET, FLOWERS, VIT_S16], ids=os.path.basename)
def test_recipe_config_streams_and_its_input_keys_resolve(path):
  config = parse(path)
  stream, line = choice.choose(config.dataset)
  assert stream and "streamed from files" in line
  size = config.model.image_size
  assert size == 224 and config.augment.random_resized_crop and config.augment.flip
  assert transforms.check_crop(config.augment.crop_scale, config.augment.crop_ratio) == (
    (0.08, 1.0),
    (0.75, 4.0 / 3.0),
  )
  assert transforms.eval_short_side(size, config.dataset.eval_crop_fraction) == 256
  augment.make_train_augment(config.augment, image_shape=(size, size, 3))


def test_imagenet_recipe_values_resolve():
  config = parse(IMAGENET)
  assert (config.dataset.name, config.dataset.test_split) == ("imagenet2012", "validation")
  assert param_count(config, 1000) == RESNET50_PARAMS
  steps = 1_281_167 // config.batch_size
  assert steps == 312
  tx, lr = optim.make_optimizer(config, steps, axis_name=None)
  assert float(lr(0)) == pytest.approx(1.0)  # no warm-up
  assert float(lr(steps * config.num_epochs)) == pytest.approx(0.0, abs=1e-6)  # cosine to 0
  assert config.optimizer.nesterov and config.optimizer.momentum == 0.9
  assert (config.sam.rho, config.label_smoothing, config.optimizer.weight_decay) == (
    0.05,
    0.1,
    1e-4,
  )
  params = {"w": jnp.ones((3,))}
  tx.init(params)  # the SAM chain builds from the config's keys


def test_flowers_recipe_values_resolve():
  config = parse(FLOWERS)
  assert config.model.pretrained == common.PRETRAINED_RESNET50
  assert config.model.normalization == "auto"  # torchvision weights: ImageNet mean/std
  assert param_count(config, 102) == RESNET50_102_PARAMS
  steps = 1020 // config.batch_size
  tx, lr = optim.make_optimizer(config, steps, axis_name=None)
  assert float(lr(0)) == pytest.approx(0.0)  # one warm-up epoch
  assert float(lr(steps)) == pytest.approx(0.01, rel=1e-3)
  tx.init({"w": jnp.ones((3,))})


def test_vit_s16_recipe_values_resolve():
  """The SAM-ViT recipe: AdamW 3e-3, wd 0.3 on kernels, clip 1, 10k warm-up steps, 300 epochs."""
  config = parse(VIT_S16)
  assert param_count(config, 1000) == 22_050_664  # timm's vit_small_patch16_224
  steps = 1_281_167 // config.batch_size
  tx, lr = optim.make_optimizer(config, steps, axis_name=None)
  assert float(lr(0)) == pytest.approx(0.0)
  assert float(lr(10_000)) == pytest.approx(3e-3, rel=1e-3)  # the peak after 10k steps
  assert float(lr(steps * 300)) == pytest.approx(0.0, abs=1e-8)
  assert (config.optimizer.name, config.optimizer.weight_decay) == ("adamw", 0.3)
  assert config.optimizer.grad_clip_norm == 1.0 and config.sam.rho > 0
  assert (config.num_epochs, config.batch_size, config.model.normalization) == (
    300,
    4096,
    "inception",
  )
  tx.init({"w": jnp.ones((3, 3))})


def test_vit_finetune_and_tiny_recipes_resolve():
  config = parse(VIT_FINETUNE)
  assert param_count(config, 100) == 86_567_656 - 768 * 900 - 900  # ViT-B/16, 100 classes
  steps = 50_000 // config.batch_size
  tx, lr = optim.make_optimizer(config, steps, axis_name=None)
  assert float(lr(500)) == pytest.approx(0.03, rel=1e-3)  # 500 warm-up steps
  assert abs(steps * config.num_epochs - 10_000) < steps  # the vit code's 10k steps
  assert config.optimizer.grad_clip_norm == 1.0 and config.optimizer.momentum == 0.9
  assert config.model.normalization == "auto"  # ViT weights: mean = std = 0.5
  tx.init({"w": jnp.ones((3,))})
  tiny = parse(VIT_TINY)
  assert tiny.model.name == "vit_tiny" and tiny.optimizer.name == "adamw"
  assert param_count(tiny, 10) < 500_000
  optim.make_optimizer(tiny, 12, axis_name=None)[0].init({"w": jnp.ones((3, 3))})


@pytest.mark.parametrize("path", [IMAGENET, FLOWERS], ids=os.path.basename)
def test_slurm_script_launches_the_recipe_unchanged(path, tmp_path):
  # A stand-in srun records what the job step would run; the launch.py arguments it gets must
  # parse as launch.py parses them, the config file and the overrides untouched.
  import subprocess

  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "srun.txt"
  (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
  (bin_dir / "srun").chmod(0o755)
  config = os.path.relpath(path, ROOT)
  env = dict(
    os.environ,
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    SLURM_JOB_ID="4242",
    SLURM_JOB_NUM_NODES="2",
    SLURM_GPUS_PER_NODE="4",
  )
  env.pop("WORKDIR", None)
  result = subprocess.run(
    ["bash", "scripts/slurm.sh", config, "--config.sam.rho=0.1"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    check=False,
    timeout=60,
  )
  assert result.returncode == 0, failure(result)
  argv = record.read_text().splitlines()
  name = os.path.basename(path)[:-3]
  assert argv[:3] == ["--kill-on-bad-exit=1", "python", "launch.py"]
  assert argv[3:] == [f"--config={config}", f"--workdir=runs/{name}-4242", "--config.sam.rho=0.1"]
  parsed = parse(os.path.join(ROOT, config), argv[-1])
  assert parsed.sam.rho == 0.1 and parsed.dataset.in_memory == "false"
  elsewhere = subprocess.run(
    ["bash", os.path.join(ROOT, "scripts", "slurm.sh"), config],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    check=False,
    timeout=60,
  )
  assert elsewhere.returncode == 2 and "submit from the jaxsam checkout" in elsewhere.stderr


STUDY_CONFIGS = {  # the study configs and the registered weights each names
  "sgd_cutout": "torchvision/resnet50",
  "sam_cutout": "torchvision/resnet50",
  "sgd_ra": "torchvision/resnet50",
  "sam_ra": "torchvision/resnet50",
  "sam_aa": "torchvision/resnet50",
  "effnet_b0_sam_ra": "keras/efficientnetb0",
  "finetune_flowers102_sam": "torchvision/resnet50",
  "vit_b16_sam_finetune": "timm/vit_base_patch16_224.sam_in1k",
}


@pytest.mark.parametrize("name", sorted(STUDY_CONFIGS))
def test_study_configs_name_registered_weights_that_fit_their_model(name):
  from jaxsam.models import weights

  config = parse(os.path.join(ROOT, "configs", f"{name}.py"))
  assert config.model.pretrained == STUDY_CONFIGS[name]
  entry = weights.registered(config.model.pretrained)
  weights.check_fits(entry, config.model)  # no manual step: the name fetches the right file
  # `auto` normalisation comes from the registry, without a weight file or the network.
  want = "inception" if config.model.name.startswith("vit") else "imagenet"
  assert weights.input_normalization(config.model) == want


SAM_RECIPES = [
  "cifar10_sam.py",
  "wrn28_10_sam_cutout.py",
  "imagenet_resnet50_sam.py",
  "finetune_flowers102_sam.py",
  "sam_ra.py",
  "sam_aa.py",
  "sam_cutout.py",
  "effnet_b0_sam_ra.py",
]


@pytest.mark.parametrize("name", SAM_RECIPES)
def test_sam_recipe_pins_m_and_says_where_it_comes_from(name):
  # sam.m = 0 would make the recipe a different algorithm on 1 and 8 devices; a pinned m must
  # fit the global batch on one device and its docstring must name it.
  from jaxsam import steps

  path = os.path.join(ROOT, "configs", name)
  config = parse(path)
  assert config.sam.rho > 0 and config.sam.m > 0
  assert steps.group_size(config.sam.m, config.batch_size) == config.sam.m
  with open(path) as f:
    assert "sam.m" in f.read().split('"""')[1]
