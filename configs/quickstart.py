"""Quickstart: a small ResNet on scikit-learn's bundled digits, no network needed.

  python launch.py --config=configs/quickstart.py

1,797 real 8x8 digit images made 32x32 RGB, seeded 80/20 split (1,437 train / 360 test).
Runtime: about 1-2 minutes on a 2-core CPU. Expected test accuracy: >= 97 %.
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.dataset.name = "digits"
  config.model.name = "resnet8"
  config.model.image_size = 16  # the digits are 8x8 at heart: 16 px loses nothing, trains 4x faster
  config.num_epochs = 15
  config.batch_size = 64
  config.eval_batch_size = 128
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 5e-4
  config.schedule.warmup_epochs = 1
  config.augment.crop_padding = 2
  config.augment.flip = False  # digits are not mirror-symmetric
  config.log_every_steps = 10
  config.checkpoint_every_epochs = 5
  return config
