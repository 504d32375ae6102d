"""Setting up a run: config checks, data, model, optimizer, the run folder's lock and sinks.

Everything `train.train_and_evaluate` builds before its first step, and what eval and analysis
share with it (`build_setup`, `setup_optimizer`, `hold_workdir`), so that none of them imports
the training loop. The checks that can refuse a launch run first and touch nothing.
"""

import contextlib
import dataclasses
import os
from typing import Any

import jax
import ml_collections

import jaxsam.data
from jaxsam import checkpoint as ckpt_lib
from jaxsam import config_schema, errors, models, optim, parallel, steps, writers
from jaxsam import state as state_lib
from jaxsam import workdir as workdir_lib
from jaxsam.data import pipeline, sources
from jaxsam.models import weights as weights_lib


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a config resolves to once the data is known (shared by train, eval and analysis)."""

  data: Any  # jaxsam.data's DataSource: in memory or streamed
  model: Any  # flax module
  step_config: state_lib.StepConfig
  num_classes: int
  mesh: Any
  steps_per_epoch: int
  total_steps: int


NORMALIZATIONS = config_schema.NORMALIZATIONS  # the config table lists the names


def normalization(
  config: ml_collections.ConfigDict,
  data,
  *,
  workdir: str | None = None,
  resolved: weights_lib.Resolved | None = None,
) -> dict:
  """StepConfig's mean, std and bgr: what pretrained weights were trained on, else the data's.

  `auto` asks the weights: the resolved file when given, else the run folder's record, the
  registry or the file (`weights.input_normalization`): caffe for Keras' ResNet50, inception
  (mean = std = 0.5) for ViTs, imagenet for the rest; `data` is read only for `dataset`.
  """
  mode = config.model.normalization
  if mode not in NORMALIZATIONS:
    raise errors.ConfigError(
      f"model.normalization={mode!r} is unknown; known: {', '.join(NORMALIZATIONS)}"
    )
  if mode == "auto" and config.model.pretrained:
    if resolved is not None:
      mode = resolved.normalization
    else:
      mode = weights_lib.input_normalization(config.model, workdir)
  if mode == "imagenet":
    return {"mean": steps.IMAGENET_MEAN, "std": steps.IMAGENET_STD, "bgr": False}
  if mode == "inception":
    return {"mean": steps.INCEPTION_MEAN, "std": steps.INCEPTION_STD, "bgr": False}
  if mode == "caffe":
    return {"mean": steps.CAFFE_MEAN_BGR, "std": steps.CAFFE_STD, "bgr": True}
  floored = sources.floored_channels(data.std)
  if floored and parallel.is_main_process():
    names = ", ".join("RGB"[c] for c in floored)
    print(
      f"jaxsam: channel {names} of the train split is (nearly) constant: normalised with its std "
      f"floored at 1/255 (one uint8 level) instead of dividing by ~0",
      flush=True,
    )
  return {"mean": tuple(data.mean), "std": tuple(data.std), "bgr": False}


def build_setup(
  config: ml_collections.ConfigDict,
  mesh=None,
  data=None,
  *,
  workdir: str | None = None,
  resolved: weights_lib.Resolved | None = None,
) -> Setup:
  """Loads the data (or takes `data`, a `jaxsam.data.load` DataSource) and resolves model, step
  settings and step counts from the config.

  `workdir` (a run folder) or `resolved` (the fetched weights) tell `model.normalization=auto`
  what the pretrained weights expect without reading their file (see `normalization`).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.per_process_batch_size(config.batch_size, mesh)
  parallel.per_process_batch_size(config.eval_batch_size, mesh, what="eval_batch_size")
  if data is None:
    with parallel.main_process_first("load_dataset"):  # process 0 downloads/prepares alone
      data = jaxsam.data.load(config, main=parallel.is_main_process())
  data = data.with_train_split(config.dataset, config.seed)
  num_classes = config.model.num_classes or data.num_classes
  native = data.native_size(config.model.image_size)
  image_size = config.model.image_size or native
  per_device = config.batch_size // mesh.devices.size
  spe = data.steps_per_epoch(config.batch_size, jax.process_count())
  step_config = state_lib.StepConfig(
    image_size=image_size,
    **normalization(config, data, workdir=workdir, resolved=resolved),
    dtype=state_lib.compute_dtype(config.dtype),
    label_smoothing=config.label_smoothing,
    **optim.step_sam_settings(config, per_device, spe),
  )
  model = models.create_model(config.model, num_classes=num_classes, dtype=step_config.dtype)
  total = int(config.num_epochs * spe)
  if config.max_steps:
    total = min(total, config.max_steps)
  return Setup(
    data=data,
    model=model,
    step_config=step_config,
    num_classes=num_classes,
    mesh=mesh,
    steps_per_epoch=spe,
    total_steps=total,
  )


def setup_optimizer(config: ml_collections.ConfigDict, setup: Setup):
  """`optim.make_optimizer` with SAM's reduction axis chosen for the setup's mesh and group size."""
  axis = optim.sam_axis_name(setup.step_config, config.batch_size // setup.mesh.devices.size)
  return optim.make_optimizer(config, setup.steps_per_epoch, axis_name=axis)


def abstract_state(setup: Setup, tx) -> state_lib.TrainState:
  """The restore target of a checkpoint: the train state's shapes, dtypes and replicated
  shardings, without allocating it or reading pretrained weights (the checkpoint has them)."""
  return state_lib.abstract_state(setup.model, tx, setup.step_config, setup.mesh)


@contextlib.contextmanager
def hold_workdir(workdir: str, what: str):
  """Process 0 holds the run folder's lock (`workdir.RunLock`) while the block runs.

  Every process learns whether it got it (a collective), so that a refusal ends them all with
  the same one-line error rather than leaving the others waiting at the next collective.
  """
  lock = workdir_lib.RunLock(workdir, what)
  refusal = None
  if parallel.is_main_process():
    try:
      lock.acquire()
    except errors.UserError as e:
      refusal = e
  if parallel.global_any(refusal is not None):
    raise refusal or workdir_lib.WorkdirInUseError(
      f"--workdir={workdir} is in use (process 0 could not take its lock)"
    )
  try:
    yield lock
  finally:
    lock.release()


@dataclasses.dataclass
class Launch:
  """A training launch once its config is checked and its data, model and optimizer are built.

  `resolved` is the pretrained weights fetched for a fresh run; a resume never fetches them (its
  checkpoint holds the parameters, the run folder's weights.json the normalisation).
  """

  config: ml_collections.ConfigDict
  run_dir: workdir_lib.RunDir
  overwrite: bool
  resuming: bool  # the run folder holds a checkpoint to restore
  setup: Setup
  tx: Any
  lr_schedule: Any
  train_input: Any  # DataSource.train_input: (start, process, count) -> batches
  resolved: weights_lib.Resolved | None

  def weights(self) -> weights_lib.Resolved | None:
    """The pretrained weights, fetched the first time they are needed (None: no pretrained)."""
    pretrained = self.config.model.pretrained
    if pretrained and self.resolved is None:
      self.resolved = weights_lib.resolve(pretrained, self.config.model)
    return self.resolved


def prepare_launch(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> Launch:
  """Checks the config and the folder, then builds data, model and optimizer; writes nothing.

  The cheap checks run first (every key's domain, the workdir, a live holder), so that bad input
  fails in a second, before the data is loaded.
  """
  pipeline.hide_gpus_from_tf()
  config_schema.validate(config, num_devices=jax.device_count())
  workdir_lib.check(config, workdir, overwrite)
  workdir_lib.check_not_held(workdir)
  run_dir = workdir_lib.RunDir(workdir)
  resuming = not overwrite and run_dir.has_checkpoint()
  resolved = None
  if config.model.pretrained and not resuming:
    resolved = weights_lib.resolve(config.model.pretrained, config.model)
  setup = build_setup(config, workdir=None if overwrite else workdir, resolved=resolved)
  tx, lr_schedule = setup_optimizer(config, setup)
  train_input = setup.data.train_input(
    config, size=setup.step_config.image_size, mesh=setup.mesh, main=parallel.is_main_process()
  )
  return Launch(config, run_dir, overwrite, resuming, setup, tx, lr_schedule, train_input, resolved)


def open_run_folder(launch: Launch) -> ckpt_lib.Checkpointer:
  """With the folder held: clears it for `--overwrite`, writes config.json, opens checkpoints."""
  config = launch.config
  workdir_lib.prepare(
    config, launch.run_dir.root, launch.overwrite, main_process=parallel.is_main_process()
  )
  return ckpt_lib.Checkpointer(launch.run_dir.root, config.checkpoint_keep)


def record_weights(launch: Launch, resumed: bool) -> None:
  """A fresh run's weights.json: what it started from (resume, eval and analysis read it)."""
  if launch.resolved is not None and not resumed and parallel.is_main_process():
    weights_lib.write_record(launch.run_dir.root, launch.resolved)


def create_sink(launch: Launch, start_step: int) -> writers.RunWriter:
  """metrics.jsonl (records past `start_step` dropped) and wandb, on process 0 only."""
  return writers.create_run_writer(
    launch.config,
    launch.run_dir,
    start_step=start_step,
    environ=os.environ,
    main_process=parallel.is_main_process(),
  )
