"""The training loop: steps a run that `jaxsam.run_setup` built, with periodic actions between.

`train_and_evaluate(config, workdir)` is the whole program behind `launch.py`. After each step the
loop runs its periodic actions (`periodic_actions`: progress, fetch, log, eval, checkpoint,
profile, preemption), each when `due`: clu's `periodic_actions` idea written small, because these
trigger on epoch ends, the run's last step and a preemption every process agrees on, where clu's
trigger on step counts and seconds. `RunProgress` is the run's record, saved with every
checkpoint; the compiled steps live in `jaxsam.steps`, the set-up in `jaxsam.run_setup`.
"""

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from jaxsam import checkpoint as ckpt_lib
from jaxsam import evaluate, optim, parallel, plots, profiling, run_setup, steps, writers
from jaxsam import state as state_lib
from jaxsam.data import device_input
from jaxsam.run_setup import Setup


@dataclasses.dataclass
class RunProgress:
  """The run's record, saved with every checkpoint as its `meta` so that a resumed run continues
  the same records and summary: the one place that says what a fresh run starts from (`fresh`)
  and what a resumed one restores (`restored`)."""

  epoch: int = 0  # epochs ended at the last save
  best_accuracy: float | None = None
  best_epoch: int | None = None
  window: list[dict] = dataclasses.field(default_factory=list)  # train steps not yet logged
  wall_time: float = 0.0  # seconds of training before this launch, updated at each save
  sam_steps: float = 0.0  # steps that took the SAM ascent
  last_accuracy: float | None = None  # the latest test accuracy (None until an eval)
  evaluated_epoch: int | None = None  # the epoch of that eval

  @classmethod
  def fresh(cls) -> "RunProgress":
    return cls()

  @classmethod
  def restored(cls, meta: dict, step: int, default_sam_active: float) -> "RunProgress":
    """The record a checkpoint's `meta` holds; a checkpoint from before the SAM step count was
    kept counts each of its `step` steps as the run's default."""
    names = {f.name for f in dataclasses.fields(cls)}
    progress = cls(**{k: v for k, v in meta.items() if k in names})
    progress.window = list(progress.window)
    if "sam_steps" not in meta:
      progress.sam_steps = step * default_sam_active
    return progress

  def to_meta(self) -> dict:
    """The checkpoint's `meta` (JSON): the eval fields only once there was an eval."""
    meta = dataclasses.asdict(self)
    for key in ("last_accuracy", "evaluated_epoch"):
      if meta[key] is None:
        del meta[key]
    return meta


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
class Loop:
  """What the periodic actions share: the run's fixed parts, its record and the current step."""

  config: ml_collections.ConfigDict
  setup: Setup
  run_dir: Any  # workdir.RunDir
  sink: Any  # writers.RunWriter
  checkpointer: ckpt_lib.Checkpointer
  bar: Any  # tqdm progress bar
  progress: RunProgress
  step: int
  saved_step: int
  wall_before: float
  stop: bool = False  # every process agreed to stop for a preemption after this step
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


@dataclasses.dataclass(frozen=True)
class Action:
  """One periodic action: after a step, `run(loop, state)` when `due(loop)`."""

  name: str
  due: Callable[[Loop], bool]
  run: Callable[[Loop, Any], None]


def default_sam_active(config: ml_collections.ConfigDict) -> float:
  """A step's `sam/active` when it logs none: every step of a SAM run ascends, no plain one."""
  return 1.0 if config.sam.rho > 0 else 0.0


def sam_steps(metrics: list[dict], default: float) -> float:
  """How many of these steps took the SAM ascent: the sum of `sam/active`, else `default` each."""
  return float(sum(m.get("sam/active", default) for m in metrics))


def _fetch(loop: Loop, clock: TrainClock) -> None:
  """Moves the pending device metrics into the window; a non-finite loss ends training."""
  with clock.timed():  # waits for the device: training time
    fetched = [{k: float(v) for k, v in m.items()} for m in parallel.fetch(loop.pending)]
  loop.pending = []
  loop.progress.sam_steps += sam_steps(fetched, default_sam_active(loop.config))
  loop.progress.window += fetched
  window = loop.progress.window
  bad = _first_nonfinite(window, loop.step - len(window) + 1)
  if bad is not None:
    raise TrainingError(
      f"non-finite train loss at step {bad}; last good checkpoint: "
      f"{loop.checkpointer.latest_path() or 'none'}; try a lower optimizer.learning_rate"
    )


def _log_train(loop: Loop, train_seconds: float, input_wait_ms: float) -> None:
  """One record of the window's means, with images/s over the window's training time and the
  mean wait per step for the next batch (`DevicePrefetch.mean_wait_ms`)."""
  window = loop.progress.window
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
  loop.progress.window = []


def _write_curves(run_dir) -> None:
  """curves.png from metrics.jsonl, titled with the run folder's name."""
  plots.write_curves(
    {"": writers.read_metrics(run_dir.metrics)},
    run_dir.curves,
    title=os.path.basename(os.path.normpath(os.path.abspath(run_dir.root))),
  )


def _evaluate(loop: Loop, eval_step, state) -> None:
  """Test metrics to the sinks, the best accuracy to the record, an epoch line and the curves."""
  metrics = evaluate.evaluate_test_split(eval_step, state, loop.setup, loop.config.eval_batch_size)
  epoch = loop.epochs_done
  loop.sink.write(
    {
      "step": loop.step,
      "epoch": epoch,
      **{k: v for k, v in metrics.items() if k.startswith("test/") and k != "test/count"},
    }
  )
  acc, progress = metrics["test/accuracy"], loop.progress
  if progress.best_accuracy is None or acc > progress.best_accuracy:
    progress.best_accuracy, progress.best_epoch = acc, epoch
  progress.last_accuracy, progress.evaluated_epoch = acc, epoch
  if parallel.is_main_process():
    r = loop.record
    loop.bar.write(
      f"epoch {epoch:3d} | step {loop.step} | train loss {r['train/loss']:.4f} "
      f"acc {100 * r['train/accuracy']:.2f}% | test loss {metrics['test/loss']:.4f} "
      f"acc {100 * acc:.2f}% top5 {100 * metrics['test/top5']:.2f}% | "
      f"{r['images_per_sec']:.0f} img/s"
    )
    _write_curves(loop.run_dir)


def _save(loop: Loop, state, best_metrics: dict | None = None) -> str:
  loop.progress.epoch, loop.progress.wall_time = loop.epochs_done, loop.wall_time()
  loop.saved_step = loop.step
  meta = loop.progress.to_meta()
  return loop.checkpointer.save(loop.step, state, meta, best_metrics=best_metrics)


def _checkpoint(loop: Loop, state) -> None:
  """Saves state and record; an epoch that was evaluated also ranks the checkpoint by accuracy."""
  epoch, progress = loop.epochs_done, loop.progress
  evaluated = progress.evaluated_epoch == epoch
  path = _save(loop, state, {"test/accuracy": progress.last_accuracy} if evaluated else None)
  loop.sink.log_checkpoint(path, loop.step, best=evaluated and progress.best_epoch == epoch)


def _preempt(loop: Loop, state) -> None:
  """Saves this step (unless just saved) and marks the run preempted; the rerun resumes here."""
  if loop.saved_step != loop.step:
    _save(loop, state)
  if parallel.is_main_process():
    loop.bar.write(f"jaxsam: preempted at step {loop.step}; checkpoint saved, rerun to resume")
  loop.sink.mark_preempting()


def periodic_actions(
  config, clock: TrainClock, batches, eval_step, profile: profiling.Profile
) -> list[Action]:
  """What runs after a step, in this order, each when due."""
  return [
    Action(
      "profile", lambda loop: profile.due(loop.step - 1), lambda _, state: profile.stop(state)
    ),
    Action("progress", lambda _: True, lambda loop, _: loop.bar.update(1)),
    Action("fetch", lambda loop: loop.log_due or loop.stop, lambda loop, _: _fetch(loop, clock)),
    Action(
      "log",
      lambda loop: loop.log_due,
      lambda loop, _: _log_train(loop, clock.lap(), batches.mean_wait_ms()),
    ),
    Action(
      "eval",
      lambda loop: loop.due_at_epoch_end(config.eval_every_epochs),
      lambda loop, state: _evaluate(loop, eval_step, state),
    ),
    Action(
      "checkpoint", lambda loop: loop.due_at_epoch_end(config.checkpoint_every_epochs), _checkpoint
    ),
    Action("preempt", lambda loop: loop.stop, _preempt),
  ]


@contextlib.contextmanager
def _close_on_error(loop: Loop):
  """On any exception (non-finite loss, Ctrl-C twice...) close sinks; wandb marks the run failed."""
  try:
    yield
  except BaseException:
    loop.bar.close()
    loop.checkpointer.close()
    loop.sink.close(exit_code=1)
    raise


def fresh_state(launch: run_setup.Launch) -> state_lib.TrainState:
  """A fresh run's train state: random or pretrained variables, replicated over the mesh."""
  weights = launch.weights()
  file = weights.file if weights else None
  setup = launch.setup
  state = state_lib.create_train_state(
    setup.model,
    launch.tx,
    setup.step_config,
    seed=launch.config.seed,
    weights_file=file,
    model_ref=launch.config.model,
  )
  return parallel.replicate(state, launch.setup.mesh)


def start_or_resume(
  launch: run_setup.Launch, checkpointer, fresh: state_lib.TrainState | None = None
) -> tuple[Any, RunProgress, bool]:
  """(state, progress, resumed): what the run folder's latest checkpoint holds, else a fresh run.

  A fresh run starts from `fresh_state` (`fresh` when already built) and `RunProgress.fresh()`; a
  resume restores both from the checkpoint into the state's shapes only, so that it neither
  fetches nor reads the pretrained file.
  """
  config, setup = launch.config, launch.setup
  if launch.resuming:
    target = run_setup.abstract_state(setup, launch.tx)
    restored = checkpointer.restore_latest(ckpt_lib.abstract_like(target))
    if restored:
      state, meta = restored[0], restored[1]
      step = int(parallel.fetch(state.step))
      return state, RunProgress.restored(meta, step, default_sam_active(config)), True
  return fresh if fresh is not None else fresh_state(launch), RunProgress.fresh(), False


def sam_m_text(config, group_size: int) -> str:
  """The start-up line's m: the ascent group size, and a warning when sam.m = 0 left it to the
  device count (the same config is then a different algorithm on 1 and 8 devices)."""
  if not group_size or not config.sam.rho:
    return "n/a (msam)" if config.sam.rho else "n/a (rho=0)"
  if config.sam.m:
    return str(group_size)
  return f"{group_size} (sam.m=0: the per-device batch, so results depend on the device count)"


def _announce(config, setup: Setup, start_step: int, resumed: bool) -> None:
  if parallel.is_main_process():
    print(
      f"jaxsam: {setup.mesh.devices.size} device(s) in {jax.process_count()} process(es), "
      f"SAM m={sam_m_text(config, setup.step_config.group_size)}, "
      f"{setup.steps_per_epoch} steps/epoch, {setup.total_steps} steps, "
      + (f"resuming at step {start_step}" if resumed else "fresh start"),
      flush=True,
    )


def _summary(loop: Loop, train_fit: dict) -> dict:
  config, setup, progress = loop.config, loop.setup, loop.progress
  return {
    "final_test_accuracy": progress.last_accuracy,
    "best_test_accuracy": progress.best_accuracy,
    "best_epoch": progress.best_epoch,
    "steps": loop.step,
    "epochs": loop.step / setup.steps_per_epoch,
    "wall_time_s": loop.wall_time(),
    "num_devices": int(setup.mesh.devices.size),
    "num_processes": jax.process_count(),
    # examples per ascent group (0: no ascent; a ghost-batch-norm group alone is not an ascent)
    "sam_m": setup.step_config.group_size if config.sam.rho else 0,
    "sam_m_config": config.sam.m,  # sam.m as set: 0 = the per-device batch
    "sam_fraction": (progress.sam_steps / loop.step if loop.step else default_sam_active(config)),
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


def _compile_steps(config, setup: Setup, tx, lr_schedule, wrap=None):
  """(train step of (state, batch, step), eval step): the host picks the SAM or base program per
  step for the count-based SAM schedules; `wrap` fuses the device pipeline's gather + augment into
  each train program."""
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
  return train_step, steps.compile_eval_step(setup.mesh, model=setup.model, cfg=setup.step_config)


def _start_loop(launch: run_setup.Launch, sink, checkpointer, progress: RunProgress, start: int):
  """The loop's shared record at step `start`, with its progress bar (main process only)."""
  config, setup = launch.config, launch.setup
  show = parallel.is_main_process() and config.progress_bar
  bar = tqdm.tqdm(
    total=setup.total_steps,
    initial=start,
    unit="step",
    dynamic_ncols=True,
    disable=not show,
    leave=False,
  )
  return Loop(
    config,
    setup,
    launch.run_dir,
    sink,
    checkpointer,
    bar,
    progress,
    step=start,
    saved_step=start,
    wall_before=float(progress.wall_time),
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
  launch = run_setup.prepare_launch(config, workdir, overwrite)  # refuses before writing
  fresh = None if launch.resuming else fresh_state(launch)  # bad pretrained weights: refused too
  setup = launch.setup
  with run_setup.hold_workdir(workdir, "a training launch"):
    checkpointer = run_setup.open_run_folder(launch)
    state, progress, resumed = start_or_resume(launch, checkpointer, fresh)
    run_setup.record_weights(launch, resumed)
    start = int(parallel.fetch(state.step))
    sink = run_setup.create_sink(launch, start)
    _announce(config, setup, start, resumed)
    fuse = device_input.loop_parts(launch.train_input)[1]
    train_step, eval_step = _compile_steps(config, setup, launch.tx, launch.lr_schedule, fuse)
    batches = _device_batches(launch.train_input, setup, start)
    loop = _start_loop(launch, sink, checkpointer, progress, start)
    clock = TrainClock()
    profile = profiling.Profile(profile_steps, launch.run_dir.profile, setup.total_steps)
    actions = periodic_actions(config, clock, batches, eval_step, profile)
    with _Preemption() as preemption, _close_on_error(loop), profile:
      while loop.step < setup.total_steps:
        profile.begin(loop.step)
        with clock.timed():  # images/s counts this and the fetch: not logging, eval, checkpoints
          state, metrics = train_step(state, next(batches), loop.step)
        loop.pending.append(metrics)
        loop.step += 1
        loop.stop = _agreed_stop(preemption.requested, loop.log_due)
        for action in actions:
          if action.due(loop):
            action.run(loop, state)
        if loop.stop:
          break
    loop.bar.close()
    checkpointer.close()
    done = loop.step >= setup.total_steps
    batch = config.eval_batch_size
    fit = evaluate.evaluate_train_fit(eval_step, state, setup, config, batch) if done else {}
    summary = _summary(loop, fit)
    sink.finish(summary)
    sink.close()
    if parallel.is_main_process() and summary["completed"]:
      writers.write_json(launch.run_dir.summary, summary)
    return summary
