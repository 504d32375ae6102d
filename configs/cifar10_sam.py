"""CIFAR-10 from scratch with SAM (rho 0.05): configs/cifar10_sgd.py with SAM on top.

  python launch.py --config=configs/cifar10_sam.py
  python launch.py --config=configs/cifar10_sam.py --config.dataset.source=image_folder \
      --config.dataset.path=../shared/data/cifar10-jpeg.tar.gz

The SAM arm of `python -m jaxsam.study --size=gpu`: the same model, data, schedule and epochs as
the SGD config, with SAM's ascent of radius 0.05 per device; a step costs two forward-backward
passes, so the study pairs it with an SGD arm of twice the epochs.
"""

from configs import cifar10_sgd


def get_config():
  config = cifar10_sgd.get_config()
  config.sam.rho = 0.05
  return config
