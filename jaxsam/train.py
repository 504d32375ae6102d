"""The training loop: build everything from a config, train, evaluate, checkpoint, resume.

`train_and_evaluate(config, workdir)` is the whole program behind `launch.py`; the compiled steps
live in `jaxsam.steps`, devices in `jaxsam.parallel`, checkpoints in `jaxsam.checkpoint`.
"""

import contextlib
import dataclasses
import itertools
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

import jaxsam.data
from jaxsam import checkpoint as ckpt_lib
from jaxsam import config_schema, errors, models, optim, parallel, plots, profiling, steps, writers
from jaxsam import workdir as workdir_lib
from jaxsam.data import device_input, pipeline, sources, train_split
from jaxsam.models import weights as weights_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a config resolves to once the data is known (shared by train, eval and analysis)."""

  data: Any  # jaxsam.data's DataSource: in memory or streamed
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
  step_config = steps.StepConfig(
    image_size=image_size,
    **normalization(config, data, workdir=workdir, resolved=resolved),
    dtype=compute_dtype(config),
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


def create_train_state(
  config: ml_collections.ConfigDict, setup: Setup, tx, weights_file: str | None = None
) -> steps.TrainState:
  """Fresh (or pretrained) variables and optimizer state on the host.

  `weights_file` is `config.model.pretrained` already resolved to a local file; None resolves it.
  """
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng, step_rng = jax.random.split(rng, 3)
  size = setup.step_config.image_size
  dummy = jnp.zeros((1, size, size, 3), setup.step_config.dtype)
  variables = jax.jit(
    lambda r, d: setup.model.init({"params": r, "dropout": d}, dummy, train=False)
  )(init_rng, dropout_rng)
  if config.model.pretrained:
    if weights_file is None:
      weights_file = weights_lib.resolve(config.model.pretrained, config.model).file
    variables = models.pretrained.load_pretrained(weights_file, config.model, variables)
  params = variables["params"]
  return steps.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=step_rng,
  )


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


def setup_optimizer(config: ml_collections.ConfigDict, setup: Setup):
  """`optim.make_optimizer` with SAM's reduction axis chosen for the setup's mesh and group size."""
  axis = optim.sam_axis_name(setup.step_config, config.batch_size // setup.mesh.devices.size)
  return optim.make_optimizer(config, setup.steps_per_epoch, axis_name=axis)


def evaluate_test_split(
  eval_step, state: steps.TrainState, setup: Setup, global_batch: int
) -> dict:
  """Loss, top-1, top-5 and per-class accuracy over the whole test split, each example once."""
  totals = None
  for batch in setup.data.test_batches(
    global_batch=global_batch,
    size=setup.step_config.image_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    sums = eval_step(state, parallel.shard_batch(batch, setup.mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.fetch(totals)
  count = float(totals["count"])
  return {
    "test/loss": float(totals["loss"]) / count,
    "test/accuracy": float(totals["correct"]) / count,
    "test/top5": float(totals["correct_top5"]) / count,
    "test/count": int(count),
    "per_class_accuracy": (totals["class_correct"] / np.maximum(totals["class_count"], 1)).tolist(),
  }


def _split_accuracy(eval_step, state, setup: Setup, split: sources.Split, global_batch: int):
  totals = None
  for batch in pipeline.eval_batches(
    split,
    global_batch=global_batch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    sums = eval_step(state, parallel.shard_batch(batch, setup.mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.fetch(totals)
  return float(totals["correct"]) / max(float(totals["count"]), 1.0)


def evaluate_train_fit(eval_step, state, setup: Setup, config, global_batch: int) -> dict:
  """Top-1 accuracy on the train split against the labels it trained on (no augmentation, batch
  norm in inference mode): how much of its train labels the model fits. Under label noise also
  split into the relabelled examples (accuracy on their wrong label: the noise memorised) and
  the rest. {} for a streamed train split (one more pass over its files)."""
  train = setup.data.train_split_in_memory()
  if train is None:
    return {}
  out = {"final_train_accuracy": _split_accuracy(eval_step, state, setup, train, global_batch)}
  noise = config.dataset.get("label_noise", 0.0)
  if noise:
    flipped = train_split.flipped_mask(len(train.labels), noise, config.seed)
    for key, mask in (("noisy", flipped), ("clean", ~flipped)):
      part = sources.Split(train.images[mask], train.labels[mask])
      out[f"final_train_accuracy_{key}"] = _split_accuracy(
        eval_step, state, setup, part, global_batch
      )
  return out


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (save, then exit 0)."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class TrainingError(Exception):
  """Training cannot go on (e.g. the loss became non-finite); the last good checkpoint is kept."""


def window_mean(window: list[dict]) -> dict:
  """Per-key mean of a window of per-step metrics; `sam/*` keys ignore NaN (steps without a SAM
  ascent), and a window with no SAM step gives NaN for them."""
  means = {}
  for key in window[0]:
    values = np.asarray([w[key] for w in window], np.float64)
    if key.startswith("sam/"):
      values = values[~np.isnan(values)]
    means[key] = float(values.mean()) if values.size else math.nan
  return means


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


class TrainClock:
  """Seconds spent inside `timed()` sections since the last `lap` (clu's `timed`, in small).

  The loop times the train step with its input and the fetch of its metrics (which waits for the
  device), so that images/s leaves out logging, eval and checkpoints.
  """

  def __init__(self):
    self._seconds = 0.0

  @contextlib.contextmanager
  def timed(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self._seconds += time.perf_counter() - start

  def lap(self) -> float:
    """Timed seconds since the previous lap (or the start)."""
    seconds, self._seconds = self._seconds, 0.0
    return seconds


@dataclasses.dataclass
class _Loop:
  """Everything the periodic actions share: the run's fixed parts and what changes per step.

  `meta` is saved with every checkpoint (epoch, best accuracy, unlogged window, wall time, SAM
  step count), so that a resumed run continues the same records and summary.
  """

  config: ml_collections.ConfigDict
  setup: Setup
  workdir: str
  sink: writers.RunWriter
  checkpointer: ckpt_lib.Checkpointer
  bar: Any  # tqdm progress bar
  meta: dict
  step: int
  saved_step: int
  wall_before: float
  pending: list = dataclasses.field(default_factory=list)  # device metrics not yet fetched
  record: dict | None = None  # the last train record
  t_start: float = dataclasses.field(default_factory=time.time)

  @property
  def epoch_end(self) -> bool:
    return self.step % self.setup.steps_per_epoch == 0 or self.step == self.setup.total_steps

  @property
  def log_due(self) -> bool:
    return self.step % self.config.log_every_steps == 0 or self.epoch_end

  @property
  def epochs_done(self) -> int:
    """Epochs ended so far (a run cut short by max_steps ends its last one early)."""
    spe = self.setup.steps_per_epoch
    return math.ceil(self.step / spe) if self.epoch_end else self.step // spe

  def due_at_epoch_end(self, every_epochs: int) -> bool:
    return self.epoch_end and (
      self.epochs_done % every_epochs == 0 or self.step == self.setup.total_steps
    )

  def wall_time(self) -> float:
    return self.wall_before + time.time() - self.t_start


def default_sam_active(config: ml_collections.ConfigDict) -> float:
  """A step's `sam/active` when it logs none: every step of a SAM run ascends, no plain one."""
  return 1.0 if config.sam.rho > 0 else 0.0


def sam_steps(metrics: list[dict], default: float) -> float:
  """How many of these steps took the SAM ascent: the sum of `sam/active`, else `default` each."""
  return float(sum(m.get("sam/active", default) for m in metrics))


def _fetch(loop: _Loop, clock: TrainClock) -> None:
  """Moves the pending device metrics into the window; a non-finite loss ends training."""
  with clock.timed():  # waits for the device: training time
    fetched = [{k: float(v) for k, v in m.items()} for m in parallel.fetch(loop.pending)]
  loop.pending = []
  loop.meta["sam_steps"] += sam_steps(fetched, default_sam_active(loop.config))
  loop.meta["window"] += fetched
  bad = _first_nonfinite(loop.meta["window"], loop.step - len(loop.meta["window"]) + 1)
  if bad is not None:
    raise TrainingError(
      f"non-finite train loss at step {bad}; last good checkpoint: "
      f"{loop.checkpointer.latest_path() or 'none'}; try a lower optimizer.learning_rate"
    )


def _log_train(loop: _Loop, train_seconds: float, input_wait_ms: float) -> None:
  """One record of the window's means, with images/s over the window's training time and the
  mean wait per step for the next batch (`DevicePrefetch.mean_wait_ms`)."""
  window = loop.meta["window"]
  loop.record = {
    "step": loop.step,
    "epoch": loop.step / loop.setup.steps_per_epoch,
    **window_mean(window),
    "images_per_sec": len(window) * loop.config.batch_size / max(train_seconds, 1e-9),
    "time/input_wait_ms": input_wait_ms,
  }
  loop.sink.write(loop.record)
  loop.bar.set_postfix(
    loss=f"{loop.record['train/loss']:.4f}",
    acc=f"{100 * loop.record['train/accuracy']:.2f}%",
    img_s=f"{loop.record['images_per_sec']:.0f}",
  )
  loop.meta["window"] = []


def _write_curves(workdir: str) -> None:
  records = writers.read_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE))
  plots.write_curves(
    {"": records},
    os.path.join(workdir, workdir_lib.CURVES_FILE),
    title=os.path.basename(os.path.normpath(os.path.abspath(workdir))),
  )


def _evaluate(loop: _Loop, eval_step, state) -> None:
  """Test metrics to the sinks, the best accuracy to meta, an epoch line and the curves."""
  metrics = evaluate_test_split(eval_step, state, loop.setup, loop.config.eval_batch_size)
  epoch = loop.epochs_done
  loop.sink.write(
    {
      "step": loop.step,
      "epoch": epoch,
      **{k: v for k, v in metrics.items() if k.startswith("test/") and k != "test/count"},
    }
  )
  acc = metrics["test/accuracy"]
  if loop.meta["best_accuracy"] is None or acc > loop.meta["best_accuracy"]:
    loop.meta["best_accuracy"], loop.meta["best_epoch"] = acc, epoch
  loop.meta.update(last_accuracy=acc, evaluated_epoch=epoch)
  if parallel.is_main_process():
    r = loop.record
    loop.bar.write(
      f"epoch {epoch:3d} | step {loop.step} | train loss {r['train/loss']:.4f} "
      f"acc {100 * r['train/accuracy']:.2f}% | test loss {metrics['test/loss']:.4f} "
      f"acc {100 * acc:.2f}% top5 {100 * metrics['test/top5']:.2f}% | "
      f"{r['images_per_sec']:.0f} img/s"
    )
    _write_curves(loop.workdir)


def _save(loop: _Loop, state, best_metrics: dict | None = None) -> str:
  loop.meta.update(epoch=loop.epochs_done, wall_time=loop.wall_time())
  loop.saved_step = loop.step
  return loop.checkpointer.save(loop.step, state, loop.meta, best_metrics=best_metrics)


def _checkpoint(loop: _Loop, state) -> None:
  """Saves state and meta; an epoch that was evaluated also ranks the checkpoint by accuracy."""
  epoch = loop.epochs_done
  evaluated = loop.meta.get("evaluated_epoch") == epoch
  path = _save(loop, state, {"test/accuracy": loop.meta["last_accuracy"]} if evaluated else None)
  loop.sink.log_checkpoint(path, loop.step, best=evaluated and loop.meta["best_epoch"] == epoch)


def _preempt(loop: _Loop, state) -> None:
  """Saves this step (unless just saved) and marks the run preempted; the rerun resumes here."""
  if loop.saved_step != loop.step:
    _save(loop, state)
  if parallel.is_main_process():
    loop.bar.write(f"jaxsam: preempted at step {loop.step}; checkpoint saved, rerun to resume")
  loop.sink.mark_preempting()


@contextlib.contextmanager
def _close_on_error(loop: _Loop):
  """On any exception (non-finite loss, Ctrl-C twice...) close sinks; wandb marks the run failed."""
  try:
    yield
  except BaseException:
    loop.bar.close()
    loop.checkpointer.close()
    loop.sink.close(exit_code=1)
    raise


def _has_checkpoint(workdir: str) -> bool:
  """Whether the run folder holds a saved step (a rerun then resumes from it)."""
  folder = os.path.join(workdir, workdir_lib.LAST_DIR)
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


FRESH_META = {"epoch": 0, "best_accuracy": None, "best_epoch": None, "window": [], "wall_time": 0.0}


def _restore(config, checkpointer, state, fresh):
  """(state, meta, resumed) from the workdir's latest checkpoint, else `fresh()`'s state.

  `state` is the fresh state, or only its shapes when the workdir held a checkpoint (so a resume
  does not read the pretrained file); `fresh()` builds it when no checkpoint restores after all.
  """
  restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state))
  state, meta = (restored[0], restored[1]) if restored else (fresh(), dict(FRESH_META))
  meta = {**meta, "window": list(meta["window"])}
  # Checkpoints from before the SAM step count was kept: every step counts as the run's default.
  meta.setdefault("sam_steps", int(parallel.fetch(state.step)) * default_sam_active(config))
  return state, meta, bool(restored)


def sam_m_text(config, group_size: int) -> str:
  """The start-up line's m: the ascent group size, and a warning when sam.m = 0 left it to the
  device count (the same config is then a different algorithm on 1 and 8 devices)."""
  if not group_size:
    return "n/a (msam)" if config.sam.rho else "n/a (rho=0)"
  if config.sam.m:
    return str(group_size)
  return f"{group_size} (sam.m=0: the per-device batch, so results depend on the device count)"


def _announce(config, setup: Setup, start_step: int, resumed: bool) -> None:
  if parallel.is_main_process():
    print(
      f"jaxsam: {setup.mesh.devices.size} device(s) in {jax.process_count()} process(es), "
      f"SAM m={sam_m_text(config, setup.step_config.sam_group_size)}, "
      f"{setup.steps_per_epoch} steps/epoch, {setup.total_steps} steps, "
      + (f"resuming at step {start_step}" if resumed else "fresh start"),
      flush=True,
    )


def _summary(loop: _Loop, train_fit: dict) -> dict:
  config, setup, meta = loop.config, loop.setup, loop.meta
  return {
    "final_test_accuracy": meta.get("last_accuracy"),
    "best_test_accuracy": meta["best_accuracy"],
    "best_epoch": meta["best_epoch"],
    "steps": loop.step,
    "epochs": loop.step / setup.steps_per_epoch,
    "wall_time_s": loop.wall_time(),
    "num_devices": int(setup.mesh.devices.size),
    "num_processes": jax.process_count(),
    "sam_m": setup.step_config.sam_group_size,  # examples per ascent group (0: no ascent)
    "sam_m_config": config.sam.m,  # sam.m as set: 0 = the per-device batch
    "sam_fraction": (meta["sam_steps"] / loop.step if loop.step else default_sam_active(config)),
    "train_examples": setup.data.num_train,
    "skipped_bad_images": setup.data.skipped_images,
    "label_noise": config.dataset.label_noise,
    "completed": loop.step >= setup.total_steps,
    **train_fit,
  }


def _device_batches(train_input, setup: Setup, start: int) -> parallel.DevicePrefetch:
  """The train batches of steps `start` to the end, each placed while the step before runs."""
  local = train_input(start, jax.process_index(), jax.process_count())
  return parallel.DevicePrefetch(
    itertools.islice(local, setup.total_steps - start),
    setup.mesh,
    transform=device_input.loop_parts(train_input)[0],  # a separate gather + augment program
  )


def _compile_steps(config, setup: Setup, tx, lr_schedule, workdir: str, profile_steps, wrap=None):
  """(train step of (state, batch, step), eval step): the host picks the SAM or base program per
  step for the count-based SAM schedules, and the train step traces `profile_steps`; `wrap`
  fuses the device pipeline's gather + augment into each train program."""
  schedule = optim.host_ascent_schedule(config, setup.steps_per_epoch)
  train_step = steps.compile_scheduled_train_step(
    setup.mesh,
    schedule,
    wrap=wrap,
    model=setup.model,
    tx=tx,
    lr_schedule=lr_schedule,
    cfg=setup.step_config,
  )
  profile_dir = os.path.join(workdir, workdir_lib.PROFILE_DIR)
  traced = profiling.StepTrace(train_step, profile_steps, profile_dir, setup.total_steps)
  return traced, steps.compile_eval_step(setup.mesh, model=setup.model, cfg=setup.step_config)


def _start_loop(
  config, setup: Setup, workdir: str, sink, checkpointer, meta: dict, start: int
) -> "_Loop":
  """The loop's shared record at step `start`, with its progress bar (main process only)."""
  show = parallel.is_main_process() and config.progress_bar
  bar = tqdm.tqdm(
    total=setup.total_steps,
    initial=start,
    unit="step",
    dynamic_ncols=True,
    disable=not show,
    leave=False,
  )
  return _Loop(
    config,
    setup,
    workdir,
    sink,
    checkpointer,
    bar,
    meta,
    step=start,
    saved_step=start,
    wall_before=float(meta["wall_time"]),
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  overwrite: bool = False,
  profile_steps: tuple[int, int] | None = None,
) -> dict:
  """Trains and evaluates as the config says; resumes from the workdir's latest checkpoint.

  `profile_steps` (START, END) traces steps START to END - 1 into the workdir (`jaxsam.profiling`).
  """
  pipeline.hide_gpus_from_tf()
  # Everything that can reject the config runs before the workdir is touched; the cheap checks
  # first (every key's domain, the workdir, a live holder), so bad input fails in a second.
  config_schema.validate(config, num_devices=jax.device_count())
  workdir_lib.check(config, workdir, overwrite)
  workdir_lib.check_not_held(workdir)
  # A resume takes everything from its checkpoint and the normalisation from the run folder's
  # weights record: the pretrained file is neither fetched nor read again.
  resuming = not overwrite and _has_checkpoint(workdir)
  fresh = _FreshState(config)
  if config.model.pretrained and not resuming:
    fresh.resolved = weights_lib.resolve(config.model.pretrained, config.model)
  setup = build_setup(config, workdir=None if overwrite else workdir, resolved=fresh.resolved)
  tx, lr_schedule = setup_optimizer(config, setup)
  train_input = setup.data.train_input(
    config, size=setup.step_config.image_size, mesh=setup.mesh, main=parallel.is_main_process()
  )
  fresh.setup, fresh.tx = setup, tx
  state = abstract_train_state(config, setup, tx) if resuming else fresh()
  with hold_workdir(workdir, "a training launch"):
    return _train(
      config, workdir, overwrite, setup, tx, lr_schedule, train_input, state, fresh, profile_steps
    )


@dataclasses.dataclass
class _FreshState:
  """Builds a fresh, replicated train state; fetches the pretrained weights the first time one
  is needed (a resume whose checkpoint restores never does)."""

  config: ml_collections.ConfigDict
  setup: "Setup | None" = None
  tx: Any = None
  resolved: "weights_lib.Resolved | None" = None

  def __call__(self):
    pretrained = self.config.model.pretrained
    if pretrained and self.resolved is None:
      self.resolved = weights_lib.resolve(pretrained, self.config.model)
    file = self.resolved.file if self.resolved else None
    state = create_train_state(self.config, self.setup, self.tx, file)
    return parallel.replicate(state, self.setup.mesh)


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


def _train(
  config, workdir, overwrite, setup, tx, lr_schedule, train_input, state, fresh, profile_steps
):
  """The run proper, with the workdir held: write config.json, restore, loop, summarise."""
  workdir_lib.prepare(config, workdir, overwrite, main_process=parallel.is_main_process())
  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint_keep)
  state, meta, resumed = _restore(config, checkpointer, state, fresh)
  if fresh.resolved is not None and not resumed and parallel.is_main_process():
    weights_lib.write_record(workdir, fresh.resolved)
  start = int(parallel.fetch(state.step))
  main = parallel.is_main_process()
  sink = writers.create_run_writer(
    config, workdir, start_step=start, environ=os.environ, main_process=main
  )
  _announce(config, setup, start, resumed)
  fuse = device_input.loop_parts(train_input)[1]
  train_step, eval_step = _compile_steps(
    config, setup, tx, lr_schedule, workdir, profile_steps, wrap=fuse
  )
  batches = _device_batches(train_input, setup, start)
  loop = _start_loop(config, setup, workdir, sink, checkpointer, meta, start)
  clock = TrainClock()
  with _Preemption() as preemption, _close_on_error(loop), train_step:
    while loop.step < setup.total_steps:
      with clock.timed():  # images/s counts this and the fetch: not logging, eval or checkpoints
        state, metrics = train_step(state, next(batches), loop.step)
      loop.pending.append(metrics)
      loop.step += 1
      loop.bar.update(1)
      stop = _agreed_stop(preemption.requested, loop.log_due)
      if loop.log_due or stop:
        _fetch(loop, clock)
      if loop.log_due:
        _log_train(loop, clock.lap(), batches.mean_wait_ms())
      if loop.due_at_epoch_end(config.eval_every_epochs):
        _evaluate(loop, eval_step, state)
      if loop.due_at_epoch_end(config.checkpoint_every_epochs):
        _checkpoint(loop, state)
      if stop:
        _preempt(loop, state)
        break
  loop.bar.close()
  checkpointer.close()
  done = loop.step >= setup.total_steps
  fit = evaluate_train_fit(eval_step, state, setup, config, config.eval_batch_size) if done else {}
  summary = _summary(loop, fit)
  sink.finish(summary)
  sink.close()
  if parallel.is_main_process() and summary["completed"]:
    writers.write_json(os.path.join(workdir, workdir_lib.SUMMARY_FILE), summary)
  return summary
