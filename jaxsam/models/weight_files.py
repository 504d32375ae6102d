"""Weight files and the layout questions around them: which file formats jaxsam reads, what layout
a model's weights have, who trained a file's weights and the input normalisation that implies, and
jaxsam's own weight files (read and written here).

Formats, chosen by the file's suffix:
  .safetensors          a torch state dict (read without torch) or a file jaxsam wrote
  .pth .pt .bin         a torch state dict, read with torch.load(weights_only=True) (needs torch)
  .h5 .keras            Keras weights (legacy `save_weights` h5 as the official ImageNet files,
                        Keras 3 `.weights.h5`, or a `.keras` archive)
  .npz                  original-ViT / big_vision checkpoints
  .msgpack              a file jaxsam wrote (flax.serialization msgpack)

jaxsam's own files (`save_variables`) hold the Flax variables under '/'-joined names
('params/conv1/kernel', 'batch_stats/bn1/mean') and record the model's layout, so converted files
load without re-mapping and a file of another layout is refused. They also record the weights'
origin ('keras', 'torchvision', 'timm'), which fixes the input normalisation the weights expect
(`input_normalization`): Keras' ResNet50 was trained on caffe-style BGR input, the rest on
ImageNet mean/std.

Mapping a file's names onto a model is the importers' job: `pretrained.py` (ResNet,
EfficientNet) and `vit_import.py` (ViT), which both read files through this module.
"""

import io
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

from jaxsam.errors import PretrainedError
from jaxsam.models import efficientnet, resnet, vit

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
KERAS_SUFFIXES = (".h5", ".keras")
SUFFIXES = (".safetensors", ".msgpack", ".npz") + TORCH_SUFFIXES + KERAS_SUFFIXES
IMAGENET_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
JAXSAM_FORMAT = "jaxsam"
ORIGINS = ("keras", "torchvision", "timm")  # who trained the weights: their input convention

# --------------------------------------------------------------------------- what the model expects


def model_layout(model_ref) -> tuple[str, str]:
  """(name, layout) of a model: layout 'torchvision', 'keras' or 'jaxsam' (no external weights).

  `model_ref` is a registered name, a `config.model` ConfigDict, or a module built by
  `jaxsam.models` (whose attributes tell the layout).
  """
  if isinstance(model_ref, vit.ViT):  # ViTs: their files map in vit_import.py
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


def model_family(name: str) -> str:
  """'efficientnet' or 'resnet': which of pretrained.py's name maps a non-ViT model takes."""
  return "efficientnet" if name.startswith("efficientnet") else "resnet"


# --------------------------------------------------------------------------------- reading files


def read_file(path: str) -> tuple[dict[str, np.ndarray], str, dict[str, str]]:
  """Reads a weight file into ({source name: array}, source kind, metadata).

  The kind is 'torchvision' (torch state-dict names), 'keras' ('layer/variable' names), 'npz'
  (original-ViT names) or 'jaxsam'.
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
      return _read_npz(path), "npz", {}
    return _read_keras(path, suffix), "keras", {}
  except PretrainedError:
    raise
  except Exception as e:  # any reader failure means an unreadable or truncated file
    raise PretrainedError(
      f"cannot read {path!r} as a {suffix} weight file (truncated or not a weight file?): "
      f"{one_line(e)}"
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
        f"cannot read {path!r} as a .safetensors weight file: {one_line(e)}"
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
  if model_name == "vit" or model_name in vit.SIZES:
    return "inception"
  return "caffe" if model_family(model_name) == "resnet" and origin == "keras" else "imagenet"


def one_line(e: Exception) -> str:
  """An exception as one line: its type and its message's first line."""
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


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` checkpoint by name (no pickled objects are loaded)."""
  with np.load(path, allow_pickle=False) as f:
    return {k: np.asarray(f[k]) for k in f.files}


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
      f"cannot read {path!r} as a torch state dict (truncated or not a weight file?): {one_line(e)}"
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


# ------------------------------------------------------------------------------------ messages


def name_list(names, limit: int = 6) -> str:
  """The first `limit` names, sorted and comma-separated, and how many more: for error lines."""
  names = sorted(names)
  more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


# ------------------------------------------------------------------------------ jaxsam's own files


def flat_variables(variables) -> dict[str, Any]:
  """Flax variables as {'/'-joined name: array}, the names jaxsam's own files use."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")


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
    for k, v in flat_variables(variables).items()
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
