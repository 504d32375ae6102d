"""CIFAR-10 from scratch with a CPU-sized ViT and AdamW: the ViT arm of the study.

  python launch.py --config=configs/cifar10_vit_tiny.py --config.dataset.source=image_folder \
      --config.dataset.path=../shared/data/cifar10-jpeg.tar.gz
  python -m jaxsam.study --size=cpu --model=vit_tiny --data=../shared/data/cifar10-jpeg.tar.gz \
      --out=runs/study_vit_cpu                      # AdamW vs AdamW + SAM, clean and 40 % noise

`vit_tiny`: patch 4, width 96, 4 pre-LN blocks of 3 heads, class token (16 tokens + 1 at the
study's 16 px, 64 + 1 at 32 px), 0.45M parameters. The optimizer is the ViT recipes' in small:
AdamW (decay on kernels only), grad clipping at 1, linear warmup then cosine. Values chosen for
this size, not taken from a paper: lr 1e-3 and weight decay 0.05 are DeiT's (Touvron et al. 2021,
lr 5e-4 x batch/512, wd 0.05) rounded for batch 128-256; 2 warm-up epochs. The SAM arm adds
sam.rho = 0.05 (the ResNet arms' radius; Chen et al. 2022 use 0.05-0.2 with AdamW on ImageNet
ViTs), per device, two passes per step.
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.dataset.name = "cifar10"
  config.model.name = "vit_tiny"
  config.model.image_size = 32
  config.model.pool = "token"
  config.dtype = "bfloat16"
  config.num_epochs = 30
  config.batch_size = 256
  config.eval_batch_size = 1000
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 2.0
  config.augment.crop_padding = 4
  config.augment.crop_fill = "reflect"
  config.augment.flip = True
  config.log_every_steps = 50
  return config
