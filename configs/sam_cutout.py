"""The original study, SAM (rho 0.05) + Cutout: ImageNet-pretrained ResNet-50, CIFAR-100 at 224 px.

  python launch.py --config=configs/sam_cutout.py   # fetches torchvision/resnet50 on first use

50 epochs, global batch 256, SGD momentum 0.9, lr 0.1 cosine, weight decay 1e-4, SAM's ascent on
groups of sam.m = 64 (the original ascended on all 256 at once: common.original_study says why).
The original PyTorch run reported 83.1 % test accuracy (with a constant lr and no weight
decay on its SAM runs, and Cutout applied after upscaling). jaxsam's number: not measured yet
(needs CIFAR-100 and a GPU).
Runtime: about 50 x 195 steps; a few hours on 4 GPUs (SAM costs 2x SGD per step).
"""

from configs import common


def get_config():
  return common.use_cutout(common.original_study(rho=0.05))
