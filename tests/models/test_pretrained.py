"""Pretrained import proven against the source frameworks: torchvision and Keras compute the same
logits.

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

from jaxsam import models, run_setup, steps
from jaxsam import state as state_lib
from jaxsam.convert import convert
from jaxsam.errors import ConfigError, PretrainedError
from jaxsam.models import pretrained, weight_files
from support.paths import ROOT

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
# Eval mode against Keras: TF's CPU kernels (oneDNN when enabled) sum the 2048-wide last layers in
# an order that varies from run to run; Keras' ResNet50 has been seen 1.09e-4 off in 1 of 2000.
KERAS_EVAL_LOGIT_TOL = 2e-4


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


def randomise_torch_bn(model, seed: int, x=None) -> None:
  """Random BN scales/offsets; running statistics from a calibration batch, slightly perturbed.

  `x` is the calibration batch (NCHW, as the model's input); None draws a normal one. Calibrating
  keeps activations O(1) through 50 layers (logits of a few units, as a trained net's),
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
    model.train()(torch.randn(8, 3, SIZE, SIZE, generator=g) if x is None else x)
  for m in bns:
    m.momentum = 0.1
    with torch.no_grad():
      noise = torch.randn(m.num_features, generator=g) * 0.05  # in units of the channel's std
      m.running_mean.add_(noise * m.running_var.sqrt())
      m.running_var.mul_(torch.rand(m.num_features, generator=g) * 0.2 + 0.9)


def bn_element_counts(model, x) -> dict:
  """{torch BN name: elements per channel in the batch}, by forward hooks (for Bessel's factor)."""
  counts, hooks = {}, []
  for name, m in model.named_modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      hooks.append(
        m.register_forward_hook(
          lambda mod, inp, out, name=name: counts.__setitem__(
            name, inp[0].numel() // inp[0].shape[1]
          )
        )
      )
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
    {f"{k}.running_var": np.full(1, n, np.float32) for k, n in counts.items()},
    "efficientnet" if "eff" in name else "resnet",
  )
  for key, value in stats.items():
    ref = updated[f"batch_stats/{key}"]
    if key.endswith("/var"):
      n = n_by_name[f"batch_stats/{key}"][0]
      old = 0.9 * before[f"batch_stats/{key}"]
      np.testing.assert_allclose(
        (value - old) * n / (n - 1), ref - old, rtol=1e-3, atol=1e-5, err_msg=key
      )
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
    layer.set_weights(
      [rng.uniform(0.5, 1.0, gamma.shape), rng.normal(0, 0.1, beta.shape), mean, var]
    )
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
  loaded = [
    pretrained.load_pretrained(path, model_config(name, **config_kw), fresh) for _, path in files
  ]
  for other in loaded[1:]:
    jax.tree.map(np.testing.assert_array_equal, loaded[0], other)
  variables = loaded[0]

  ref_eval = np.asarray(ref(x_raw, training=False))
  ref_train = np.asarray(ref(x_raw, training=True))  # also updates the moving statistics
  eval_logits, train_logits, stats = forward(module, variables, x)
  assert np.abs(ref_eval).max() > 1e-2
  np.testing.assert_allclose(eval_logits, ref_eval, rtol=0, atol=KERAS_EVAL_LOGIT_TOL)
  np.testing.assert_allclose(train_logits, ref_train, rtol=0, atol=TRAIN_LOGIT_TOL)
  # Keras, like Flax, updates the moving variance with the biased batch variance.
  updated, _ = pretrained.map_keras(keras_weights(ref), family)
  for key, value in stats.items():
    np.testing.assert_allclose(
      value, updated[f"batch_stats/{key}"], rtol=1e-4, atol=1e-5, err_msg=key
    )
  return module, before


@pytest.mark.slow
def test_resnet50_v1_matches_keras(tmp_path):
  ref = keras.applications.ResNet50(
    weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None
  )
  files = [
    (save_legacy_h5, tmp_path / "resnet50.h5"),
    (lambda m, p: m.save(p), tmp_path / "resnet50.keras"),
  ]
  module, weights = check_against_keras(
    ref, "resnet50", files, {"resnet_v1": True}, "resnet", seed=2
  )
  # Keras' conv biases fold into the BN means, so ours has exactly the bias-free count.
  conv_biases = sum(v.size for k, v in weights.items() if k.endswith("_conv/bias"))
  assert (
    param_count(module) == 25_557_032 == ref.count_params() - 53_120 - conv_biases
  )  # 53,120 BN stats


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


# ------------------------------------------------------------- end to end: uint8 images -> logits
# Each reference model gets what its own library's preprocessing makes of uint8 images; jaxsam gets
# the same uint8 images through its own path (run_setup.normalization -> StepConfig ->
# steps.preprocess -> model). BN statistics are calibrated on those very inputs (see the randomise
# helpers), so the comparison tests the input convention and the mapping, not float32 round-off of
# a chaotic net.

E2E_SIZE = 64
E2E_BATCH = 4
E2E_TOL = 1e-4  # max |logit difference| / max |reference logit|


def uint8_images(seed: int) -> np.ndarray:
  """Noise images whose channels differ in brightness (R bright, B dark): a channel swap shows."""
  rng = np.random.default_rng(seed)
  low, high = np.array([90, 30, 0]), np.array([256, 220, 140])
  return rng.integers(low, high, size=(E2E_BATCH, E2E_SIZE, E2E_SIZE, 3)).astype(np.uint8)


def relative_error(logits: np.ndarray, ref: np.ndarray) -> float:
  return float(np.abs(logits - ref).max() / np.abs(ref).max())


def run_config(name: str, path, normalization: str = "auto", **kw) -> ml_collections.ConfigDict:
  model = model_config(name, pretrained=str(path), normalization=normalization, **kw)
  return ml_collections.ConfigDict({"model": model})


def jaxsam_logits(path, name: str, images: np.ndarray, modes=("auto",), **kw) -> dict:
  """{normalization mode: eval logits} of jaxsam's own path from uint8 images, weights of `path`."""
  module = models.create_model(run_config(name, path, **kw).model, 1000)
  x = jnp.zeros(images.shape, jnp.float32)
  variables = pretrained.load_pretrained(
    path, run_config(name, path, **kw).model, init_zeros(module, x)
  )
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  out = {}
  for mode in modes:
    norm = run_setup.normalization(run_config(name, path, mode, **kw), None)
    cfg = state_lib.StepConfig(image_size=images.shape[1], **norm)
    out[mode] = np.asarray(apply(variables, steps.preprocess(jnp.asarray(images), cfg)))
  return out


def check_end_to_end(ref_logits, path, name, images, wrong: str, **kw) -> float:
  """jaxsam's `auto` path matches the reference; the `wrong` convention would not (not vacuous)."""
  logits = jaxsam_logits(path, name, images, ("auto", wrong), **kw)
  assert np.abs(ref_logits).max() > 1e-2
  error = relative_error(logits["auto"], ref_logits)
  print(f"{name} {os.path.basename(str(path))}: end-to-end relative error {error:.2e}")
  assert error < E2E_TOL, error
  assert relative_error(logits[wrong], ref_logits) > 100 * E2E_TOL
  return error


@pytest.mark.slow
def test_keras_resnet50_end_to_end_with_caffe_preprocessing(tmp_path):
  images = uint8_images(seed=4)
  ref = keras.applications.ResNet50(
    weights=None, input_shape=(E2E_SIZE, E2E_SIZE, 3), classifier_activation=None
  )
  x_ref = keras.applications.resnet50.preprocess_input(images.astype(np.float32))
  randomise_keras(ref, x_ref, seed=4)
  ref_logits = np.asarray(ref(x_ref, training=False))
  save_legacy_h5(ref, tmp_path / "resnet50.h5")
  convert("resnet50", str(tmp_path / "resnet50.h5"), str(tmp_path / "r.msgpack"), resnet_v1=True)
  assert weight_files.read_file(tmp_path / "r.msgpack")[2]["origin"] == "keras"
  for path in (tmp_path / "resnet50.h5", tmp_path / "r.msgpack"):
    assert run_setup.normalization(run_config("resnet50", path, resnet_v1=True), None)["bgr"]
  check_end_to_end(
    ref_logits, tmp_path / "r.msgpack", "resnet50", images, "imagenet", resnet_v1=True
  )


@pytest.mark.slow
def test_keras_efficientnet_b0_end_to_end_with_its_own_input_layers(tmp_path):
  images = uint8_images(seed=5)
  ref = keras.applications.EfficientNetB0(
    weights=None, input_shape=(E2E_SIZE, E2E_SIZE, 3), classifier_activation=None
  )
  # With weights="imagenet" Keras builds Rescaling(1/255), Normalization(ImageNet mean, variance =
  # std) and Rescaling(1/sqrt(std)): (x/255 - mean)/std. weights=None builds no second Rescaling,
  # so variance = std**2 gives the same input layers. Keras' models take raw 0-255 input.
  from keras.src.applications.efficientnet import IMAGENET_STDDEV_RGB

  norm = next(l for l in ref.layers if isinstance(l, keras.layers.Normalization))
  norm.set_weights([np.array([0.485, 0.456, 0.406]), np.square(IMAGENET_STDDEV_RGB), np.array(0)])
  norm.finalize_state()
  x_ref = keras.applications.efficientnet.preprocess_input(images.astype(np.float32))
  normalised = np.asarray(keras.Model(ref.input, norm.output)(x_ref))
  expected = (images / 255 - np.array([0.485, 0.456, 0.406])) / np.array(IMAGENET_STDDEV_RGB)
  np.testing.assert_allclose(normalised, expected, atol=1e-5)
  randomise_keras(ref, x_ref, seed=5)
  ref_logits = np.asarray(ref(x_ref, training=False))
  save_legacy_h5(ref, tmp_path / "b0.h5")  # with the Normalization layer, as efficientnetb0.h5
  convert("efficientnet_b0", str(tmp_path / "b0.h5"), str(tmp_path / "b0.safetensors"))
  check_end_to_end(
    ref_logits,
    tmp_path / "b0.safetensors",
    "efficientnet_b0",
    images,
    "caffe",
    dropout_rate=0.0,
    drop_connect_rate=0.0,
  )


@pytest.mark.slow
def test_torchvision_resnet50_end_to_end_with_imagenet_transforms(tmp_path):
  images = uint8_images(seed=6)
  ref = torchvision.models.resnet50(weights=None)
  preset = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
  transform = torchvision.transforms.Compose(
    [  # the preset without its resize and crop
      torchvision.transforms.ToTensor(),
      torchvision.transforms.Normalize(preset.mean, preset.std),
    ]
  )
  x_ref = torch.stack([transform(image) for image in images])
  torch.manual_seed(6)
  randomise_torch_bn(ref, seed=6, x=x_ref)
  with torch.no_grad():
    ref_logits = ref.eval()(x_ref).numpy()
  torch.save(ref.state_dict(), tmp_path / "resnet50.pth")
  convert("resnet50", str(tmp_path / "resnet50.pth"), str(tmp_path / "r.safetensors"))
  check_end_to_end(ref_logits, tmp_path / "r.safetensors", "resnet50", images, "caffe")


def test_preprocess_matches_each_librarys_preprocessing():
  """steps.preprocess with each convention equals the library's own on the same uint8 images."""
  images = uint8_images(seed=7)[:2, :8, :8]
  ours = lambda mode: np.asarray(
    steps.preprocess(
      jnp.asarray(images),
      state_lib.StepConfig(
        image_size=8, **run_setup.normalization(run_config("resnet50", "", mode), None)
      ),
    )
  )
  caffe = keras.applications.resnet50.preprocess_input(images.astype(np.float32))
  np.testing.assert_allclose(ours("caffe"), caffe, rtol=0, atol=2e-5)  # values up to ~150
  preset = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
  tv = torchvision.transforms.Normalize(preset.mean, preset.std)(
    torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  )
  np.testing.assert_allclose(ours("imagenet"), tv.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)


def test_auto_normalization_follows_the_weights_origin(resnet18_state, tmp_path):
  picked = lambda path, name="resnet50", **kw: run_setup.normalization(
    run_config(name, path, **kw), None
  )
  caffe = {"mean": steps.CAFFE_MEAN_BGR, "std": steps.CAFFE_STD, "bgr": True}
  imagenet = {"mean": steps.IMAGENET_MEAN, "std": steps.IMAGENET_STD, "bgr": False}
  v1 = model_config("resnet50", resnet_v1=True)
  tiny = {"params": {"conv1": {"kernel": np.zeros((1, 1, 3, 4), np.float32)}}}
  # A Keras ResNet file: raw (.h5/.keras, origin by format) or converted (origin recorded).
  (tmp_path / "raw.h5").write_bytes(b"")
  assert picked(tmp_path / "raw.h5", resnet_v1=True) == caffe
  for suffix in (".safetensors", ".msgpack"):
    weight_files.save_variables(tmp_path / f"k{suffix}", tiny, v1, origin="keras")
    assert weight_files.weights_origin(tmp_path / f"k{suffix}") == "keras"
    assert picked(tmp_path / f"k{suffix}", resnet_v1=True) == caffe
  weight_files.save_variables(tmp_path / "old.safetensors", tiny, v1)  # no origin: its layout says
  assert picked(tmp_path / "old.safetensors", resnet_v1=True) == caffe
  # Keras' EfficientNet normalises inside the model with ImageNet mean/std (layers jaxsam drops).
  (tmp_path / "b0.h5").write_bytes(b"")
  assert picked(tmp_path / "b0.h5", "efficientnet_b0") == imagenet
  # torchvision and timm weights, raw or converted.
  tv = save_state(resnet18_state, tmp_path / "tv.safetensors")
  torch.save(resnet18_state, tmp_path / "tv.pth")
  convert("resnet18", str(tv), str(tmp_path / "c.msgpack"))
  convert("resnet18", str(tv), str(tmp_path / "timm.safetensors"), origin="timm")
  assert weight_files.weights_origin(tmp_path / "c.msgpack") == "torchvision"
  assert weight_files.weights_origin(tmp_path / "timm.safetensors") == "timm"
  for name in ("tv.safetensors", "tv.pth", "c.msgpack", "timm.safetensors"):
    assert picked(tmp_path / name, "resnet18") == imagenet, name
  # Explicit modes win; no weights: the data's statistics.
  assert picked(tmp_path / "tv.pth", "resnet18", normalization="caffe") == caffe
  assert picked(tmp_path / "raw.h5", resnet_v1=True, normalization="imagenet") == imagenet
  data = type("Data", (), {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)})
  assert run_setup.normalization(run_config("resnet18", ""), data)["mean"] == (0.1, 0.2, 0.3)


def test_bad_normalization_and_origin_are_one_line_errors(resnet18_state, tmp_path):
  with pytest.raises(ConfigError) as info:
    run_setup.normalization(run_config("resnet50", "", normalization="bgr"), None)
  assert str(info.value) == (
    "model.normalization='bgr' is unknown; known: auto, imagenet, inception, caffe, dataset"
  )
  tv = save_state(resnet18_state, tmp_path / "tv.safetensors")
  with pytest.raises(
    ConfigError,
    match=r"--origin='tf' is unknown; known: keras, torchvision, "
    r"timm$",
  ):
    convert("resnet18", str(tv), str(tmp_path / "o.safetensors"), origin="tf")
  with pytest.raises(
    ConfigError,
    match=r"--origin='keras' does not fit .* a torchvision weight "
    r"file; accepted: torchvision, timm$",
  ):
    convert("resnet18", str(tv), str(tmp_path / "o.safetensors"), origin="keras")


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def resnet18_state():
  torch.manual_seed(0)
  return {
    k: v.contiguous() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
  }


def save_state(state, path):
  from safetensors.torch import save_file

  save_file(state, path)
  return path


def random_fill(shapes, seed: int = 0):
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
    treedef, [jnp.asarray(rng.normal(size=s.shape), s.dtype) for s in leaves]
  )


def fresh_variables(name: str, num_classes: int, **kw):
  module = models.create_model(model_config(name, **kw), num_classes)
  x = jnp.zeros((1, 32, 32, 3))
  return random_fill(
    jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, train=False))
  )


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
  np.testing.assert_array_equal(
    loaded["params/conv1/kernel"], resnet18_state["conv1.weight"].numpy().transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    loaded["batch_stats/layer4_1/bn2/var"], resnet18_state["layer4.1.bn2.running_var"].numpy()
  )
  # A headless file (include_top=False style) loads too, with the head kept.
  headless = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}
  loaded = flat(
    pretrained.load_pretrained(save_state(headless, tmp_path / "h.safetensors"), "resnet18", fresh)
  )
  np.testing.assert_array_equal(loaded["params/fc/bias"], flat(fresh)["params/fc/bias"])


@pytest.mark.slow
def test_weights_of_another_architecture_are_named(resnet18_state, tmp_path):
  path = save_state(resnet18_state, tmp_path / "r18.safetensors")
  message = load_error(path, "resnet34", fresh_variables("resnet34", 1000))
  assert "missing batch_stats/layer1_2/bn1/mean" in message
  message = load_error(path, "resnet50", fresh_variables("resnet50", 1000))
  assert (
    "missing batch_stats/layer1_0/bn3/mean" in message and "wrong shape batch_stats/" in message
  )
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
  assert (
    "wrong shape params/layer2_0/conv1/kernel (5, 5, 64, 128) vs model (3, 3, 64, 128)" in message
  )


def test_wrong_path_truncated_and_non_weight_files(resnet18_state, tmp_path):
  fresh = fresh_variables("resnet18", 1000)
  assert "not found" in load_error(tmp_path / "nope.safetensors", "resnet18", fresh)
  assert "unknown weight file type '.ckpt'" in load_error(
    save_state(resnet18_state, tmp_path / "x.safetensors").rename(tmp_path / "x.ckpt"),
    "resnet18",
    fresh,
  )
  np.savez(tmp_path / "vit.npz", cls=np.zeros((1, 1, 4), np.float32))
  assert "only the ViTs (vit_*) read .npz files" in load_error(
    tmp_path / "vit.npz", "resnet18", fresh
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
    ("text.npz", b"hello, not weights"),
  ]:
    (tmp_path / name).write_bytes(content)
    assert "cannot read" in load_error(tmp_path / name, "resnet18", fresh), name


def test_pth_without_torch_says_how_to_fix(resnet18_state, tmp_path, monkeypatch):
  torch.save(resnet18_state, tmp_path / "w.pth")
  monkeypatch.setitem(
    __import__("sys").modules, "torch", None
  )  # `import torch` fails, as uninstalled
  message = load_error(tmp_path / "w.pth", "resnet18", fresh_variables("resnet18", 1000))
  assert "needs torch" in message and ".safetensors" in message


@pytest.mark.slow
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
  assert "resnet_v1=False" in load_error(
    tv, "resnet18", fresh_variables("resnet18", 1000), resnet_v1=True
  )
  assert "no torchvision/Keras layout" in load_error(
    tv, "resnet20", fresh_variables("resnet20", 10)
  )
  # A converted file remembers its layout.
  convert("resnet18", str(tv), str(tmp_path / "c.safetensors"))
  message = load_error(
    tmp_path / "c.safetensors", "resnet18", fresh_variables("resnet18", 1000), resnet_v1=True
  )
  assert "'torchvision'-layout" in message


@pytest.mark.slow
def test_convert_cli_reports_one_line_errors(tmp_path):
  import subprocess
  import sys

  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxsam.convert",
      "--model=resnet50",
      f"--input={tmp_path / 'missing.pth'}",
      f"--output={tmp_path / 'o.safetensors'}",
    ],
    capture_output=True,
    text=True,
    check=False,
    cwd=ROOT,
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: pretrained weight file not found")
