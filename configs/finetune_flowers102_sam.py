"""Fine-tuning an ImageNet-pretrained ResNet-50 on Oxford Flowers-102 at 224 px with SAM, streamed.

  python launch.py --config=configs/finetune_flowers102_sam.py
      # fetches torchvision/resnet50 on first use
  sbatch --nodes=2 --gpus-per-node=4 scripts/slurm.sh configs/finetune_flowers102_sam.py

tfds `oxford_flowers102` (downloaded and prepared on first use, 330 MB): 102 classes, photos of
varying size, 1,020 train, 1,020 validation and 6,149 test images. It trains on `train` and
scores `test`; the images are streamed from the record files (they have no single size), each
train image an Inception random-resized crop (area 0.08-1, aspect 3/4-4/3) to 224 and a flip,
each test image resized to 256 and centre-cropped to 224. The 1000-class head of the weights is
replaced by a fresh 102-class one; `model.normalization=auto` feeds the torchvision weights
ImageNet's mean and std.

The recipe is jaxsam's, not a paper's: 50 epochs of global batch 64 (15 steps each, 750 in all),
SGD momentum 0.9, lr 0.01 cosine after 1 warm-up epoch, weight decay 1e-4, SAM rho 0.05, BN
statistics updated (not frozen), sam.m = 8 examples per ascent (jaxsam's choice; no source: the
per-device batch of the 8-GPU slurm line above, so one device runs the same algorithm). Train on
train + validation (2,040 images) with --config.dataset.train_split=train+validation once it is
checked to stream (a combined tfds split has not been tested on the streamed path). Plain SGD:
--config.sam.rho=0.
Expected accuracy: not measured (no session has had the dataset or a GPU). Runtime: 48 k train
and 61 k test images (10 evaluations); on one GPU the steps take well under a minute, so the
run is bound by the input: 109 k images / (8 cores x 74 images per CPU-second, the streamed
rate in README's Measured section) = about 3 minutes with 8 cores, plus start-up and compiling.
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.dtype = "bfloat16"

  config.dataset.name = "oxford_flowers102"
  config.dataset.train_split = "train"
  config.dataset.test_split = "test"
  config.dataset.in_memory = "false"  # images of varying size: streamed
  config.dataset.shuffle_buffer = 1020  # the whole train split in one shuffle window
  config.dataset.eval_crop_fraction = 0.875

  config.model.name = "resnet50"
  config.model.image_size = 224
  config.model.pretrained = common.PRETRAINED_RESNET50

  config.num_epochs = 50
  config.batch_size = 64
  config.eval_batch_size = 256

  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 1.0

  config.sam.rho = 0.05
  config.sam.m = 8  # examples per ascent on any device count up to 8

  config.augment.random_resized_crop = True
  config.augment.crop_scale = (0.08, 1.0)
  config.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  config.augment.crop_padding = 0
  config.augment.flip = True

  config.log_every_steps = 15
  config.eval_every_epochs = 5
  config.checkpoint_every_epochs = 5
  return config
