"""CIFAR-10 from scratch with SAM (rho 0.05): configs/cifar10_sgd.py with SAM on top.

  python launch.py --config=configs/cifar10_sam.py
  python launch.py --config=configs/cifar10_sam.py --config.dataset.source=image_folder \
      --config.dataset.path=../shared/data/cifar10-jpeg.tar.gz

The SAM arm of `python -m jaxsam.study --size=gpu`: the same model, data, schedule and epochs as
the SGD config, with SAM's ascent of radius 0.05 per device; a step costs two forward-backward
passes, so the study pairs it with an SGD arm of twice the epochs.

sam.m = 32, the same algorithm on any device count whose per-device batch 32 divides: the SAM
paper's code (google-research/sam, README) ran its CIFAR models on 8 GPUs at global batch 256,
each replica ascending on its own 32 examples (sync_perturbations=False). The paper's own device
count for its CIFAR tables is not in that code, and could not be read here.
"""

from configs import cifar10_sgd


def get_config():
  config = cifar10_sgd.get_config()
  config.sam.rho = 0.05
  config.sam.m = 32  # examples per ascent: the sam code's 256 over 8 replicas
  return config
