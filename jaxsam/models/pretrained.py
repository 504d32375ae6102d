"""Import of pretrained ResNet and EfficientNet weights: torchvision/timm state dicts, Keras weight
files, jaxsam's own files (read by `weight_files.py`; ViTs are mapped by `vit_import.py`).

Every tensor of the file must land on a model variable of the same shape, and every model variable
must come from the file, except the classifier head (`fc` / `predictions`), which stays freshly
initialised when its class count differs or the file has none. Anything else is a
`PretrainedError` naming the tensors.

`convert_file` converts any file jaxsam imports into jaxsam's own file for a model config, built
from the model registry with jax.eval_shape.
"""

import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxsam import models
from jaxsam.errors import PretrainedError
from jaxsam.models import vit, vit_import, weight_files
from jaxsam.models.weight_files import JAXSAM_FORMAT, model_family, name_list

HEADS = ("fc", "predictions")  # classifier modules, re-initialised when the class count differs

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


def to_flax_names(path: str, model_ref) -> dict[str, np.ndarray]:
  """Reads `path` and renames its tensors to the Flax variables of `model_ref`
  ('params/a/b/kernel').

  Raises PretrainedError when the file's layout is not the model's (e.g. Keras weights for a
  torchvision-layout model) or a tensor has no Flax counterpart.
  """
  path = os.fspath(path)
  name, layout = weight_files.model_layout(model_ref)
  if layout == "vit":
    return vit_import.to_flax_names(path, model_ref)
  tensors, kind, metadata = weight_files.read_file(path)
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
      f"{_LAYOUT_FIX[model_family(name), kind]}"
    )
  mapped, unknown = (map_torch if kind == "torchvision" else map_keras)(tensors, model_family(name))
  if unknown:
    raise PretrainedError(
      f"{path!r} does not fit {name}: unexpected tensors {name_list(unknown)} "
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
    problems.append(f"missing {name_list(missing)}")
  if unexpected:
    problems.append(f"unexpected {name_list(unexpected)}")
  if wrong:
    problems.append(f"wrong shape {name_list(wrong, 3)}")
  if problems:
    raise PretrainedError(f"{source} does not fit the model: {'; '.join(problems)}")
  return [
    k
    for k, shape in target_shapes.items()
    if k in file_tensors and tuple(file_tensors[k].shape) == tuple(shape)
  ]


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
  if weight_files.model_layout(model_ref)[1] == "vit":  # pos-embedding resampling, 'head': there
    return vit_import.load_pretrained(path, model_ref, variables)
  file_tensors = to_flax_names(path, model_ref)
  flat = weight_files.flat_variables(variables)
  taken = match(file_tensors, {k: v.shape for k, v in flat.items()}, repr(os.fspath(path)))
  fresh = sorted(set(flat) - set(taken))
  if fresh:
    logging.info("pretrained %s: kept freshly initialised %s", path, ", ".join(fresh))
  for k in taken:
    flat[k] = jnp.asarray(file_tensors[k], dtype=flat[k].dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------------------------ converting


def convert_file(input_path: str, output_path: str, model_config, origin: str) -> int:
  """Converts a weight file into jaxsam's own file for `model_config`; returns the tensor count.

  The tensors are checked against the model's shapes (built with jax.eval_shape, so nothing is
  compiled); the head's class count is the file's own (1000 when it has none).
  """
  tensors = to_flax_names(input_path, model_config)
  heads = ("params/fc/bias", "params/predictions/bias", "params/head/bias")
  head = [v for k, v in tensors.items() if k in heads]
  num_classes = int(head[0].shape[0]) if head else 1000
  module = models.create_model(model_config, num_classes=num_classes)
  is_vit = vit_import.is_vit(model_config.name)
  size = _vit_resolution(tensors, vit.SIZES[model_config.name].patch) if is_vit else 64
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, train=False))
  flat_shapes = {k: v.shape for k, v in weight_files.flat_variables(shapes).items()}
  if is_vit:  # ViT: its own head name; the file's position-embedding grid is kept as it is
    taken = list(vit_import.match(tensors, flat_shapes, repr(os.fspath(input_path))))
  else:
    taken = match(tensors, flat_shapes, repr(os.fspath(input_path)))
  weight_files.save_variables(output_path, {k: tensors[k] for k in taken}, model_config, origin)
  return len(taken)


def _vit_resolution(tensors: dict, patch: int) -> int:
  """The image side a ViT file was trained at: its position-embedding grid times the patch."""
  pos = tensors.get(vit_import.POS)
  if pos is None:
    return 224
  tokens = pos.shape[1] - ("params/cls" in tensors)
  return round(tokens**0.5) * patch
