"""ViT weight import: timm state dicts and original-ViT / big_vision `.npz` files -> `vit.ViT`.

Layout name: 'vit' (what `weight_files.model_layout` returns for a ViT and jaxsam's own files
record). Sources, by suffix:
  .safetensors / .pth / .bin   a timm VisionTransformer state dict (`patch_embed.proj`, `cls_token`,
                               `pos_embed`, `blocks.{i}.attn.qkv`, `norm` or `fc_norm`, `head`);
                               safetensors is read without torch
  .npz                         google-research/vision_transformer checkpoints (`ViT-B_16.npz`, the
                               SAM and AugReg files; `Transformer/encoderblock_{i}/...`), or
                               big_vision's names for the same (`pos_embedding`, `MlpBlock_0`, a
                               `params/` prefix), per-block or scanned (stacked on axis 0)

Every tensor is checked: each file tensor must land on a model variable and each model variable
must come from the file, with the same shape, except two that are adapted rather than refused:
the position embeddings, resampled bilinearly on their grid when the resolution differs (the class
token's embedding kept as is), and the head, kept freshly initialised when its class count differs
or the file has none.
"""

import contextlib
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxsam.errors import PretrainedError
from jaxsam.models import vit, weight_files
from jaxsam.models.weight_files import name_list

LAYOUT = "vit"
POS = "params/Transformer/posembed_input/pos_embedding"
HEAD = "params/head/"


def is_vit(model_ref) -> bool:
  """Whether `model_ref` (a name, `config.model` or module) is a registered ViT."""
  if isinstance(model_ref, vit.ViT):
    return True
  name = model_ref if isinstance(model_ref, str) else model_ref.get("name", "")
  return name in vit.SIZES


def _heads(model_ref) -> int:
  if isinstance(model_ref, vit.ViT):
    return model_ref.heads
  name = model_ref if isinstance(model_ref, str) else model_ref.get("name")
  return vit.SIZES[name].heads


# ------------------------------------------------------------------------------- timm -> Flax

_TIMM_TOP = {
  "patch_embed.proj.weight": "params/embedding/kernel",
  "patch_embed.proj.bias": "params/embedding/bias",
  "cls_token": "params/cls",
  "pos_embed": POS,
  "norm.weight": "params/Transformer/encoder_norm/scale",
  "norm.bias": "params/Transformer/encoder_norm/bias",
  "fc_norm.weight": "params/fc_norm/scale",
  "fc_norm.bias": "params/fc_norm/bias",
  "head.weight": "params/head/kernel",
  "head.bias": "params/head/bias",
}
_TIMM_BLOCK = {
  "norm1": "LayerNorm_0",
  "norm2": "LayerNorm_2",
  "mlp.fc1": "MlpBlock_3/Dense_0",
  "mlp.fc2": "MlpBlock_3/Dense_1",
}
_ATTN = "MultiHeadDotProductAttention_1"


def map_timm(tensors: dict[str, np.ndarray], heads: int):
  """timm state dict -> ({Flax name: array}, [source names that map to nothing]).

  timm's fused `qkv` Linear (3D, D) splits into Flax's query/key/value DenseGeneral kernels
  (D, heads, D/heads); `attn.proj` (D, D) becomes `out` (heads, D/heads, D).
  """
  out, unknown = {}, []
  for key, a in tensors.items():
    key = key.removeprefix("module.")
    if key in _TIMM_TOP:
      name = _TIMM_TOP[key]
      if key == "patch_embed.proj.weight":
        a = a.transpose(2, 3, 1, 0)  # (O, I, H, W) -> (H, W, I, O)
      elif key == "head.weight":
        a = a.T
      out[name] = a
      continue
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if not m:
      unknown.append(key)
      continue
    block = f"params/Transformer/encoderblock_{m[1]}"
    module, param = m[2], m[3]
    if module in _TIMM_BLOCK:
      flax_module = f"{block}/{_TIMM_BLOCK[module]}"
      if module.startswith("norm"):
        out[f"{flax_module}/{'scale' if param == 'weight' else 'bias'}"] = a
      else:
        out[f"{flax_module}/{'kernel' if param == 'weight' else 'bias'}"] = (
          a.T if param == "weight" else a
        )
    elif module == "attn.qkv":
      width = a.shape[0] // 3
      for part, chunk in zip(("query", "key", "value"), np.split(a, 3, axis=0)):
        if param == "weight":  # (D_out, D_in) -> (D_in, heads, head_dim)
          out[f"{block}/{_ATTN}/{part}/kernel"] = chunk.T.reshape(a.shape[1], heads, -1)
        else:
          out[f"{block}/{_ATTN}/{part}/bias"] = chunk.reshape(heads, width // heads)
    elif module == "attn.proj":
      if param == "weight":  # (D_out, D_in) -> (heads, head_dim, D_out)
        out[f"{block}/{_ATTN}/out/kernel"] = a.T.reshape(heads, -1, a.shape[0])
      else:
        out[f"{block}/{_ATTN}/out/bias"] = a
    else:
      unknown.append(key)
  return out, unknown


# -------------------------------------------------------------------------------- npz -> Flax

# big_vision's names for the original code's modules (its `load` converts the same way).
_BV_BLOCK = {
  "LayerNorm_1": "LayerNorm_2",
  "MultiHeadDotProductAttention_0": _ATTN,
  "MlpBlock_0": "MlpBlock_3",
}


def _npz_name(key: str, big_vision: bool) -> str:
  """An original-ViT name for a checkpoint name (big_vision's renamed back)."""
  key = key.removeprefix("params/")
  if key == "pos_embedding":  # big_vision keeps it at the top
    return "Transformer/posembed_input/pos_embedding"
  m = re.fullmatch(r"(Transformer/encoderblock_\d+)/([^/]+)/(.+)", key)
  if big_vision and m and m[2] in _BV_BLOCK:
    return f"{m[1]}/{_BV_BLOCK[m[2]]}/{m[3]}"
  return key


def map_npz(tensors: dict[str, np.ndarray]):
  """Original-ViT / big_vision `.npz` names -> ({Flax name: array}, [names that map to nothing])."""
  big_vision = not any(_ATTN in k for k in tensors)
  unstacked = {}
  for key, a in tensors.items():
    m = re.fullmatch(r"(?:params/)?Transformer/encoderblock/(.+)", key)
    if m:  # big_vision with scan: one stacked tree, blocks along axis 0
      unstacked.update({f"Transformer/encoderblock_{i}/{m[1]}": b for i, b in enumerate(a)})
    else:
      unstacked[key] = a
  out, unknown = {}, []
  for key, a in unstacked.items():
    name = _npz_name(key, big_vision)
    # pre_logits (i21k checkpoints' representation layer) and anything else: no place here.
    if name.startswith("pre_logits/") or not re.fullmatch(
      r"[A-Za-z0-9_/]+/(kernel|bias|scale|pos_embedding)|cls", name
    ):
      unknown.append(key)
    else:
      out[f"params/{name}"] = a
  return out, unknown


# ------------------------------------------------------------------------ reading and matching


def to_flax_names(path: str, model_ref) -> dict[str, np.ndarray]:
  """Reads `path` (timm, .npz or a jaxsam file of the 'vit' layout) into Flax names."""
  path = os.fspath(path)
  name, _ = weight_files.model_layout(model_ref)
  tensors, kind, metadata = weight_files.read_file(path)
  if kind == weight_files.JAXSAM_FORMAT:
    if metadata.get("layout") != LAYOUT:
      raise PretrainedError(
        f"{path!r} was converted for a {metadata.get('layout')!r}-layout model "
        f"({metadata.get('model')}); {name} here has the {LAYOUT!r} layout"
      )
    return tensors
  if kind == "keras":
    raise PretrainedError(f"{path!r} holds Keras weights; {name} takes timm or ViT .npz weights")
  mapped, unknown = map_npz(tensors) if kind == "npz" else map_timm(tensors, _heads(model_ref))
  if unknown:
    raise PretrainedError(
      f"{path!r} does not fit {name}: unexpected tensors {name_list(unknown)} "
      f"(weights of another architecture or ViT variant?)"
    )
  return mapped


def resample_pos_embedding(pos: np.ndarray, target_shape: tuple, source: str) -> np.ndarray:
  """(1, prefix + G*G, D) -> target (1, prefix + g*g, D): bilinear on the grid, prefix kept.

  Bilinear with half-pixel centres and no antialiasing: torch's
  F.interpolate(mode='bilinear', align_corners=False), as timm's resample_abs_pos_embed with
  interpolation='bilinear', antialias=False.
  """
  (_, n_file, width), (_, n_model, width_model) = pos.shape, target_shape
  for prefix in (1, 0):
    g_file, g_model = (n_file - prefix) ** 0.5, (n_model - prefix) ** 0.5
    if g_file == int(g_file) and g_model == int(g_model) and width == width_model:
      break
  else:
    raise PretrainedError(
      f"{source}: position embeddings {pos.shape} cannot be resampled to the model's "
      f"{tuple(target_shape)} (not a square grid, or another width)"
    )
  g_file, g_model = int(g_file), int(g_model)
  grid = jnp.asarray(pos[0, prefix:], jnp.float32).reshape(g_file, g_file, width)
  grid = jax.image.resize(grid, (g_model, g_model, width), "bilinear", antialias=False)
  logging.info("%s: position embeddings resampled from %d^2 to %d^2", source, g_file, g_model)
  return np.concatenate([pos[:, :prefix], np.asarray(grid).reshape(1, -1, width)], axis=1)


def match(tensors: dict[str, np.ndarray], target_shapes: dict[str, tuple], source: str):
  """Checks names and shapes; returns the tensors to load (pos-emb resampled, head maybe left)."""
  tensors = dict(tensors)
  if POS in tensors and POS in target_shapes and tensors[POS].shape != tuple(target_shapes[POS]):
    # What cannot be resampled is reported below as a wrong shape, with whatever else does not
    # fit (a class-token file for a GAP model: cls and encoder_norm too).
    with contextlib.suppress(PretrainedError):
      tensors[POS] = resample_pos_embedding(tensors[POS], target_shapes[POS], source)
  missing = [k for k in target_shapes if k not in tensors and not k.startswith(HEAD)]
  unexpected = [k for k in tensors if k not in target_shapes]
  wrong = [
    f"{k} {tuple(tensors[k].shape)} vs model {tuple(s)}"
    for k, s in target_shapes.items()
    if k in tensors and tuple(tensors[k].shape) != tuple(s) and not k.startswith(HEAD)
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
  return {k: v for k, v in tensors.items() if tuple(v.shape) == tuple(target_shapes[k])}


def load_pretrained(path: str, model_ref, variables):
  """`variables` with every tensor from the file (see the module docstring for what adapts)."""
  path = os.fspath(path)
  tensors = to_flax_names(path, model_ref)
  flat = weight_files.flat_variables(variables)
  taken = match(tensors, {k: v.shape for k, v in flat.items()}, repr(path))
  fresh = sorted(set(flat) - set(taken))
  if fresh:
    logging.info("pretrained %s: kept freshly initialised %s", path, ", ".join(fresh))
  for k, v in taken.items():
    flat[k] = jnp.asarray(v, dtype=flat[k].dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")
