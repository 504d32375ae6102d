r"""Converts a torchvision/timm/Keras weight file once into jaxsam's own format, for fast launches.

  python -m jaxsam.convert --model=resnet50 --input=resnet50.pth --output=resnet50.safetensors
  python -m jaxsam.convert --model=resnet50 --resnet_v1 --input=resnet50_keras.h5 \
      --output=resnet50_v1.safetensors
  python -m jaxsam.convert --model=efficientnet_b0 --input=efficientnetb0.h5 --output=b0.msgpack
  python -m jaxsam.convert --model=resnet50 --origin=timm --input=timm_resnet50.safetensors \
      --output=resnet50_timm.safetensors
  python -m jaxsam.convert --model=vit_b16 --input=ViT-B_16.npz --output=vit_b16_sam.safetensors

The output (.safetensors or .msgpack) holds the Flax variables under '/'-joined names and records
the model's layout and the weights' origin (Keras files: keras; torch state dicts: torchvision, or
timm with --origin=timm), from which `model.normalization=auto` picks the input normalisation;
point `config.model.pretrained` at it. Every tensor is checked against the
model's shapes (computed with jax.eval_shape, so nothing is compiled).
"""

import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from jaxsam import models
from jaxsam.errors import ConfigError, UserError
from jaxsam.models import pretrained, vit, vit_import

_MODEL = flags.DEFINE_string("model", None, "registered model name, e.g. resnet50", required=True)
_INPUT = flags.DEFINE_string("input", None, "weight file to convert", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "output .safetensors or .msgpack", required=True)
_RESNET_V1 = flags.DEFINE_bool("resnet_v1", False, "v1 layout (Keras' ResNet50 weights)")
_ORIGIN = flags.DEFINE_string(
  "origin", "", "who trained the weights: keras, torchvision or timm; '' = from the input's format"
)


def convert(
  model_name: str, input_path: str, output_path: str, resnet_v1: bool = False, origin: str = ""
) -> int:
  """Converts `input_path` for `model_name`; returns the number of tensors written."""
  model_config = ml_collections.ConfigDict({"name": model_name, "resnet_v1": resnet_v1})
  origin = _origin(input_path, origin)
  tensors = pretrained.to_flax_names(input_path, model_config)
  heads = ("params/fc/bias", "params/predictions/bias", "params/head/bias")
  head = [v for k, v in tensors.items() if k in heads]
  num_classes = int(head[0].shape[0]) if head else 1000
  module = models.create_model(model_config, num_classes=num_classes)
  size = _vit_resolution(tensors, model_name) if vit_import.is_vit(model_name) else 64
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, train=False))
  flat_shapes = {k: v.shape for k, v in pretrained._flatten(shapes).items()}
  if vit_import.is_vit(model_name):  # ViT: its own head name; the file's grid is kept as it is
    taken = list(vit_import.match(tensors, flat_shapes, repr(input_path)))
  else:
    taken = pretrained.match(tensors, flat_shapes, repr(input_path))
  pretrained.save_variables(output_path, {k: tensors[k] for k in taken}, model_config, origin)
  return len(taken)


def _vit_resolution(tensors: dict, model_name: str) -> int:
  """The image side a ViT file was trained at: its position-embedding grid times the patch."""
  pos = tensors.get(vit_import.POS)
  if pos is None:
    return 224
  tokens = pos.shape[1] - ("params/cls" in tensors)
  return round(tokens**0.5) * vit.SIZES[model_name].patch


def _origin(input_path: str, origin: str) -> str:
  """The weights' origin: the input's own, or `origin` where the input's format allows it."""
  if origin and origin not in pretrained.ORIGINS:
    raise ConfigError(f"--origin={origin!r} is unknown; known: {', '.join(pretrained.ORIGINS)}")
  found = pretrained.weights_origin(input_path)
  allowed = {"keras": ("keras",), "torchvision": ("torchvision", "timm")}.get(
    found, pretrained.ORIGINS
  )
  if origin and origin not in allowed:
    raise ConfigError(
      f"--origin={origin!r} does not fit {input_path!r}, a {found} weight file; "
      f"accepted: {', '.join(allowed)}"
    )
  return origin or found


def main(argv):
  del argv
  try:
    count = convert(_MODEL.value, _INPUT.value, _OUTPUT.value, _RESNET_V1.value, _ORIGIN.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {count} tensors for {_MODEL.value} to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
