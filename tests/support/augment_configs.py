"""`config.augment` for the augmentation tests: everything off but what a test names."""

from configs import common


def augment_config(**overrides):
  """The base config's `augment` with crop, flip and Cutout off, then `overrides`, where
  `randaugment__num_ops=2` sets `augment.randaugment.num_ops`."""
  config = common.get_base_config().augment
  config.crop_padding, config.flip, config.cutout_size = 0, False, 0
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split("__")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config
