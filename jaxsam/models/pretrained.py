"""Import of pretrained weights: torchvision/timm state dicts, Keras weight files, jaxsam's own
files.

Every tensor of the file must land on a model variable of the same shape, and every model variable
must come from the file, except the classifier head (`fc` / `predictions`), which stays freshly
initialised when its class count differs or the file has none. Anything else is a
`PretrainedError` naming the tensors.

Formats, chosen by the file's suffix:
  .safetensors          a torch state dict (read without torch) or a file jaxsam wrote
  .pth .pt .bin         a torch state dict, read with torch.load(weights_only=True) (needs torch)
  .h5 .keras            Keras weights (legacy `save_weights` h5 as the official ImageNet files,
                        Keras 3 `.weights.h5`, or a `.keras` archive)
  .msgpack              a file jaxsam wrote (flax.serialization msgpack)

jaxsam's own files (`save_variables`) hold the Flax variables under '/'-joined names
('params/conv1/kernel', 'batch_stats/bn1/mean') and record the model's layout, so converted files
load without re-mapping and a file of another layout is refused. They also record the weights'
origin ('keras', 'torchvision', 'timm'), which fixes the input normalisation the weights expect
(`input_normalization`): Keras' ResNet50 was trained on caffe-style BGR input, the rest on
ImageNet mean/std.
"""

import io
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxsam.errors import PretrainedError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
KERAS_SUFFIXES = (".h5", ".keras")
SUFFIXES = (".safetensors", ".msgpack", ".npz") + TORCH_SUFFIXES + KERAS_SUFFIXES
HEADS = ("fc", "predictions")  # classifier modules, re-initialised when the class count differs
IMAGENET_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
JAXSAM_FORMAT = "jaxsam"
ORIGINS = ("keras", "torchvision", "timm")  # who trained the weights: their input convention


# --------------------------------------------------------------------------- what the model expects


def model_layout(model_ref) -> tuple[str, str]:
  """(name, layout) of a model: layout 'torchvision', 'keras' or 'jaxsam' (no external weights).

  `model_ref` is a registered name, a `config.model` ConfigDict, or a module built by
  `jaxsam.models` (whose attributes tell the layout).
  """
  from jaxsam.models import efficientnet, resnet, vit  # here: jaxsam.models imports this module

  if isinstance(model_ref, vit.ViT):  # ViTs: every layout question goes to vit_import.py
    return "vit", "vit"
  if isinstance(model_ref, resnet.ResNet):
    if model_ref.stem == "imagenet" and model_ref.shortcut == "projection":
      return "resnet", "keras" if model_ref.v1 else "torchvision"
    return "resnet", JAXSAM_FORMAT
  if isinstance(model_ref, efficientnet.EfficientNet):
    return "efficientnet", "keras" if model_ref.padding == "same" else "torchvision"
  if isinstance(model_ref, str):
    name, v1, cifar_stem = model_ref, False, False
  elif isinstance(model_ref, Mapping) or hasattr(model_ref, "get"):
    name = model_ref.get("name")
    v1 = bool(model_ref.get("resnet_v1", False))
    cifar_stem = bool(model_ref.get("cifar_stem", False))
  else:
    raise TypeError(f"expected a model name, config.model or module, got {type(model_ref)}")
  if name in vit.SIZES:
    return name, "vit"
  if name in IMAGENET_RESNETS and not cifar_stem:
    return name, "keras" if v1 else "torchvision"
  if re.fullmatch(r"efficientnet_b\d", name):
    return name, "keras"
  if re.fullmatch(r"efficientnet_b\d_torchvision", name):
    return name, "torchvision"
  return name, JAXSAM_FORMAT


# --------------------------------------------------------------------------------- reading files


def read_file(path: str) -> tuple[dict[str, np.ndarray], str, dict[str, str]]:
  """Reads a weight file into ({source name: array}, source kind, metadata).

  The kind is 'torchvision' (torch state-dict names), 'keras' ('layer/variable' names) or 'jaxsam'.
  """
  path = os.fspath(path)
  suffix = _checked_suffix(path)
  if suffix in TORCH_SUFFIXES:
    return _read_torch(path), "torchvision", {}
  try:
    if suffix == ".safetensors":
      return _read_safetensors(path)
    if suffix == ".msgpack":
      return _read_msgpack(path)
    if suffix == ".npz":  # original-ViT / big_vision checkpoints
      from jaxsam.models import vit_import

      return vit_import.read_npz(path), "npz", {}
    return _read_keras(path, suffix), "keras", {}
  except PretrainedError:
    raise
  except Exception as e:  # any reader failure means an unreadable or truncated file
    raise PretrainedError(
      f"cannot read {path!r} as a {suffix} weight file (truncated or not a weight file?): "
      f"{_one_line(e)}"
    ) from e


def _checked_suffix(path: str) -> str:
  """The weight file's lower-case suffix; PretrainedError when it is absent or of no known type."""
  if not os.path.isfile(path):
    raise PretrainedError(f"pretrained weight file not found: {path!r}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise PretrainedError(
      f"unknown weight file type {suffix!r} for {path!r}; accepted: {', '.join(SUFFIXES)}"
    )
  return suffix


def weights_origin(path: str) -> str:
  """Who trained the file's weights: 'keras', 'torchvision' or 'timm' (one of ORIGINS), or ''.

  Keras files are Keras' by their format, torch state dicts count as torchvision's (timm's ResNets
  share its names and its normalisation); jaxsam's files say, or (written before they recorded it)
  their layout does. '' for a jaxsam file of a jaxsam-only layout.
  """
  path = os.fspath(path)
  suffix = _checked_suffix(path)
  if suffix in KERAS_SUFFIXES:
    return "keras"
  if suffix in TORCH_SUFFIXES:
    return "torchvision"
  if suffix == ".safetensors":
    from safetensors import safe_open

    try:
      with safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
    except Exception as e:
      raise PretrainedError(
        f"cannot read {path!r} as a .safetensors weight file: {_one_line(e)}"
      ) from e
    if metadata.get("format") != JAXSAM_FORMAT:
      return "torchvision"
  else:
    metadata = read_file(path)[2]
  origin = metadata.get("origin") or metadata.get("layout", "")
  return origin if origin in ORIGINS else ""


def input_normalization(path: str, model_ref) -> str:
  """The input normalisation the file's weights were trained with: 'caffe' or 'imagenet'.

  Keras' ResNet50 expects `keras.applications.resnet50.preprocess_input` (caffe: BGR, mean
  subtracted on 0-255, no std). torchvision and timm expect ImageNet mean/std on 0-1 RGB, and so
  does Keras' EfficientNet, whose in-model Rescaling/Normalization layers jaxsam leaves out.
  """
  return origin_normalization(weights_origin(path), model_layout(model_ref)[0])


def origin_normalization(origin: str, model_name: str) -> str:
  """The input normalisation of weights from `origin` for `model_name`: 'inception' (mean = std
  = 0.5) for ViTs (timm's SAM and AugReg ViTs, the original .npz files), 'caffe' for Keras'
  ResNets, 'imagenet' for the rest."""
  from jaxsam.models import vit  # here: jaxsam.models imports this module

  if model_name == "vit" or model_name in vit.SIZES:
    return "inception"
  return "caffe" if _family(model_name) == "resnet" and origin == "keras" else "imagenet"


def _one_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


def _read_safetensors(path: str):
  from safetensors import safe_open

  with safe_open(path, framework="numpy") as f:
    metadata = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
  kind = JAXSAM_FORMAT if metadata.get("format") == JAXSAM_FORMAT else "torchvision"
  return tensors, kind, metadata


def _read_msgpack(path: str):
  with open(path, "rb") as f:
    tree = flax.serialization.msgpack_restore(f.read())
  if not isinstance(tree, dict) or "__jaxsam__" not in tree:
    raise PretrainedError(f"cannot read {path!r}: a msgpack file not written by jaxsam.convert")
  metadata = {k: str(v) for k, v in tree.pop("__jaxsam__").items()}
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}, JAXSAM_FORMAT, metadata


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # the optional `torch` extra, imported only for .pth files
  except ImportError:
    raise PretrainedError(
      f"reading {path!r} needs torch (pip install 'jaxsam[torch]'), or convert it to "
      ".safetensors with safetensors.torch.save_file where torch is installed"
    ) from None
  try:
    # weights_only=True: never unpickle arbitrary objects from a downloaded file.
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise PretrainedError(
      f"cannot read {path!r} as a torch state dict (truncated or not a weight file?): "
      f"{_one_line(e)}"
    ) from e
  for key in ("state_dict", "model_state_dict", "model"):  # training checkpoints wrap the weights
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
      state = state[key]
  if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
    raise PretrainedError(f"{path!r} does not hold a torch state dict (name -> tensor)")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def _read_keras(path: str, suffix: str) -> dict[str, np.ndarray]:
  import h5py

  if suffix == ".keras":
    with zipfile.ZipFile(path) as archive:
      data = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(data, "r") as f:
      return _keras3_weights(f)
  with h5py.File(path, "r") as f:
    if "model_weights" in f:  # a whole model saved with model.save('x.h5')
      return _legacy_weights(f["model_weights"])
    if "layer_names" in f.attrs:  # save_weights in the legacy format: the official ImageNet files
      return _legacy_weights(f)
    if "layers" in f:
      return _keras3_weights(f)
  raise PretrainedError(f"{path!r} is an HDF5 file without Keras weights")


def _legacy_weights(group) -> dict[str, np.ndarray]:
  """Legacy Keras h5: a group per layer, whose attribute 'weight_names' lists 'layer/var:0'."""
  out = {}
  for layer in group.attrs["layer_names"]:
    layer = _str(layer)
    for weight in group[layer].attrs.get("weight_names", []):
      weight = _str(weight)
      var = weight.split("/")[-1].split(":")[0]
      out[f"{layer}/{_KERAS_VAR_ALIASES.get(var, var)}"] = np.asarray(group[layer][weight])
  return out


def _str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


_KERAS_VAR_ALIASES = {"depthwise_kernel": "kernel"}
# Keras 3 stores variables by position; the order each layer type creates them in.
_KERAS3_VARS = {
  "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
  "conv2d": ("kernel", "bias"),
  "depthwise_conv2d": ("kernel", "bias"),
  "dense": ("kernel", "bias"),
  "normalization": ("mean", "variance", "count"),
}


def _keras3_weights(f) -> dict[str, np.ndarray]:
  """Keras 3 `.weights.h5`: layers/<class key>/vars/<index>, the layer name in an attribute."""
  out = {}
  for key, layer in f["layers"].items():
    variables = layer.get("vars")
    if variables is None or not len(variables):
      continue
    kind = re.sub(r"_\d+$", "", key)
    if kind not in _KERAS3_VARS:
      raise PretrainedError(f"unsupported Keras layer {key!r} in weight file")
    name = _str(variables.attrs.get("name", key))
    for index in sorted(variables, key=int):
      out[f"{name}/{_KERAS3_VARS[kind][int(index)]}"] = np.asarray(variables[index])
  return out


# --------------------------------------------------------------------------- source -> Flax names


def _torch_leaf(module_path: str, param: str, array: np.ndarray):
  """A torch parameter or buffer -> (Flax name, array); None for num_batches_tracked."""
  if param == "num_batches_tracked":  # a step counter with no Flax counterpart
    return None
  if param == "running_mean":
    return f"batch_stats/{module_path}/mean", array
  if param == "running_var":
    return f"batch_stats/{module_path}/var", array
  if param == "weight" and array.ndim == 4:  # conv (O, I, H, W) -> (H, W, I, O)
    return f"params/{module_path}/kernel", array.transpose(2, 3, 1, 0)
  if param == "weight" and array.ndim == 2:  # linear (O, I) -> (I, O)
    return f"params/{module_path}/kernel", array.T
  if param == "weight":  # BN
    return f"params/{module_path}/scale", array
  return f"params/{module_path}/{param}", array


def _torch_resnet_module(parts: list[str]) -> str | None:
  """'layer1.0.downsample.1' -> 'layer1_0/downsample_bn'; None if not a torchvision ResNet name."""
  if len(parts) == 1 and parts[0] in ("conv1", "bn1", "fc"):
    return parts[0]
  if len(parts) >= 3 and re.fullmatch(r"layer\d", parts[0]) and parts[1].isdigit():
    block = f"{parts[0]}_{parts[1]}"
    rest = parts[2:]
    if rest == ["downsample", "0"]:
      return f"{block}/downsample_conv"
    if rest == ["downsample", "1"]:
      return f"{block}/downsample_bn"
    if len(rest) == 1 and re.fullmatch(r"(conv|bn)\d", rest[0]):
      return f"{block}/{rest[0]}"
  return None


_TV_MBCONV_EXPAND = ("expand", "dw", "se", "project")
_TV_MBCONV_PLAIN = ("dw", "se", "project")
_TV_MBCONV_NAMES = {
  ("expand", "0"): "expand_conv",
  ("expand", "1"): "expand_bn",
  ("dw", "0"): "dwconv",
  ("dw", "1"): "bn",
  ("se", "fc1"): "se_reduce",
  ("se", "fc2"): "se_expand",
  ("project", "0"): "project_conv",
  ("project", "1"): "project_bn",
}


def _torch_efficientnet_module(parts: list[str], expands: dict[str, bool]) -> str | None:
  """'features.2.0.block.1.0' -> 'block2a/dwconv'; None if not a torchvision EfficientNet name."""
  if parts[:1] == ["classifier"] and parts[1:] == ["1"]:
    return "predictions"
  if parts[:1] != ["features"] or len(parts) < 3 or not all(p.isdigit() for p in parts[1:3]):
    return None
  stage = int(parts[1])
  if parts[2:] in (["0"], ["1"]) and stage in (0, 8):  # stem / top conv-BN pairs
    prefix = "stem" if stage == 0 else "top"
    return f"{prefix}_{'conv' if parts[2] == '0' else 'bn'}"
  if len(parts) == 6 and parts[3] == "block" and parts[4].isdigit():
    block = f"block{stage}{chr(97 + int(parts[2]))}"
    roles = _TV_MBCONV_EXPAND if expands[".".join(parts[:3])] else _TV_MBCONV_PLAIN
    index = int(parts[4])
    if index < len(roles) and (roles[index], parts[5]) in _TV_MBCONV_NAMES:
      return f"{block}/{_TV_MBCONV_NAMES[roles[index], parts[5]]}"
  return None


def map_torch(tensors: dict[str, np.ndarray], family: str):
  """torchvision/timm state dict -> ({Flax name: array}, [source names that map to nothing])."""
  tensors = {k.removeprefix("module."): v for k, v in tensors.items()}  # DataParallel's prefix
  expands = {}
  for key in tensors:  # an MBConv with an expansion conv has 4 sub-layers, else 3
    m = re.match(r"(features\.\d+\.\d+)\.block\.(\d+)\.", key)
    if m:
      expands[m[1]] = max(expands.get(m[1], False), int(m[2]) == 3)
  out, unknown = {}, []
  for key, array in tensors.items():
    parts = key.split(".")
    if family == "resnet":
      module = _torch_resnet_module(parts[:-1])
    else:
      module = _torch_efficientnet_module(parts[:-1], expands)
    leaf = _torch_leaf(module, parts[-1], array) if module else None
    if module is None:
      unknown.append(key)
    elif leaf is not None:
      out[leaf[0]] = leaf[1]
  return out, unknown


_KERAS_BN = {"gamma": "params/{}/scale", "beta": "params/{}/bias"}
_KERAS_BN_STATS = {"moving_mean": "batch_stats/{}/mean", "moving_variance": "batch_stats/{}/var"}


def _keras_resnet_module(layer: str) -> str | None:
  """'conv3_block2_1_conv' -> 'layer2_1/conv1'; '_0_' is the shortcut; None if not ResNet50's."""
  if layer in ("conv1_conv", "conv1_bn"):
    return "conv1" if layer.endswith("conv") else "bn1"
  if layer == "predictions":
    return "fc"
  m = re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", layer)
  if not m:
    return None
  block = f"layer{int(m[1]) - 1}_{int(m[2]) - 1}"
  if m[3] == "0":
    return f"{block}/downsample_{m[4]}"
  return f"{block}/{m[4]}{m[3]}"


def _keras_efficientnet_module(layer: str) -> str | None:
  """'block2a_expand_conv' -> 'block2a/expand_conv'; None if not an EfficientNet layer name."""
  if layer in ("stem_conv", "stem_bn", "top_conv", "top_bn", "predictions"):
    return layer
  m = re.fullmatch(r"(block\d+[a-z])_(.+)", layer)
  return f"{m[1]}/{m[2]}" if m else None


def map_keras(tensors: dict[str, np.ndarray], family: str):
  """Keras 'layer/var' weights -> ({Flax name: array}, [names that map to nothing])."""
  out, unknown, conv_biases = {}, [], {}
  for key, array in tensors.items():
    layer, var = key.rsplit("/", 1)
    if re.fullmatch(r"normalization(_\d+)?", layer):
      # The input Normalization layer's ImageNet mean/variance: jaxsam's input pipeline normalises.
      continue
    if family == "resnet":
      module = _keras_resnet_module(layer)
    else:
      module = _keras_efficientnet_module(layer)
    if module is None:
      unknown.append(key)
    elif var in _KERAS_BN:
      out[_KERAS_BN[var].format(module)] = array
    elif var in _KERAS_BN_STATS:
      out[_KERAS_BN_STATS[var].format(module)] = array
    elif var == "kernel" and array.ndim == 4 and array.shape[-1] == 1 and "dwconv" in module:
      out[f"params/{module}/kernel"] = array.transpose(0, 1, 3, 2)  # (k, k, C, 1) -> (k, k, 1, C)
    elif var == "bias" and family == "resnet" and module != "fc":
      conv_biases[module] = array
    else:
      out[f"params/{module}/{var}"] = array
  # Keras' ResNet50 convs have biases, each followed by BN; BN subtracts the mean right after, so
  # BN(conv(x) + b) with mean m equals BN(conv(x)) with mean m - b, exactly, in train and eval.
  for conv, bias in conv_biases.items():
    bn = re.sub(r"conv(\d?)$", r"bn\1", conv)
    mean = f"batch_stats/{bn}/mean"
    if mean not in out:
      unknown.append(f"{conv}/bias")
    else:
      out[mean] = out[mean] - bias
  return out, unknown


# ------------------------------------------------------------------------------------- matching


def _family(name: str) -> str:
  return "efficientnet" if name.startswith("efficientnet") else "resnet"


def to_flax_names(path: str, model_ref) -> dict[str, np.ndarray]:
  """Reads `path` and renames its tensors to the Flax variables of `model_ref`
  ('params/a/b/kernel').

  Raises PretrainedError when the file's layout is not the model's (e.g. Keras weights for a
  torchvision-layout model) or a tensor has no Flax counterpart.
  """
  path = os.fspath(path)
  name, layout = model_layout(model_ref)
  if layout == "vit":
    from jaxsam.models import vit_import

    return vit_import.to_flax_names(path, model_ref)
  tensors, kind, metadata = read_file(path)
  check_finite(tensors, path)
  if kind == JAXSAM_FORMAT:
    saved = metadata.get("layout", "")
    if saved != layout:
      raise PretrainedError(
        f"{path!r} was converted for a {saved!r}-layout model ({metadata.get('model')}); "
        f"{name} here has the {layout!r} layout"
      )
    return tensors
  if kind == "npz":
    raise PretrainedError(
      f"{path!r} is a ViT .npz checkpoint; only the ViTs (vit_*) read .npz files, {name} is not one"
    )
  if layout == JAXSAM_FORMAT:
    raise PretrainedError(
      f"{name!r} with this config has no torchvision/Keras layout (CIFAR nets, cifar_stem); pass "
      f"a file saved by jaxsam (.safetensors/.msgpack) or use resnet18..152 / efficientnet_b0..b7"
    )
  if kind != layout:
    raise PretrainedError(
      f"{path!r} holds {kind} weights but {name} is in the {layout} layout; "
      f"{_LAYOUT_FIX[_family(name), kind]}"
    )
  mapped, unknown = (map_torch if kind == "torchvision" else map_keras)(tensors, _family(name))
  if unknown:
    raise PretrainedError(
      f"{path!r} does not fit {name}: unexpected tensors {_names(unknown)} "
      f"(weights of another architecture?)"
    )
  return mapped


def check_finite(tensors: dict[str, np.ndarray], path: str) -> None:
  """PretrainedError naming the file's first tensor (in file order) that holds NaN or inf."""
  for key, array in tensors.items():
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
      bad = int(np.size(array) - np.isfinite(array).sum())
      raise PretrainedError(
        f"{path!r} holds non-finite values (NaN or inf) in tensor {key!r} ({bad} of "
        f"{np.size(array)}); refusing to train from it: download or convert the file again"
      )


_LAYOUT_FIX = {
  ("resnet", "keras"): "Keras' ResNet50 needs config.model.resnet_v1=True",
  ("resnet", "torchvision"): "torchvision/timm ResNets need config.model.resnet_v1=False",
  (
    "efficientnet",
    "torchvision",
  ): "torchvision's EfficientNet needs model name efficientnet_bN_torchvision",
  ("efficientnet", "keras"): "Keras' EfficientNet needs model name efficientnet_bN (TF padding)",
}


def _names(names, limit: int = 6) -> str:
  names = sorted(names)
  more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _is_head(flax_name: str) -> bool:
  return flax_name.split("/")[1] in HEADS


def match(file_tensors: dict[str, np.ndarray], target_shapes: dict[str, tuple], source: str):
  """Checks names and shapes; returns the Flax names whose tensors come from the file.

  Head tensors that are absent or of another class count are left out (fresh init); any other
  missing, unexpected or wrongly shaped tensor raises PretrainedError naming it.
  """
  missing = [k for k in target_shapes if k not in file_tensors and not _is_head(k)]
  unexpected = [k for k in file_tensors if k not in target_shapes]
  wrong = [
    f"{k} {tuple(file_tensors[k].shape)} vs model {tuple(shape)}"
    for k, shape in target_shapes.items()
    if k in file_tensors and tuple(file_tensors[k].shape) != tuple(shape) and not _is_head(k)
  ]
  problems = []
  if missing:
    problems.append(f"missing {_names(missing)}")
  if unexpected:
    problems.append(f"unexpected {_names(unexpected)}")
  if wrong:
    problems.append(f"wrong shape {_names(wrong, 3)}")
  if problems:
    raise PretrainedError(f"{source} does not fit the model: {'; '.join(problems)}")
  return [
    k
    for k, shape in target_shapes.items()
    if k in file_tensors and tuple(file_tensors[k].shape) == tuple(shape)
  ]


def _flatten(variables) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")


def load_pretrained(path: str, model_ref, variables):
  """Returns `variables` with every tensor replaced by the weight file's.

  Args:
    path: a weight file (see the module docstring for formats).
    model_ref: the model's registered name, its `config.model`, or the module itself; tells the
      layout the file must have (e.g. config.model.resnet_v1 for Keras' ResNet50).
    variables: freshly initialised variables of the model ({'params', 'batch_stats'}).

  Returns:
    The variables with the file's tensors (float32); the classifier head is kept from `variables`
    when the file's class count differs or the file has no head.

  Raises:
    PretrainedError: wrong path, unreadable/truncated/non-weight file, `.pth` without torch,
      another layout, or missing / unexpected / wrongly shaped tensors (named, one line).
  """
  path = os.fspath(path)
  if model_layout(model_ref)[1] == "vit":  # position-embedding resampling, 'head': vit_import.py
    from jaxsam.models import vit_import

    return vit_import.load_pretrained(path, model_ref, variables)
  file_tensors = to_flax_names(path, model_ref)
  flat = _flatten(variables)
  taken = match(file_tensors, {k: v.shape for k, v in flat.items()}, repr(os.fspath(path)))
  fresh = sorted(set(flat) - set(taken))
  if fresh:
    logging.info("pretrained %s: kept freshly initialised %s", path, ", ".join(fresh))
  for k in taken:
    flat[k] = jnp.asarray(file_tensors[k], dtype=flat[k].dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------------------ jaxsam's own files


def convert_file(input_path: str, output_path: str, model_config, origin: str) -> int:
  """Converts a weight file into jaxsam's own file for `model_config`; returns the tensor count.

  The tensors are checked against the model's shapes (built with jax.eval_shape, so nothing is
  compiled); the head's class count is the file's own (1000 when it has none).
  """
  from jaxsam import models  # here: jaxsam.models imports this module
  from jaxsam.models import vit, vit_import  # here too

  tensors = to_flax_names(input_path, model_config)
  heads = ("params/fc/bias", "params/predictions/bias", "params/head/bias")
  head = [v for k, v in tensors.items() if k in heads]
  num_classes = int(head[0].shape[0]) if head else 1000
  module = models.create_model(model_config, num_classes=num_classes)
  is_vit = vit_import.is_vit(model_config.name)
  size = _vit_resolution(tensors, vit.SIZES[model_config.name].patch) if is_vit else 64
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, train=False))
  flat_shapes = {k: v.shape for k, v in _flatten(shapes).items()}
  if is_vit:  # ViT: its own head name; the file's position-embedding grid is kept as it is
    taken = list(vit_import.match(tensors, flat_shapes, repr(os.fspath(input_path))))
  else:
    taken = match(tensors, flat_shapes, repr(os.fspath(input_path)))
  save_variables(output_path, {k: tensors[k] for k in taken}, model_config, origin)
  return len(taken)


def _vit_resolution(tensors: dict, patch: int) -> int:
  """The image side a ViT file was trained at: its position-embedding grid times the patch."""
  from jaxsam.models import vit_import  # here: jaxsam.models imports this module

  pos = tensors.get(vit_import.POS)
  if pos is None:
    return 224
  tokens = pos.shape[1] - ("params/cls" in tensors)
  return round(tokens**0.5) * patch


def save_variables(path: str, variables, model_ref, origin: str = "") -> None:
  """Writes variables as a jaxsam weight file (.safetensors or .msgpack) that records the layout.

  `origin` (one of ORIGINS, or '' for none) is recorded too: it decides the input normalisation.
  """
  name, layout = model_layout(model_ref)
  if origin and origin not in ORIGINS:
    raise PretrainedError(f"weights origin {origin!r} is unknown; known: {', '.join(ORIGINS)}")
  # Contiguous copies: safetensors writes a transposed view's buffer in memory order, scrambled.
  flat = {
    k: np.ascontiguousarray(jax.device_get(v), dtype=np.float32)
    for k, v in _flatten(variables).items()
  }
  metadata = {"format": JAXSAM_FORMAT, "model": str(name), "layout": layout, "origin": origin}
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix == ".safetensors":
    from safetensors.numpy import save_file

    save_file(flat, path, metadata=metadata)
  elif suffix == ".msgpack":
    tree = flax.traverse_util.unflatten_dict(flat, sep="/")
    tree["__jaxsam__"] = metadata
    with open(path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(tree))
  else:
    raise PretrainedError(f"output {path!r} must end in .safetensors or .msgpack")
