"""The training loop: build everything from a config, train, evaluate, checkpoint, resume.

`train_and_evaluate(config, workdir)` is the whole program behind `launch.py`; the compiled steps
live in `jaxsam.steps`, devices in `jaxsam.parallel`, checkpoints in `jaxsam.checkpoint`.
"""

import contextlib
import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxsam import checkpoint as ckpt_lib
from jaxsam import errors, models, optim, parallel, plots, steps, writers
from jaxsam import workdir as workdir_lib
from jaxsam.data import augment as augment_lib
from jaxsam.data import pipeline, sources, train_split

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a config resolves to once the data is known (shared by train, eval and analysis)."""
  data: sources.DatasetArrays
  model: Any  # flax module
  step_config: steps.StepConfig
  num_classes: int
  mesh: Any
  steps_per_epoch: int
  total_steps: int


def compute_dtype(config: ml_collections.ConfigDict):
  if config.dtype not in DTYPES:
    raise errors.ConfigError(f"dtype={config.dtype!r} is unknown; known: {', '.join(DTYPES)}")
  return DTYPES[config.dtype]


NORMALIZATIONS = ("auto", "imagenet", "caffe", "dataset")


def normalization(config: ml_collections.ConfigDict, data: sources.DatasetArrays) -> dict:
  """StepConfig's mean, std and bgr: what pretrained weights were trained on, else the data's.

  `auto` asks the weight file (`pretrained.input_normalization`): caffe for Keras' ResNet50,
  imagenet for the rest; `data` is read only for `dataset`.
  """
  mode = config.model.normalization
  if mode not in NORMALIZATIONS:
    raise errors.ConfigError(
        f"model.normalization={mode!r} is unknown; known: {', '.join(NORMALIZATIONS)}")
  if mode == "auto" and config.model.pretrained:
    mode = models.pretrained.input_normalization(config.model.pretrained, config.model)
  if mode == "imagenet":
    return {"mean": steps.IMAGENET_MEAN, "std": steps.IMAGENET_STD, "bgr": False}
  if mode == "caffe":
    return {"mean": steps.CAFFE_MEAN_BGR, "std": steps.CAFFE_STD, "bgr": True}
  return {"mean": tuple(data.mean), "std": tuple(data.std), "bgr": False}


def build_setup(config: ml_collections.ConfigDict, mesh=None,
                data: sources.DatasetArrays | None = None) -> Setup:
  """Loads the data and resolves model, step settings and step counts from the config."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.per_process_batch_size(config.batch_size, mesh)
  parallel.per_process_batch_size(config.eval_batch_size, mesh, what="eval_batch_size")
  if data is None:
    with parallel.main_process_first("load_dataset"):  # process 0 downloads/prepares alone
      data = sources.load_dataset(config.dataset)
  data = train_split.apply(data, config.dataset, config.seed)
  num_classes = config.model.num_classes or data.num_classes
  native = data.train.images.shape[1]
  image_size = config.model.image_size or native
  per_device = config.batch_size // mesh.devices.size
  step_config = steps.StepConfig(
      image_size=image_size, **normalization(config, data), dtype=compute_dtype(config),
      label_smoothing=config.label_smoothing,
      sam_group_size=0 if not config.sam.rho else steps.sam_group_size(config.sam.m, per_device))
  model = models.create_model(config.model, num_classes=num_classes, dtype=step_config.dtype)
  spe = pipeline.steps_per_epoch(len(data.train.labels), config.batch_size)
  total = int(config.num_epochs * spe)
  if config.max_steps:
    total = min(total, config.max_steps)
  return Setup(data=data, model=model, step_config=step_config, num_classes=num_classes,
               mesh=mesh, steps_per_epoch=spe, total_steps=total)


def create_train_state(config: ml_collections.ConfigDict, setup: Setup, tx) -> steps.TrainState:
  """Fresh (or pretrained) variables and optimizer state on the host."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng, step_rng = jax.random.split(rng, 3)
  size = setup.step_config.image_size
  dummy = jnp.zeros((1, size, size, 3), setup.step_config.dtype)
  variables = jax.jit(lambda r, d: setup.model.init({"params": r, "dropout": d}, dummy,
                                                    train=False))(init_rng, dropout_rng)
  if config.model.pretrained:
    variables = models.pretrained.load_pretrained(config.model.pretrained, config.model, variables)
  params = variables["params"]
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(params), rng=step_rng)


def abstract_train_state(config: ml_collections.ConfigDict, setup: Setup, tx) -> steps.TrainState:
  """Shapes, dtypes and (replicated) shardings of the train state, computed without allocating it.

  The restore target for evaluation and analysis; pretrained weights are not read (the checkpoint
  replaces them anyway).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.pretrained = ""
  shapes = jax.eval_shape(lambda: create_train_state(config, setup, tx))
  sharding = parallel.replicated(setup.mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def make_optimizer(config, setup: Setup):
  axis = parallel.DATA_AXIS
  if setup.step_config.sam_group_size and (
      setup.step_config.sam_group_size < config.batch_size // setup.mesh.devices.size):
    axis = (parallel.DATA_AXIS, steps.GROUP_AXIS)
  return optim.make_optimizer(config, setup.steps_per_epoch, axis_name=axis)


def evaluate(eval_step, state: steps.TrainState, setup: Setup, global_batch: int) -> dict:
  """Loss, top-1, top-5 and per-class accuracy over the whole test split, each example once."""
  totals = None
  for batch in pipeline.eval_batches(setup.data.test, global_batch=global_batch,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    sums = eval_step(state, parallel.shard_batch(batch, setup.mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.fetch(totals)
  count = float(totals["count"])
  return {
      "test/loss": float(totals["loss"]) / count,
      "test/accuracy": float(totals["correct"]) / count,
      "test/top5": float(totals["correct_top5"]) / count,
      "test/count": int(count),
      "per_class_accuracy": (totals["class_correct"] / np.maximum(totals["class_count"], 1)
                             ).tolist(),
  }


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (save, then exit 0)."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _mean_window(window: list[dict]) -> dict:
  return {k: float(np.mean([w[k] for w in window])) for k in window[0]}


def _first_nonfinite(window: list[dict], first_step: int) -> int | None:
  for i, w in enumerate(window):
    if not math.isfinite(w["train/loss"]):
      return first_step + i
  return None


def _agreed_stop(requested: bool, sync_point: bool) -> bool:
  """Whether to stop for preemption now, the same answer on every process (they save one step).

  One process checks its own flag every step; several OR their flags at sync points only (log
  steps, epoch ends), because a collective every step would stall the input pipeline.
  """
  if jax.process_count() == 1:
    return requested
  return sync_point and parallel.global_any(requested)


class TrainingError(Exception):
  """Training cannot go on (e.g. the loss became non-finite); the last good checkpoint is kept."""


def _make_writer(config: ml_collections.ConfigDict, workdir: str, start_step: int):
  """metrics.jsonl (records past `start_step` dropped: the resumed run redoes them) + wandb."""
  jsonl = writers.JsonlWriter(workdir, resume_step=start_step)
  try:
    wandb_writer = writers.create_wandb_writer(
        config.wandb, workdir, config.to_dict(), environ=os.environ)
  except BaseException:
    jsonl.close()
    raise
  return writers.MultiWriter([jsonl] + [wandb_writer] * bool(wandb_writer)), wandb_writer


def _write_curves(workdir: str) -> None:
  records = writers.read_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE))
  plots.write_curves({"": records}, os.path.join(workdir, workdir_lib.CURVES_FILE),
                     title=os.path.basename(os.path.normpath(os.path.abspath(workdir))))


@contextlib.contextmanager
def _close_on_error(writer, wandb_writer, checkpointer, bar):
  """On any exception (non-finite loss, Ctrl-C twice...) close sinks; wandb marks the run failed."""
  try:
    yield
  except BaseException:
    bar.close()
    checkpointer.close()
    if wandb_writer is not None:
      wandb_writer.close(exit_code=1)
    writer.close()
    raise


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overwrite: bool = False) -> dict:
  """Trains and evaluates as the config says; resumes from the workdir's latest checkpoint."""
  pipeline.hide_gpus_from_tf()
  # Everything that can reject the config runs before the workdir is touched; the cheap
  # workdir checks first, so a bad --workdir fails in a second.
  workdir_lib.check(config, workdir, overwrite)
  setup = build_setup(config)
  tx, lr_schedule = make_optimizer(config, setup)
  augment = augment_lib.make_train_augment(config.augment,
                                           image_shape=setup.data.train.images.shape[1:])
  state = create_train_state(config, setup, tx)
  workdir_lib.prepare(config, workdir, overwrite, main_process=parallel.is_main_process())
  state = parallel.replicate(state, setup.mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint_keep)
  meta = {"epoch": 0, "best_accuracy": None, "best_epoch": None, "window": [], "wall_time": 0.0}
  restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state))
  latest = None
  if restored:
    state, meta, latest = restored
  start_step = int(parallel.fetch(state.step))
  main = parallel.is_main_process()
  writer, wandb_writer = _make_writer(config, workdir, start_step) if main \
      else (writers.MultiWriter([]), None)
  if main:
    print(f"jaxsam: {setup.mesh.devices.size} device(s) in {jax.process_count()} process(es), "
          f"SAM m={setup.step_config.sam_group_size or 'n/a (rho=0)'}, "
          f"{setup.steps_per_epoch} steps/epoch, {setup.total_steps} steps, "
          + (f"resuming at step {start_step}" if latest else "fresh start"), flush=True)
  train_step = steps.compile_train_step(setup.mesh, model=setup.model, tx=tx,
                                        lr_schedule=lr_schedule, cfg=setup.step_config)
  eval_step = steps.compile_eval_step(setup.mesh, model=setup.model, cfg=setup.step_config)
  batches = pipeline.train_batches(setup.data.train, augment, seed=config.seed,
                                   global_batch=config.batch_size, start_step=start_step,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  spe, total = setup.steps_per_epoch, setup.total_steps
  window = list(meta["window"])
  last_eval = None
  t_start, t_window = time.time(), time.time()
  wall_before = float(meta["wall_time"])
  bar = tqdm.tqdm(total=total, initial=start_step, disable=not (main and config.progress_bar),
                  unit="step", dynamic_ncols=True, leave=False)
  pending = []  # device metrics not yet fetched (fetching every step would stall the pipeline)
  step = saved_step = start_step
  with _Preemption() as preemption, _close_on_error(writer, wandb_writer, checkpointer, bar):
    while step < total:
      state, metrics = train_step(state, parallel.shard_batch(next(batches), setup.mesh))
      pending.append(metrics)
      step += 1
      bar.update(1)
      epoch_end = step % spe == 0 or step == total
      stop = _agreed_stop(preemption.requested, step % config.log_every_steps == 0 or epoch_end)
      if step % config.log_every_steps == 0 or epoch_end or stop:
        window += [{k: float(v) for k, v in m.items()} for m in parallel.fetch(pending)]
        pending = []
        bad = _first_nonfinite(window, step - len(window) + 1)
        if bad is not None:
          raise TrainingError(
              f"non-finite train loss at step {bad}; last good checkpoint: "
              f"{checkpointer.latest_path() or 'none'}; try a lower optimizer.learning_rate")
        if step % config.log_every_steps == 0 or epoch_end:
          now = time.time()
          record = {"step": step, "epoch": step / spe, **_mean_window(window),
                    "images_per_sec": len(window) * config.batch_size / max(now - t_window, 1e-9)}
          writer.write(record)
          bar.set_postfix(loss=f"{record['train/loss']:.4f}",
                          acc=f"{100 * record['train/accuracy']:.2f}%",
                          img_s=f"{record['images_per_sec']:.0f}")
          window, t_window = [], now
      if epoch_end:
        epoch = math.ceil(step / spe)
        is_last = step == total
        best_metrics = None
        if epoch % config.eval_every_epochs == 0 or is_last:
          last_eval = evaluate(eval_step, state, setup, config.eval_batch_size)
          writer.write({"step": step, "epoch": epoch,
                        **{k: v for k, v in last_eval.items() if k.startswith("test/")
                           and k != "test/count"}})
          acc = last_eval["test/accuracy"]
          if meta["best_accuracy"] is None or acc > meta["best_accuracy"]:
            meta["best_accuracy"], meta["best_epoch"] = acc, epoch
          best_metrics = {"test/accuracy": acc}
          if main:
            bar.write(f"epoch {epoch:3d} | step {step} | train loss {record['train/loss']:.4f} "
                      f"acc {100 * record['train/accuracy']:.2f}% | test loss "
                      f"{last_eval['test/loss']:.4f} acc {100 * acc:.2f}% top5 "
                      f"{100 * last_eval['test/top5']:.2f}% | {record['images_per_sec']:.0f} img/s")
            _write_curves(workdir)
        meta.update(epoch=epoch, wall_time=wall_before + time.time() - t_start, window=window,
                    last_accuracy=None if last_eval is None else last_eval["test/accuracy"])
        if epoch % config.checkpoint_every_epochs == 0 or is_last:
          path = checkpointer.save(step, state, meta, best_metrics=best_metrics)
          saved_step = step
          if wandb_writer is not None and config.wandb.log_checkpoints:
            is_best = best_metrics is not None and meta["best_epoch"] == epoch
            wandb_writer.log_checkpoint(path, step, ["latest", f"step-{step}"] + ["best"] * is_best)
        t_window = time.time()  # images/s measures training, not eval or checkpointing
      if stop:
        meta.update(wall_time=wall_before + time.time() - t_start, window=window)
        if saved_step != step:
          checkpointer.save(step, state, meta)
        if main:
          bar.write(f"jaxsam: preempted at step {step}; checkpoint saved, rerun to resume")
        if wandb_writer is not None:
          wandb_writer.run.mark_preempting()
        break
  bar.close()
  checkpointer.close()
  summary = {
      "final_test_accuracy": meta.get("last_accuracy"),
      "best_test_accuracy": meta["best_accuracy"],
      "best_epoch": meta["best_epoch"],
      "steps": step,
      "epochs": step / spe,
      "wall_time_s": wall_before + time.time() - t_start,
      "num_devices": int(setup.mesh.devices.size),
      "num_processes": jax.process_count(),
      "sam_m": setup.step_config.sam_group_size,
      "train_examples": len(setup.data.train.labels),
      "label_noise": config.dataset.label_noise,
      "completed": step >= total,
  }
  if wandb_writer is not None:
    wandb_writer.finish(summary)
  writer.close()
  if main and step >= total:
    writers.write_json(os.path.join(workdir, workdir_lib.SUMMARY_FILE), summary)
  return summary
