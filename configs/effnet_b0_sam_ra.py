"""EfficientNet-B0 (ImageNet-pretrained, Keras weights), SAM + RandAugment on CIFAR-100 at 224 px.

  python -m jaxsam.convert --model=efficientnet_b0 --input=efficientnetb0.h5 \
      --output=weights/efficientnet_b0_keras.msgpack    # once: Keras' ImageNet weights
  python launch.py --config=configs/effnet_b0_sam_ra.py

The original project's EfficientNet-B0 path never ran; this is it, on the same recipe as
configs/sam_ra.py (50 epochs, batch 256, lr 0.1 cosine, wd 1e-4, rho 0.05, sam.m 64), with
BatchNorm statistics frozen while fine-tuning (as google-research/sam fine-tunes EfficientNets).
Expected accuracy: not measured yet (needs CIFAR-100 and a GPU). Runtime: ~1/3 of ResNet-50's.
"""

from configs import common


def get_config():
  config = common.use_randaugment(common.original_study(rho=0.05))
  config.model.name = "efficientnet_b0"
  config.model.pretrained = "weights/efficientnet_b0_keras.msgpack"
  config.model.freeze_bn = True
  return config
