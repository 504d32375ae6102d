"""Sharpness analysis of a saved model: Hessian spectrum and trace, m-sharpness, loss landscapes.

  python -m jaxsam.analyze --workdir=RUN_DIR [--checkpoint=PATH] \
      [--what=hessian,sharpness,landscape]
      [--num_examples=1024] [--batch_size=256] [--seed=0] [--top_k=5] [--rho=0.05] [--m=32] ...

Everything is measured on one fixed, seeded subset of the TRAIN split, without augmentation and
with BatchNorm in inference mode (running statistics), in float32, on the run's training loss
(cross-entropy with its label smoothing; the L2 term is left out: it only shifts the Hessian by
weight_decay * I). Batches are sharded over all devices like training; the math is in
`jaxsam.sharpness`, the pictures in `jaxsam.landscape_plots`. Results go to
`RUN_DIR/analysis/analysis.json`, PNGs next to it, and the run's wandb when its config has wandb on.
"""

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxsam import cli, quiet

if __name__ == "__main__":  # before TF and JAX load (through the imports below): a quiet start
  quiet.quiet_start()

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxsam import checkpoint as ckpt_lib
from jaxsam import (
  config_schema,
  errors,
  landscape_plots,
  losses,
  models,
  parallel,
  run_setup,
  sharpness,
  steps,
  writers,
)
from jaxsam import state as state_lib
from jaxsam import workdir as workdir_lib
from jaxsam.data import rows, sources

WHAT = ("hessian", "sharpness", "landscape")
HESSIAN_METHODS = ("lanczos", "power")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to measure and how; every field is a command-line flag of the same name."""

  what: tuple[str, ...] = WHAT
  num_examples: int = 1024  # train examples in the fixed subset
  batch_size: int = 256  # global; rounded to a multiple of the device count
  seed: int = 0  # subset, Lanczos start, Hutchinson probes and landscape directions
  top_k: int = 5
  hessian_method: str = "lanczos"
  hessian_iters: int = 30  # Lanczos steps, or power iterations per eigenvalue
  trace_probes: int = 30
  rho: tuple[float, ...] = (0.05,)
  m: tuple[int, ...] = (32,)
  ascent_steps: int = 1  # 1 = the SAM paper's one-step ascent
  grid_1d: int = 41  # points along one direction (odd: the grid holds the checkpoint)
  grid_2d: int = 21  # points per axis of the 2-D grid (odd)
  grid_range: float = 1.0  # coordinates in [-range, range] along filter-normalised directions
  progress: bool = True
  wandb: bool = True  # log to the run's wandb when its config has wandb on

  def check(self) -> None:
    """One-line ConfigErrors for values no analysis can use (the split size is checked later)."""
    unknown = [w for w in self.what if w not in WHAT]
    if unknown or not self.what:
      raise errors.ConfigError(f"--what={','.join(self.what)} is not a list of: {', '.join(WHAT)}")
    if self.hessian_method not in HESSIAN_METHODS:
      raise errors.ConfigError(
        f"--hessian_method={self.hessian_method!r} is unknown; known: {', '.join(HESSIAN_METHODS)}"
      )
    positive = {
      "num_examples": self.num_examples,
      "batch_size": self.batch_size,
      "top_k": self.top_k,
      "hessian_iters": self.hessian_iters,
      "trace_probes": self.trace_probes,
      "ascent_steps": self.ascent_steps,
    }
    for name, value in positive.items():
      if value < 1:
        raise errors.ConfigError(f"--{name}={value} must be >= 1")
    for name, value in (("grid_1d", self.grid_1d), ("grid_2d", self.grid_2d)):
      if value < 3 or value % 2 == 0:
        raise errors.ConfigError(
          f"--{name}={value} must be odd and >= 3, so that the grid holds the checkpoint itself"
        )
    if not self.grid_range > 0:
      raise errors.ConfigError(f"--grid_range={self.grid_range} must be > 0")
    if not self.rho or any(not r > 0 for r in self.rho):
      raise errors.ConfigError(f"--rho={self.rho} must be positive radii, e.g. --rho=0.05,0.1")
    if not self.m or any(m < 1 or m > self.num_examples for m in self.m):
      raise errors.ConfigError(
        f"--m={','.join(map(str, self.m))} must be group sizes in [1, --num_examples="
        f"{self.num_examples}]"
      )


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """A restored checkpoint with what its config resolves to."""

  config: ml_collections.ConfigDict
  setup: run_setup.Setup
  state: state_lib.TrainState
  meta: dict
  checkpoint: str


# --------------------------------------------------------------------------------- loading


def check_checkpoint_config(checkpoint: str, config: ml_collections.ConfigDict) -> None:
  """A checkpoint inside another run folder must come from a run of the same config."""
  run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
  if not os.path.isfile(workdir_lib.RunDir(run_dir).config):
    return  # a bare checkpoint folder: restore() still checks every shape
  diff = workdir_lib.config_diff(
    workdir_lib.read_config(run_dir).to_dict(),
    config.to_dict(),
    workdir_lib.ANALYSIS_MAY_DIFFER,
    defaults=workdir_lib.default_config(),
  )
  if diff:
    raise errors.CheckpointError(
      f"checkpoint {checkpoint} belongs to a run of another config (differs in "
      f"{', '.join(diff[:5])}); pass that run's folder as --workdir={run_dir}"
    )


def restore_run(workdir: str, checkpoint: str | None = None, mesh=None) -> RestoredRun:
  """Restores a run's checkpoint (default its newest) with the run's own config."""
  config = workdir_lib.read_config(workdir)
  path = workdir_lib.resolve_checkpoint(workdir, checkpoint)
  check_checkpoint_config(path, config)
  setup = run_setup.build_setup(config, mesh=mesh, workdir=workdir)
  tx, _ = run_setup.setup_optimizer(config, setup)
  state, meta = ckpt_lib.restore(path, run_setup.abstract_state(setup, tx))
  return RestoredRun(config=config, setup=setup, state=state, meta=meta, checkpoint=path)


# ------------------------------------------------------------------------------------ data


def select_subset(data, num_examples: int, seed: int, size: int) -> sources.Split:
  """A fixed subset of the train split of `data` (a `jaxsam.data` DataSource), unaugmented: the
  first `num_examples` of the permutation drawn from `seed`; streamed images resized and
  centre-cropped to `size` as the test split is."""
  n = data.num_train
  if num_examples > n:
    raise errors.DataError(
      f"--num_examples={num_examples} exceeds the {n} examples of the train split; use <= {n}"
    )
  index = np.random.default_rng(seed).permutation(n)[:num_examples]
  return data.train_examples(index, size)


def effective_batch_size(batch_size: int, num_examples: int, num_devices: int) -> int:
  """`batch_size`, capped at the subset and rounded up to a multiple of the device count."""
  batch = min(batch_size, num_examples)
  return -(-batch // num_devices) * num_devices


def example_batches(subset: sources.Split, batch_size: int, mesh) -> list[dict[str, jax.Array]]:
  """Sharded batches covering the subset once; padding rows in the last one carry mask 0."""
  n = len(subset.labels)
  out = []
  for index, mask in rows.padded_batches(n, batch_size, jax.process_index(), jax.process_count()):
    out.append(
      parallel.shard_batch(
        {
          "image": subset.images[index],
          "label": subset.labels[index].astype(np.int32),
          "mask": mask.astype(np.float32),
        },
        mesh,
      )
    )
  return out


def group_batches(
  subset: sources.Split, m: int, batch_size: int, mesh
) -> tuple[list[tuple[dict[str, jax.Array], np.ndarray]], int]:
  """Disjoint groups of m examples, several per batch (sharded on the group axis), and their count.

  The subset's last `num_examples % m` examples form no full group and are left out; padding
  groups (copies of group 0) fill the last batch with weight 0.
  """
  num_groups = len(subset.labels) // m
  devices = mesh.devices.size
  per_batch = -(-max(1, batch_size // m) // devices) * devices
  images = subset.images[: num_groups * m].reshape((num_groups, m) + subset.images.shape[1:])
  labels = subset.labels[: num_groups * m].reshape(num_groups, m).astype(np.int32)
  out = []
  for index, mask in rows.padded_batches(
    num_groups, per_batch, jax.process_index(), jax.process_count()
  ):
    weight = mask.astype(np.float32)
    batch = parallel.shard_batch(
      {"image": images[index], "label": labels[index], "weight": weight}, mesh
    )
    out.append(({"image": batch["image"], "label": batch["label"]}, batch["weight"]))
  return out, num_groups


# ------------------------------------------------------------------------------- objectives


def inference_model(run: RestoredRun):
  """The run's architecture computing in float32 (a bf16 run's HVPs would be mostly noise)."""
  return models.create_model(run.config.model, num_classes=run.setup.num_classes, dtype=jnp.float32)


def make_objectives(run: RestoredRun, num_examples: int):
  """(loss_fn, group_loss_fn, metrics_fn) over params, with BN statistics and preprocessing fixed.

  loss_fn(params, batch) is the batch's share of the subset's mean loss (masked sum / N), so the
  subset loss is the sum over batches; group_loss_fn is the mean loss of one group of m examples.
  """
  model = inference_model(run)
  cfg = dataclasses.replace(run.setup.step_config, dtype=jnp.float32)
  batch_stats = run.state.batch_stats
  smoothing = cfg.label_smoothing

  def logits_fn(params, images):
    return model.apply(
      {"params": params, "batch_stats": batch_stats}, steps.preprocess(images, cfg), train=False
    )

  def loss_fn(params, batch):
    per_example = losses.cross_entropy(logits_fn(params, batch["image"]), batch["label"], smoothing)
    return jnp.sum(per_example * batch["mask"]) / num_examples

  def group_loss_fn(params, group):
    return jnp.mean(
      losses.cross_entropy(logits_fn(params, group["image"]), group["label"], smoothing)
    )

  @jax.jit
  def metrics_fn(params, batch):
    logits = logits_fn(params, batch["image"])
    mask = batch["mask"]
    return {
      "loss": jnp.sum(losses.cross_entropy(logits, batch["label"], smoothing) * mask),
      "correct": jnp.sum(losses.correct_top1(logits, batch["label"]) * mask),
    }

  return loss_fn, group_loss_fn, metrics_fn


def subset_metrics(metrics_fn, params, batches, num_examples: int) -> dict[str, float]:
  """Mean loss and top-1 accuracy of `params` over the subset."""
  sums = parallel.fetch([metrics_fn(params, batch) for batch in batches])  # summed on the host:
  # eager device adds would each compile once per sharding, for two scalars per batch
  return {
    "loss": float(sum(np.float64(s["loss"]) for s in sums)) / num_examples,
    "accuracy": float(sum(np.float64(s["correct"]) for s in sums)) / num_examples,
  }


# ------------------------------------------------------------------------------- analyses


def hessian_analysis(loss_fn, params, batches, settings: Settings) -> dict[str, Any]:
  """Top-k eigenvalues and Hutchinson trace of the subset loss's Hessian."""
  matvec, dim = sharpness.hessian_matvec(loss_fn, params, batches)
  key = jax.random.PRNGKey(settings.seed)
  dtype = jax.tree.leaves(params)[0].dtype
  method = {"lanczos": sharpness.lanczos, "power": sharpness.power_iteration}
  eig = method[settings.hessian_method](
    matvec,
    dim,
    num_iters=settings.hessian_iters,
    k=settings.top_k,
    key=jax.random.fold_in(key, 0),
    dtype=dtype,
    progress=settings.progress,
  )
  tr = sharpness.hutchinson_trace(
    matvec,
    dim,
    num_probes=settings.trace_probes,
    key=jax.random.fold_in(key, 1),
    dtype=dtype,
    progress=settings.progress,
  )
  return {
    "lambda_max": float(eig.eigenvalues[0]),
    "eigenvalues": [float(x) for x in eig.eigenvalues],
    "residuals": [float(x) for x in eig.residuals],
    "method": settings.hessian_method,
    "num_hvps_eigen": int(eig.num_matvecs),
    "trace": tr.trace,
    "trace_stderr": tr.stderr,
    "trace_probes": settings.trace_probes,
    "num_params": dim,
  }


def sharpness_analysis(group_loss_fn, params, subset, mesh, settings: Settings) -> dict[str, Any]:
  """m-sharpness for every (rho, m) asked; `value` is the first pair's after all ascent steps."""
  results = []
  for m in settings.m:
    batches, _ = group_batches(subset, m, settings.batch_size, mesh)
    for rho in settings.rho:
      s = sharpness.m_sharpness(
        group_loss_fn,
        params,
        batches,
        rho=rho,
        steps=settings.ascent_steps,
        progress=settings.progress,
      )
      results.append(
        {
          "rho": rho,
          "m": m,
          "ascent_steps": settings.ascent_steps,
          "value": float(s.values[-1]),
          "stderr": float(s.stderr[-1]),
          "per_step": [float(v) for v in s.values],
          "num_groups": s.num_groups,
        }
      )
  first = results[0]
  return {
    "value": first["value"],
    "stderr": first["stderr"],
    "rho": first["rho"],
    "m": first["m"],
    "ascent_steps": settings.ascent_steps,
    "results": results,
  }


def landscape_analysis(
  metrics_fn, params, batches, num_examples: int, settings: Settings
) -> dict[str, Any]:
  """1-D and 2-D train loss and accuracy along filter-normalised random directions."""
  key = jax.random.PRNGKey(settings.seed)
  d1 = sharpness.filter_normalized_direction(jax.random.fold_in(key, 2), params)
  d2 = sharpness.filter_normalized_direction(jax.random.fold_in(key, 3), params)
  eval_fn = lambda p: subset_metrics(metrics_fn, p, batches, num_examples)
  r = settings.grid_range
  xs = np.linspace(-r, r, settings.grid_1d)
  line = sharpness.landscape(
    eval_fn, params, [d1], [xs], progress=settings.progress, desc="landscape 1-D"
  )
  grid = np.linspace(-r, r, settings.grid_2d)
  surface = sharpness.landscape(
    eval_fn, params, [d1, d2], [grid, grid], progress=settings.progress, desc="landscape 2-D"
  )
  return {
    "directions": "filter-normalised Gaussian (Li et al. 2018); biases and BN parameters fixed",
    "range": r,
    "1d": {"x": xs.tolist(), "loss": line["loss"].tolist(), "accuracy": line["accuracy"].tolist()},
    "2d": {
      "x": grid.tolist(),
      "y": grid.tolist(),
      "loss": surface["loss"].tolist(),
      "accuracy": surface["accuracy"].tolist(),
    },
  }


def analyze(
  workdir: str,
  settings: Settings = Settings(),
  *,
  checkpoint: str | None = None,
  mesh=None,
  environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
  """Runs the analyses asked for on one checkpoint; writes analysis.json and PNGs; returns the dict.

  Args:
    workdir: a training run's folder (holds config.json and checkpoints/).
    settings: what to measure (see Settings); checked first.
    checkpoint: a checkpoint step folder; default the run's newest.
    mesh: the device mesh (default all devices).
    environ: the process environment, which decides wandb.mode=auto (see
      jaxsam.writers.resolve_wandb_mode); None = no credentials, WANDB_MODE unset.

  Returns:
    The analysis.json record: checkpoint, step, subset, train loss and accuracy at the
    checkpoint, and `hessian`, `sharpness`, `landscape` as asked, with the settings and timings.
  """
  settings.check()
  from jaxsam.data import pipeline  # TF import: only once we know there is work to do

  pipeline.hide_gpus_from_tf()
  config_schema.validate(workdir_lib.read_config(workdir))
  workdir_lib.check_not_held(workdir)  # one writer: not into a folder a run is writing
  with run_setup.hold_workdir(workdir, "jaxsam.analyze"):
    return _analyze(workdir, settings, checkpoint, mesh, environ)


def _analyze(workdir, settings, checkpoint, mesh, environ) -> dict[str, Any]:
  """The analyses themselves, with the workdir held (see `analyze`)."""
  run = restore_run(workdir, checkpoint, mesh=mesh)
  mesh = run.setup.mesh
  subset = select_subset(
    run.setup.data, settings.num_examples, settings.seed, run.setup.step_config.image_size
  )
  n = settings.num_examples
  batch_size = effective_batch_size(settings.batch_size, n, mesh.devices.size)
  batches = example_batches(subset, batch_size, mesh)
  loss_fn, group_loss_fn, metrics_fn = make_objectives(run, n)
  params = run.state.params
  start = time.time()
  at_checkpoint = subset_metrics(metrics_fn, params, batches, n)
  result: dict[str, Any] = {
    "workdir": os.path.abspath(workdir),
    "checkpoint": run.checkpoint,
    "step": int(parallel.fetch(run.state.step)),
    "epoch": run.meta.get("epoch"),
    "subset": {
      "split": "train",
      "num_examples": n,
      "seed": settings.seed,
      "augmentation": False,
      "batch_norm": "inference (running statistics)",
    },
    "train_loss": at_checkpoint["loss"],
    "train_accuracy": at_checkpoint["accuracy"],
    "settings": {
      **dataclasses.asdict(settings),
      "batch_size": batch_size,
      "num_devices": int(mesh.devices.size),
      "label_smoothing": run.setup.step_config.label_smoothing,
    },
    "timings_s": {},
  }
  analyses = {
    "hessian": lambda: hessian_analysis(loss_fn, params, batches, settings),
    "sharpness": lambda: sharpness_analysis(group_loss_fn, params, subset, mesh, settings),
    "landscape": lambda: landscape_analysis(metrics_fn, params, batches, n, settings),
  }
  for name in WHAT:
    if name in settings.what:
      t = time.time()
      result[name] = analyses[name]()
      result["timings_s"][name] = round(time.time() - t, 2)
  result["timings_s"]["total"] = round(time.time() - start, 2)
  if parallel.is_main_process():
    pngs = write_outputs(workdir, result)
    print(summary_line(result), flush=True)
    if settings.wandb:
      log_to_wandb(run.config, workdir, result, pngs, environ=environ or {})
  return result


def write_outputs(workdir: str, result: dict[str, Any]) -> dict[str, str]:
  """analysis.json and the landscape PNGs under `<workdir>/analysis/`; returns {name: png path}."""
  out_dir = workdir_lib.RunDir(workdir).analysis_dir
  os.makedirs(out_dir, exist_ok=True)
  writers.write_json(workdir_lib.RunDir(workdir).analysis, result)
  pngs = {}
  if "landscape" in result:
    title = f"{os.path.basename(os.path.normpath(workdir))} step {result['step']}"
    pngs = landscape_plots.write_landscape_plots(result["landscape"], out_dir, title=title)
  return pngs


def summary_line(result: dict[str, Any]) -> str:
  parts = [
    (
      f"jaxsam analyze: step {result['step']}: train loss {result['train_loss']:.4f} "
      f"acc {100 * result['train_accuracy']:.2f}% on {result['subset']['num_examples']}"
    )
  ]
  if "hessian" in result:
    h = result["hessian"]
    parts.append(
      f"lambda_max {h['lambda_max']:.4g}, trace {h['trace']:.4g} +- {h['trace_stderr']:.2g}"
    )
  if "sharpness" in result:
    s = result["sharpness"]
    parts.append(f"m-sharpness(rho={s['rho']}, m={s['m']}) {s['value']:.4g} +- {s['stderr']:.2g}")
  return "; ".join(parts) + f" -> {workdir_lib.RunDir(result['workdir']).analysis_dir}"


def log_to_wandb(
  config: ml_collections.ConfigDict,
  workdir: str,
  result: dict[str, Any],
  pngs: Mapping[str, str],
  *,
  environ: Mapping[str, str],
) -> None:
  """Adds the scalars (as `analysis/...` summary values) and PNGs to the run's wandb run."""
  writer = writers.create_wandb_writer(
    config.wandb, workdir_lib.RunDir(workdir), config.to_dict(), environ=environ
  )
  if writer is None:
    return
  import wandb

  scalars = {
    "analysis/step": result["step"],
    "analysis/train_loss": result["train_loss"],
    "analysis/train_accuracy": result["train_accuracy"],
  }
  if "hessian" in result:
    scalars.update(
      {
        "analysis/lambda_max": result["hessian"]["lambda_max"],
        "analysis/hessian_trace": result["hessian"]["trace"],
      }
    )
  if "sharpness" in result:
    scalars["analysis/m_sharpness"] = result["sharpness"]["value"]
  writer.run.summary.update(scalars)
  writer.run.log({f"analysis/{name}": wandb.Image(path) for name, path in pngs.items()})
  writer.close()


# ------------------------------------------------------------------------------ command line


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line and exit code 2, as launch.py's."""

  def error(self, message: str):
    self.exit(2, f"error: {message}\n")


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings]:
  d = Settings()
  p = _Parser(prog="python -m jaxsam.analyze", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="the training run's folder")
  p.add_argument("--checkpoint", default=None, help="checkpoint step folder (default: newest)")
  p.add_argument("--what", default=",".join(d.what), help=f"comma list of {', '.join(WHAT)}")
  p.add_argument("--num_examples", type=int, default=d.num_examples)
  p.add_argument("--batch_size", type=int, default=d.batch_size)
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--top_k", type=int, default=d.top_k, help="Hessian eigenvalues to report")
  p.add_argument("--hessian_method", default=d.hessian_method, choices=HESSIAN_METHODS)
  p.add_argument("--hessian_iters", type=int, default=d.hessian_iters)
  p.add_argument("--trace_probes", type=int, default=d.trace_probes)
  p.add_argument("--rho", type=_floats, default=d.rho, help="comma list of ascent radii")
  p.add_argument("--m", type=_ints, default=d.m, help="comma list of m-sharpness group sizes")
  p.add_argument("--ascent_steps", type=int, default=d.ascent_steps)
  p.add_argument("--grid_1d", type=int, default=d.grid_1d)
  p.add_argument("--grid_2d", type=int, default=d.grid_2d)
  p.add_argument("--grid_range", type=float, default=d.grid_range)
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument("--no_wandb", action="store_true", help="do not log to the run's wandb")
  args = p.parse_args(argv)
  settings = Settings(
    what=tuple(w.strip() for w in args.what.split(",") if w.strip()),
    num_examples=args.num_examples,
    batch_size=args.batch_size,
    seed=args.seed,
    top_k=args.top_k,
    hessian_method=args.hessian_method,
    hessian_iters=args.hessian_iters,
    trace_probes=args.trace_probes,
    rho=args.rho,
    m=args.m,
    ascent_steps=args.ascent_steps,
    grid_1d=args.grid_1d,
    grid_2d=args.grid_2d,
    grid_range=args.grid_range,
    progress=not args.no_progress,
    wandb=not args.no_wandb,
  )
  return args, settings


@cli.entry
def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry: bad input is one line on stderr and exit code 2 (`jaxsam.cli`)."""
  try:
    args, settings = parse_args(sys.argv[1:] if argv is None else argv)
  except SystemExit as e:  # argparse has printed its one line (or --help)
    return e.code
  analyze(args.workdir, settings, checkpoint=args.checkpoint, environ=os.environ)
  return 0


if __name__ == "__main__":
  sys.exit(main())
