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

import ml_collections
from absl import app, flags

from jaxsam import cli
from jaxsam.errors import ConfigError
from jaxsam.models import pretrained, weight_files

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
  return pretrained.convert_file(input_path, output_path, model_config, _origin(input_path, origin))


def _origin(input_path: str, origin: str) -> str:
  """The weights' origin: the input's own, or `origin` where the input's format allows it."""
  if origin and origin not in weight_files.ORIGINS:
    raise ConfigError(f"--origin={origin!r} is unknown; known: {', '.join(weight_files.ORIGINS)}")
  found = weight_files.weights_origin(input_path)
  allowed = {"keras": ("keras",), "torchvision": ("torchvision", "timm")}.get(
    found, weight_files.ORIGINS
  )
  if origin and origin not in allowed:
    raise ConfigError(
      f"--origin={origin!r} does not fit {input_path!r}, a {found} weight file; "
      f"accepted: {', '.join(allowed)}"
    )
  return origin or found


@cli.entry
def main(argv):
  del argv
  count = convert(_MODEL.value, _INPUT.value, _OUTPUT.value, _RESNET_V1.value, _ORIGIN.value)
  print(f"wrote {count} tensors for {_MODEL.value} to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
