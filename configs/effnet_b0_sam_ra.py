"""EfficientNet-B0 (ImageNet-pretrained, Keras weights), SAM + RandAugment on CIFAR-100 at 224 px.

  python launch.py --config=configs/effnet_b0_sam_ra.py
      # fetches keras/efficientnetb0 on first use

The original project's EfficientNet-B0 path never ran; this is it, on the same recipe as
configs/sam_ra.py (50 epochs, batch 256, lr 0.1 cosine, wd 1e-4, rho 0.05, sam.m 64), with
BatchNorm statistics frozen while fine-tuning (as google-research/sam fine-tunes EfficientNets).
Expected accuracy: not measured yet (needs CIFAR-100 and a GPU). Runtime: ~1/3 of ResNet-50's.
"""

from configs import common


def get_config():
  config = common.use_randaugment(common.original_study(rho=0.05))
  config.model.name = "efficientnet_b0"
  config.model.pretrained = "keras/efficientnetb0"
  config.model.freeze_bn = True
  return config
