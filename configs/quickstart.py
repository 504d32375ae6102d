"""Quickstart: SAM + RandAugment on a small ResNet and scikit-learn's bundled digits, no network.

  python launch.py --config=configs/quickstart.py

1,797 real 8x8 digit images made 32x32 RGB, seeded 80/20 split (1,437 train / 360 test); the model
sees them at 16 px. SAM rho 0.05, RandAugment(2, 9), crop with 2 px padding, no flip.
Runtime: 2.5-3 minutes on a busy 2-core CPU (142-184 s wall, of which 36-46 s start-up and
compiling). Expected test accuracy: 98.61 / 98.61 / 98.89 % final (98.61 / 98.89 / 99.17 % best)
for seeds 0 / 1 / 2, with jax 0.10.2, flax 0.12.8, optax 0.2.8, tensorflow 2.21.0 (>= 95 % on any
setup). Plain SGD: --config.sam.rho=0. sam.m stays 0 (the per-device batch): a demo, not a recipe
with a source; the accuracies above ran on one device, i.e. m = 64.
"""

from configs import common


def get_config():
  config = common.use_randaugment(common.get_base_config(), num_ops=2, magnitude=9)
  config.dataset.name = "digits"
  config.model.name = "resnet8"
  config.model.image_size = 16  # the digits are 8x8 at heart: 16 px loses nothing, trains 4x faster
  config.num_epochs = 15
  config.batch_size = 64
  config.eval_batch_size = 128
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 5e-4
  config.schedule.warmup_epochs = 1
  config.sam.rho = 0.05
  config.augment.crop_padding = 2
  config.augment.flip = False  # digits are not mirror-symmetric
  config.log_every_steps = 10
  config.checkpoint_every_epochs = 5
  return config
