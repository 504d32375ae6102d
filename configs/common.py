"""Shared config pieces: the full key set every experiment config starts from.

Every key a launch can override lives here with its default, so a locked config rejects typos.
Experiment files call `get_base_config()` and change what differs.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the default config: every key jaxsam reads, with defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, optimizer, loss stay fp32)

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "digits"  # digits | cifar10 | cifar100 | any tfds image dataset
  config.dataset.source = "tfds"  # tfds | cifar_python | image_folder; ignored for digits
  config.dataset.path = (
    ""  # cifar_python: cifar-100-python folder/.tar.gz; image_folder: folder/archive
  )
  config.dataset.image_size = (
    0  # image_folder: 0 = native (one size), N = shorter side N + centre crop
  )
  config.dataset.cache_dir = (
    ""  # image_folder: decoded-array cache ('' = ~/.cache/jaxsam/image_folder)
  )
  config.dataset.skip_bad_images = False  # image_folder: train without unreadable files (counted)
  config.dataset.max_image_pixels = 89_478_485  # image_folder: per-image limit (PIL's); 0 = none
  config.dataset.train_examples = 0  # class-balanced seeded subset of the train split; 0 = all
  config.dataset.label_noise = 0.0  # fraction of train labels replaced by another class (seeded)
  config.dataset.data_dir = ""  # tfds data_dir ('' = TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.dataset.download = True  # tfds: allowed to download and prepare when absent
  config.dataset.train_split = "train"
  config.dataset.test_split = "test"
  # auto | true | false: decode everything into host memory (true) or stream from the files
  # (false: tfds record files, image folders); auto streams when the decoded train split would
  # exceed 25 % of host memory or its images vary in size, and says which at start-up.
  config.dataset.in_memory = "auto"
  # tf | device | auto: augment each train batch in tf.data on the host (tf), or keep an
  # in-memory train split on the devices as uint8 and gather + augment there (device: the same
  # batches); auto = device when TensorFlow is not importable, else tf. Streamed data needs tf.
  config.dataset.pipeline = "auto"
  config.dataset.shuffle_buffer = 10_000  # streamed tfds: examples per shuffle window (read whole)
  config.dataset.eval_crop_fraction = 0.875  # streamed eval: shorter side to size / this, crop

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"
  config.model.num_classes = 0  # 0 = take the dataset's class count
  config.model.image_size = 0  # resolution the model sees; 0 = the dataset's native size
  # A registered weight name (jaxsam.models.weights), hf:OWNER/REPO, URL#sha256=HEX, a weight file
  # path, or '' (random init).
  config.model.pretrained = ""
  config.model.freeze_bn = False  # use running BN statistics while fine-tuning
  config.model.cifar_stem = False  # ResNet: 3x3 stem conv without max-pool, for 32 px from scratch
  config.model.resnet_v1 = False  # ResNet: stride in the first 1x1 conv (original/Keras layout)
  config.model.zero_init_residual = False  # ResNet: zero-init each block's last BN scale
  # Dropout (classifier: ResNet/EfficientNet; position embeddings, attention and MLP: ViT) and
  # stochastic depth (EfficientNet; ViT's drop-path rate of the last block); -1 = the default.
  config.model.dropout_rate = -1.0
  config.model.drop_connect_rate = -1.0
  config.model.pool = "token"  # ViT: token (class token) | gap (global average pooling)
  config.model.width = 0  # small ResNets: base width (0 = architecture default)
  # Training-time batch norm over groups of this many examples (ghost batch norm, Hoffer et al.
  # 2017); 0 = the per-device batch. SAM at sam.m = k already normalises per group of k, so this is
  # the control for SGD (or must equal SAM's group).
  config.model.ghost_batch_size = 0
  # auto | imagenet | inception | caffe | dataset. auto: caffe (BGR, mean on 0-255) for Keras'
  # ResNet50 weights, inception (mean = std = 0.5) for ViT weights, imagenet for other pretrained
  # weights, dataset without; see the README's weight table.
  config.model.normalization = "auto"

  config.num_epochs = 10
  config.max_steps = 0  # 0 = no cap; > 0 stops after this many train steps (quick runs)
  config.label_smoothing = 0.0
  config.batch_size = 128  # global, over all devices and processes
  config.eval_batch_size = 256  # global

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # sgd | adamw
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 1e-4  # sgd: coupled L2 added to the gradient, as torch.optim.SGD
  config.optimizer.grad_clip_norm = 0.0  # 0 = off; applied to the averaged gradient

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = "cosine"  # cosine | constant
  config.schedule.warmup_epochs = 0.0

  config.sam = ml_collections.ConfigDict()
  config.sam.rho = 0.0  # 0 = plain base optimizer (one pass, no SAM cost)
  config.sam.variant = "sam"  # sam | asam | gsam | looksam | aesam | msam
  config.sam.eta = 0.01  # ASAM: T_w = |w| + eta
  config.sam.alpha = 0.0  # GSAM: weight of the orthogonal-gradient ascent term
  config.sam.rho_min = 0.0  # GSAM: rho decays with the lr from sam.rho to this
  config.sam.eps = 1e-12  # added to gradient norms (no NaN on a zero gradient)
  config.sam.sync = False  # True: average the ascent gradient over devices (no m-sharpness)
  config.sam.m = 0  # examples per ascent group; 0 = the per-device batch
  config.sam.ascent_weight_decay = False  # include the L2 term in the ascent gradient
  # Cheaper SAM. variant looksam | aesam | msam (above) and these schedules; defaults = plain SAM.
  config.sam.every = 1  # SAM on every k-th optimizer step, base steps between (not aesam/msam)
  config.sam.start_fraction = 0.0  # base optimizer for this fraction of the steps, then SAM
  config.sam.reuse_weight = 0.7  # looksam: weight of the stored SAM direction on in-between steps
  config.sam.adaptive_decay = 0.9  # aesam: EMA decay of the squared-gradient-norm statistics
  config.sam.adaptive_c_start = -1.0  # aesam: SAM iff ||g||^2 >= mean + c*std, c linear start->end
  config.sam.adaptive_c_end = 1.0
  # Micro-batches per optimizer step, accumulated in one compiled step; each makes its own SAM
  # ascent and BN batch statistics (m-sharpness with m = per-device batch / accum_steps).
  config.accum_steps = 1

  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 4  # 0 = no random crop
  config.augment.crop_fill = "reflect"  # reflect | constant
  config.augment.flip = True
  # Streamed images: Inception random-resized crop to model.image_size (area fraction in
  # crop_scale, aspect ratio w/h log-uniform in crop_ratio); False: shorter side + centre crop.
  config.augment.random_resized_crop = False
  config.augment.crop_scale = (0.08, 1.0)
  config.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  config.augment.cutout_size = 0  # Cutout square side in native pixels; 0 = off
  config.augment.randaugment = ml_collections.ConfigDict()
  config.augment.randaugment.num_ops = 0  # 0 = off
  config.augment.randaugment.magnitude = 9  # 0..10 (TF scale)
  config.augment.autoaugment = ""  # '' = off | cifar10

  config.wandb = ml_collections.ConfigDict()
  config.wandb.mode = "auto"  # auto | online | offline | disabled (auto: online with credentials)
  config.wandb.project = "jaxsam"
  config.wandb.entity = ""
  config.wandb.name = ""
  config.wandb.tags = ""  # comma-separated
  config.wandb.group = ""
  config.wandb.log_checkpoints = False

  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 1
  config.checkpoint_keep = 2
  config.progress_bar = True
  return config


# Augmentation presets: the study configs differ from one another in one of these calls.
def use_cutout(config: ml_collections.ConfigDict, size: int = 16) -> ml_collections.ConfigDict:
  """Crop + flip + Cutout of `size` native pixels (the original applied 16 px after upscaling to
  224, i.e. about 2 px of the 32 px image; 16 native px is DeVries & Taylor's CIFAR setting)."""
  config.augment.cutout_size = size
  config.augment.randaugment.num_ops = 0
  config.augment.autoaugment = ""
  return config


def use_randaugment(
  config: ml_collections.ConfigDict, num_ops: int = 2, magnitude: int = 9
) -> ml_collections.ConfigDict:
  """Crop + flip + RandAugment(N, M) (Cubuk et al. 2019), no Cutout, as the original's RA runs."""
  config.augment.cutout_size = 0
  config.augment.randaugment.num_ops = num_ops
  config.augment.randaugment.magnitude = magnitude
  config.augment.autoaugment = ""
  return config


def use_autoaugment(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Crop + flip + AutoAugment's CIFAR-10 policy + Cutout 16 (Cubuk et al. 2018's CIFAR recipe)."""
  config.augment.cutout_size = 16
  config.augment.randaugment.num_ops = 0
  config.augment.autoaugment = "cifar10"
  return config


# torchvision's IMAGENET1K_V1 ResNet-50 (its `pretrained=True`, the original study's weights),
# fetched and converted on first use.
PRETRAINED_RESNET50 = "torchvision/resnet50"


def original_study(rho: float) -> ml_collections.ConfigDict:
  """The original report's setup, made apples to apples: ImageNet-pretrained ResNet-50 on
  CIFAR-100 at 224 px, 50 epochs, global batch 256, SGD momentum 0.9, lr 0.1 cosine, weight decay
  1e-4 for both optimizers (the original's SAM runs silently had a constant lr and no decay),
  SAM's ascent on groups of sam.m = 64 examples (the original ascended on all 256 at once)."""
  config = get_base_config()
  config.dataset.name = "cifar100"
  config.model.name = "resnet50"
  config.model.image_size = 224
  config.model.pretrained = PRETRAINED_RESNET50
  config.num_epochs = 50
  config.batch_size = 256
  config.eval_batch_size = 500
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.schedule.name = "cosine"
  config.sam.rho = rho
  # The original all-reduced its ascent: one ascent over the whole batch of 256 (m = 256, which
  # is --config.sam.m=256 on one device). jaxsam ascends per group as the SAM paper's code does,
  # pinned to 64, the per-device batch on the 4 GPUs the runtime is quoted for.
  config.sam.m = 64
  config.augment.crop_padding = 4
  config.augment.crop_fill = "constant"  # torchvision RandomCrop(32, padding=4), as the original
  config.augment.flip = True
  config.log_every_steps = 100
  return config
