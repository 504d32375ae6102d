"""Pretrained import proven against the source frameworks: torchvision and Keras compute the same logits.

Each reference model gets random weights (BN running statistics too, so a wrong mapping shows),
is saved in its real file format, imported through `load_pretrained`, and run on the same batch.
"""

import os
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsam import models
from jaxsam.convert import convert
from jaxsam.errors import PretrainedError
from jaxsam.models import pretrained

# torchvision imports triton (through torch._dynamo), whose bundled LLVM segfaults the process when
# TensorFlow was imported first, as other test modules do; these CPU tests never use triton.
sys.modules.setdefault("triton", None)
torch = pytest.importorskip("torch")  # CI installs the torch extra; this skips only without it
torchvision = pytest.importorskip("torchvision")
keras = pytest.importorskip("keras")

SIZE = 112  # 112 -> ... -> 7 -> 4: stride-2 convs meet both even and odd inputs
BATCH = 2
LOGIT_TOL = 1e-4
# Train mode normalises with statistics of a 2-image batch (32 values per channel in the last
# stage), which amplifies float32 reduction-order differences between TF and XLA; torch agrees to
# LOGIT_TOL, Keras' ResNet50 to ~1.2e-4 on its random weights.
TRAIN_LOGIT_TOL = 3e-4


def model_config(name: str, **kw) -> ml_collections.ConfigDict:
  cfg = {"name": name, "resnet_v1": False, "dropout_rate": -1.0, "drop_connect_rate": -1.0}
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def random_batch(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)


def flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def init_zeros(module, x):
  """Variables of the right structure without compiling an init (every tensor is replaced)."""
  shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, train=False))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def forward(module, variables, x):
  """(eval logits, train logits, batch_stats after one train-mode step)."""

  def both(v):  # one program, one compile
    eval_logits = module.apply(v, x, train=False)
    train_logits, state = module.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
    )
    return eval_logits, train_logits, state

  eval_logits, train_logits, state = jax.jit(both)(variables)
  return np.asarray(eval_logits), np.asarray(train_logits), flat(state["batch_stats"])


def param_count(module) -> int:
  x = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, train=False))
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"]))


# --------------------------------------------------------------------------------------- torch


def randomise_torch_bn(model, seed: int) -> None:
  """Random BN scales/offsets; running statistics from a calibration batch, slightly perturbed.

  Calibrating keeps activations O(1) through 50 layers (logits of a few units, as a trained net's),
  so the 1e-4 tolerance tests the mapping rather than float32 rounding of huge logits; the stats
  are still per-channel values far from torch's defaults (0 and 1), so a wrong mapping shows.
  """
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for m in bns:
    with torch.no_grad():
      m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
      m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    m.reset_running_stats()
    m.momentum = None  # cumulative average: one batch sets the running stats to its statistics
  with torch.no_grad():
    model.train()(torch.randn(8, 3, SIZE, SIZE, generator=g))
  for m in bns:
    m.momentum = 0.1
    with torch.no_grad():
      noise = torch.randn(m.num_features, generator=g) * 0.05  # in units of the channel's std
      m.running_mean.add_(noise * m.running_var.sqrt())
      m.running_var.mul_(torch.rand(m.num_features, generator=g) * 0.2 + 0.9)


def bn_element_counts(model, x) -> dict:
  """{torch BN name: elements per channel in the batch}, from forward hooks (for Bessel's factor)."""
  counts, hooks = {}, []
  for name, m in model.named_modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      hooks.append(m.register_forward_hook(
        lambda mod, inp, out, name=name: counts.__setitem__(name, inp[0].numel() // inp[0].shape[1])
      ))
  with torch.no_grad():
    model.eval()(x)
  for h in hooks:
    h.remove()
  return counts


def check_against_torch(torch_model, name: str, tmp_path, seed: int):
  torch.manual_seed(seed)
  randomise_torch_bn(torch_model, seed)
  torch_model.eval()
  state = {k: v.clone().contiguous() for k, v in torch_model.state_dict().items()}
  from safetensors.torch import save_file

  save_file(state, tmp_path / "w.safetensors")
  torch.save(state, tmp_path / "w.pth")

  # No dropout / drop-connect, so train-mode logits are deterministic on both sides.
  module = models.create_model(model_config(name, dropout_rate=0.0, drop_connect_rate=0.0), 1000)
  family = "efficientnet" if name.startswith("efficientnet") else "resnet"
  assert param_count(module) == sum(p.numel() for p in torch_model.parameters())
  x = random_batch(seed)
  fresh = init_zeros(module, x)
  variables = pretrained.load_pretrained(tmp_path / "w.safetensors", name, fresh)
  from_pth = pretrained.load_pretrained(tmp_path / "w.pth", name, fresh)
  jax.tree.map(np.testing.assert_array_equal, variables, from_pth)

  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  counts = bn_element_counts(torch_model, xt)
  with torch.no_grad():
    ref_eval = torch_model.eval()(xt).numpy()
    ref_train = torch_model.train()(xt).numpy()
  eval_logits, train_logits, stats = forward(module, variables, x)
  assert np.abs(ref_eval).max() > 1e-2  # the comparison is not vacuous
  np.testing.assert_allclose(eval_logits, ref_eval, rtol=0, atol=LOGIT_TOL)
  np.testing.assert_allclose(train_logits, ref_train, rtol=0, atol=LOGIT_TOL)

  # Running statistics after one train step. torch updates the variance with the unbiased batch
  # variance, Flax with the biased one (the one both normalise with): undo Bessel's factor.
  new_state = torch_model.state_dict()
  updated, _ = pretrained.map_torch({k: v.numpy() for k, v in new_state.items()}, family)
  before, _ = pretrained.map_torch({k: v.numpy() for k, v in state.items()}, family)
  n_by_name, _ = pretrained.map_torch(
    {f"{k}.running_var": np.full(1, n, np.float32) for k, n in counts.items()}, "efficientnet" if "eff" in name else "resnet"
  )
  for key, value in stats.items():
    ref = updated[f"batch_stats/{key}"]
    if key.endswith("/var"):
      n = n_by_name[f"batch_stats/{key}"][0]
      old = 0.9 * before[f"batch_stats/{key}"]
      np.testing.assert_allclose((value - old) * n / (n - 1), ref - old, rtol=1e-3, atol=1e-5, err_msg=key)
    else:
      np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-5, err_msg=key)
  return variables


@pytest.mark.slow
def test_resnet50_matches_torchvision(tmp_path):
  ref = torchvision.models.resnet50(weights=None)
  variables = check_against_torch(ref, "resnet50", tmp_path, seed=0)
  # A converted file loads to the same variables, in both of jaxsam's formats.
  for out in ("c.safetensors", "c.msgpack"):
    convert("resnet50", str(tmp_path / "w.pth"), str(tmp_path / out))
    again = pretrained.load_pretrained(tmp_path / out, "resnet50", variables)
    jax.tree.map(np.testing.assert_array_equal, variables, again)


@pytest.mark.slow
def test_efficientnet_b0_matches_torchvision(tmp_path):
  ref = torchvision.models.efficientnet_b0(weights=None, dropout=0.0, stochastic_depth_prob=0.0)
  check_against_torch(ref, "efficientnet_b0_torchvision", tmp_path, seed=1)


# --------------------------------------------------------------------------------------- Keras


def randomise_keras(model, x_calibrate: np.ndarray, seed: int) -> None:
  """As `randomise_torch_bn`, for Keras: random BN affine and conv biases, calibrated statistics."""
  rng = np.random.default_rng(seed)
  bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D) and layer.use_bias and layer.name.endswith("_conv"):
      kernel, bias = layer.get_weights()  # ResNet50's conv biases: zero at init, so randomise
      layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
    if isinstance(layer, keras.layers.Dropout):
      layer.rate = 0.0  # deterministic train-mode logits, as the Flax side with rates 0
  for layer in bns:
    gamma, beta, mean, var = layer.get_weights()
    layer.set_weights([rng.uniform(0.5, 1.0, gamma.shape), rng.normal(0, 0.1, beta.shape), mean, var])
    layer.momentum = 0.0  # one training call sets the moving statistics to the batch's
  model(x_calibrate, training=True)
  for layer in bns:
    layer.momentum = 0.99
    gamma, beta, mean, var = layer.get_weights()
    mean = mean + rng.normal(0, 0.05, mean.shape) * np.sqrt(var)
    var = var * rng.uniform(0.9, 1.1, var.shape)
    layer.set_weights([gamma, beta, mean.astype(np.float32), var.astype(np.float32)])


def keras_weights(model) -> dict:
  """The model's weights under 'layer/variable' names, as the weight-file readers return them."""
  return {f"{l.name}/{w.name}": np.asarray(w) for l in model.layers for w in l.weights}


def save_legacy_h5(model, path) -> None:
  """The legacy save_weights layout of Keras' official ImageNet files (efficientnetb0.h5, ...)."""
  import h5py
  from keras.src.legacy.saving import legacy_h5_format

  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)


def check_against_keras(ref, name: str, files: list, config_kw: dict, family: str, seed: int):
  x_raw = np.random.default_rng(seed).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
  randomise_keras(ref, np.random.default_rng(seed + 100).normal(size=(8, SIZE, SIZE, 3)), seed)
  # EfficientNet's own input Rescaling/Normalization layers: the Flax model sees their output.
  norm = [l for l in ref.layers if isinstance(l, keras.layers.Normalization)]
  x = np.asarray(keras.Model(ref.inputs, norm[0].output)(x_raw)) if norm else x_raw
  before = keras_weights(ref)
  for save, path in files:
    save(ref, path)

  module = models.create_model(model_config(name, **config_kw), 1000)
  fresh = init_zeros(module, x)
  loaded = [pretrained.load_pretrained(path, model_config(name, **config_kw), fresh) for _, path in files]
  for other in loaded[1:]:
    jax.tree.map(np.testing.assert_array_equal, loaded[0], other)
  variables = loaded[0]

  ref_eval = np.asarray(ref(x_raw, training=False))
  ref_train = np.asarray(ref(x_raw, training=True))  # also updates the moving statistics
  eval_logits, train_logits, stats = forward(module, variables, x)
  assert np.abs(ref_eval).max() > 1e-2
  np.testing.assert_allclose(eval_logits, ref_eval, rtol=0, atol=LOGIT_TOL)
  np.testing.assert_allclose(train_logits, ref_train, rtol=0, atol=TRAIN_LOGIT_TOL)
  # Keras, like Flax, updates the moving variance with the biased batch variance.
  updated, _ = pretrained.map_keras(keras_weights(ref), family)
  for key, value in stats.items():
    np.testing.assert_allclose(value, updated[f"batch_stats/{key}"], rtol=1e-4, atol=1e-5, err_msg=key)
  return module, before


@pytest.mark.slow
def test_resnet50_v1_matches_keras(tmp_path):
  ref = keras.applications.ResNet50(weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
  files = [
    (save_legacy_h5, tmp_path / "resnet50.h5"),
    (lambda m, p: m.save(p), tmp_path / "resnet50.keras"),
  ]
  module, weights = check_against_keras(ref, "resnet50", files, {"resnet_v1": True}, "resnet", seed=2)
  # Keras' conv biases fold into the BN means, so ours has exactly the bias-free count.
  conv_biases = sum(
    v.size for k, v in weights.items() if k.endswith("_conv/bias")
  )
  assert param_count(module) == 25_557_032 == ref.count_params() - 53_120 - conv_biases  # 53,120 BN stats


@pytest.mark.slow
def test_efficientnet_b0_matches_keras(tmp_path):
  ref = keras.applications.EfficientNetB0(
    weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None
  )
  files = [
    (lambda m, p: m.save_weights(p), tmp_path / "b0.weights.h5"),
    (lambda m, p: m.save(p), tmp_path / "b0_model.h5"),
  ]
  cfg = {"dropout_rate": 0.0, "drop_connect_rate": 0.0}
  module, _ = check_against_keras(ref, "efficientnet_b0", files, cfg, "efficientnet", seed=3)
  trainable = sum(int(np.prod(w.shape)) for w in ref.trainable_weights)
  assert param_count(module) == trainable == 5_288_548


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def resnet18_state():
  torch.manual_seed(0)
  return {k: v.contiguous() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}


def save_state(state, path):
  from safetensors.torch import save_file

  save_file(state, path)
  return path


def random_fill(shapes, seed: int = 0):
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=s.shape), s.dtype) for s in leaves])


def fresh_variables(name: str, num_classes: int, **kw):
  module = models.create_model(model_config(name, **kw), num_classes)
  x = jnp.zeros((1, 32, 32, 3))
  return random_fill(jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, train=False)))


def load_error(path, name, variables, **kw) -> str:
  with pytest.raises(PretrainedError) as info:
    pretrained.load_pretrained(path, model_config(name, **kw), variables)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_head_of_another_class_count_stays_fresh(resnet18_state, tmp_path):
  path = save_state(resnet18_state, tmp_path / "r18.safetensors")
  fresh = fresh_variables("resnet18", 10)
  loaded = flat(pretrained.load_pretrained(path, "resnet18", fresh))
  np.testing.assert_array_equal(loaded["params/fc/kernel"], flat(fresh)["params/fc/kernel"])
  np.testing.assert_array_equal(loaded["params/conv1/kernel"], resnet18_state["conv1.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats/layer4_1/bn2/var"], resnet18_state["layer4.1.bn2.running_var"].numpy())
  # A headless file (include_top=False style) loads too, with the head kept.
  headless = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}
  loaded = flat(pretrained.load_pretrained(save_state(headless, tmp_path / "h.safetensors"), "resnet18", fresh))
  np.testing.assert_array_equal(loaded["params/fc/bias"], flat(fresh)["params/fc/bias"])


def test_weights_of_another_architecture_are_named(resnet18_state, tmp_path):
  path = save_state(resnet18_state, tmp_path / "r18.safetensors")
  message = load_error(path, "resnet34", fresh_variables("resnet34", 1000))
  assert "missing batch_stats/layer1_2/bn1/mean" in message
  message = load_error(path, "resnet50", fresh_variables("resnet50", 1000))
  assert "missing batch_stats/layer1_0/bn3/mean" in message and "wrong shape batch_stats/" in message
  effnet = {k: v.contiguous() for k, v in torchvision.models.efficientnet_b0().state_dict().items()}
  path = save_state(effnet, tmp_path / "b0.safetensors")
  message = load_error(path, "resnet18", fresh_variables("resnet18", 1000))
  assert "does not fit resnet18: unexpected tensors classifier.1.bias" in message
  # torchvision's EfficientNet (symmetric padding) into the TF-layout model: refused with the fix.
  message = load_error(path, "efficientnet_b0", fresh_variables("efficientnet_b0", 1000))
  assert "efficientnet_bN_torchvision" in message


def test_unexpected_and_wrongly_shaped_tensors_are_named(resnet18_state, tmp_path):
  fresh = fresh_variables("resnet18", 1000)
  extra = dict(resnet18_state, **{"layer1.0.bn1.extra_buffer": torch.zeros(3)})
  message = load_error(save_state(extra, tmp_path / "a.safetensors"), "resnet18", fresh)
  assert "unexpected params/layer1_0/bn1/extra_buffer" in message
  bad = dict(resnet18_state, **{"layer2.0.conv1.weight": torch.zeros(128, 64, 5, 5)})
  message = load_error(save_state(bad, tmp_path / "b.safetensors"), "resnet18", fresh)
  assert "wrong shape params/layer2_0/conv1/kernel (5, 5, 64, 128) vs model (3, 3, 64, 128)" in message


def test_wrong_path_truncated_and_non_weight_files(resnet18_state, tmp_path):
  fresh = fresh_variables("resnet18", 1000)
  assert "not found" in load_error(tmp_path / "nope.safetensors", "resnet18", fresh)
  assert "unknown weight file type '.npz'" in load_error(
    save_state(resnet18_state, tmp_path / "x.safetensors").rename(tmp_path / "x.npz"), "resnet18", fresh
  )
  data = save_state(resnet18_state, tmp_path / "w.safetensors").read_bytes()
  torch.save(resnet18_state, tmp_path / "w.pth")
  pth = (tmp_path / "w.pth").read_bytes()
  for name, content in [
    ("t.safetensors", data[: len(data) // 2]),
    ("t.pth", pth[: len(pth) // 2]),
    ("text.safetensors", b"hello, not weights"),
    ("text.h5", b"hello, not weights"),
    ("text.keras", b"hello, not weights"),
    ("text.msgpack", b"\x93\x01"),
    ("text.pth", b"hello"),
  ]:
    (tmp_path / name).write_bytes(content)
    assert "cannot read" in load_error(tmp_path / name, "resnet18", fresh), name


def test_pth_without_torch_says_how_to_fix(resnet18_state, tmp_path, monkeypatch):
  torch.save(resnet18_state, tmp_path / "w.pth")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` fails, as uninstalled
  message = load_error(tmp_path / "w.pth", "resnet18", fresh_variables("resnet18", 1000))
  assert "needs torch" in message and ".safetensors" in message


def test_layout_mismatches_are_refused(resnet18_state, tmp_path):
  import h5py

  keras_file = tmp_path / "k.h5"  # a minimal legacy Keras weight file
  with h5py.File(keras_file, "w") as f:
    f.attrs["layer_names"] = [b"conv1_conv"]
    f.create_group("conv1_conv").attrs["weight_names"] = [b"conv1_conv/kernel:0"]
    f["conv1_conv"].create_dataset("conv1_conv/kernel:0", data=np.zeros((7, 7, 3, 64), np.float32))
  fresh = fresh_variables("resnet50", 1000)
  assert "resnet_v1=True" in load_error(keras_file, "resnet50", fresh)
  tv = save_state(resnet18_state, tmp_path / "r18.safetensors")
  assert "resnet_v1=False" in load_error(tv, "resnet18", fresh_variables("resnet18", 1000), resnet_v1=True)
  assert "no torchvision/Keras layout" in load_error(tv, "resnet20", fresh_variables("resnet20", 10))
  # A converted file remembers its layout.
  convert("resnet18", str(tv), str(tmp_path / "c.safetensors"))
  message = load_error(tmp_path / "c.safetensors", "resnet18", fresh_variables("resnet18", 1000), resnet_v1=True)
  assert "'torchvision'-layout" in message


def test_convert_cli_reports_one_line_errors(tmp_path):
  import subprocess
  import sys

  out = subprocess.run(
    [sys.executable, "-m", "jaxsam.convert", "--model=resnet50", f"--input={tmp_path / 'missing.pth'}",
     f"--output={tmp_path / 'o.safetensors'}"],
    capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: pretrained weight file not found")
