"""WideResNet-28-10 from scratch on CIFAR-100 at 32 px with SAM: the SAM paper's CIFAR recipe.

  python launch.py --config=configs/wrn28_10_sam_cutout.py

Reproduces Foret et al. 2021, Table 1, the WRN-28-10 (200 epochs) CIFAR-100 rows with basic
augmentation + Cutout (compare with the paper's SAM error there).
Recipe: 200 epochs, batch 256, SGD momentum 0.9, lr 0.1 cosine, weight decay 5e-4, rho 0.1,
crop (4 px reflect) + flip + Cutout 16. Expected accuracy here: not measured yet (needs a GPU).
Runtime: ~200 x 195 SAM steps of a 36.5M-parameter network.
sam.m = 32: the SAM paper's code (google-research/sam, README) ran its CIFAR WideResNets on 8 GPUs
at global batch 256, each replica ascending on its own 32 examples (sync_perturbations=False);
the paper's own device count could not be read here.
"""

from configs import common


def get_config():
  config = common.use_cutout(common.get_base_config())
  config.dataset.name = "cifar100"
  config.model.name = "wrn28_10"
  config.num_epochs = 200
  config.batch_size = 256
  config.eval_batch_size = 500
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 5e-4
  config.sam.rho = 0.1
  config.sam.m = 32  # examples per ascent: the sam code's 256 over 8 replicas
  config.log_every_steps = 100
  return config
