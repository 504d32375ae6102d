"""CIFAR-10 from scratch with SGD: ResNet-18 (CIFAR stem) at 32 px, crop + flip, 30 epochs.

  python launch.py --config=configs/cifar10_sgd.py                      # tfds cifar10 (downloads)
  python launch.py --config=configs/cifar10_sgd.py --config.dataset.source=image_folder \
      --config.dataset.path=../shared/data/cifar10-jpeg.tar.gz            # CIFAR-10 as JPEG folders

The SGD arm of `python -m jaxsam.study --size=gpu`: global batch 256, lr 0.1 cosine with one
warm-up epoch, momentum 0.9, weight decay 5e-4 (the SAM paper's CIFAR recipe, shortened to 30
epochs), bf16 compute. Plain SGD: one forward-backward pass per step.
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.dataset.name = "cifar10"
  config.model.name = "resnet18"
  config.model.cifar_stem = True
  config.model.image_size = 32
  config.dtype = "bfloat16"
  config.num_epochs = 30
  config.batch_size = 256
  config.eval_batch_size = 1000
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 1.0
  config.augment.crop_padding = 4
  config.augment.crop_fill = "reflect"
  config.augment.flip = True
  config.log_every_steps = 50
  return config
