"""The SGD-vs-SAM study on one dataset, from one command: a grid of ordinary launch.py runs.

  python -m jaxsam.study --size=cpu --data=../shared/data/cifar10-jpeg.tar.gz --out=runs/study_cpu
  python -m jaxsam.study --size=gpu --data=... --out=runs/study_gpu [--dry_run] [--estimate]

Grid: arm {SGD, SGD with twice the epochs (SAM's compute: a SAM step is two passes), SAM}
x label noise {0, 0.4} x seeds, and with `--m=16,128` an m axis: each SAM arm once per ascent
group size sam.m (arms sam_m16, sam_m128; also nameable in --arms). Each run is a launch.py run
of configs/cifar10_sgd.py or cifar10_sam.py with the size's overrides, in its own workdir under
--out. A rerun of the same command skips the finished runs and resumes an interrupted one. Then
it writes `study.md` (jaxsam.report's tables, mean ± std over seeds, with the m each run used and
its fit of the train labels at the end) and `study_curves.png` (test accuracy, mean ± std band
per setting).
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from jaxsam import cli, config_schema, errors, report
from jaxsam import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer setting of the grid: a config file, an epoch multiplier and sam.* overrides."""

  config_file: str
  epoch_factor: int = 1
  overrides: tuple[tuple[str, int | float | str], ...] = ()


SGD, SAM = "configs/cifar10_sgd.py", "configs/cifar10_sam.py"
# The equal-compute SGD arm runs twice SAM's epochs. The cheaper-SAM arms keep SAM's rho and the
# methods' published defaults (k = 5, the last 20 %, AE-SAM's c from -1 to 1); MSAM takes rho 0.3,
# the default of its authors' reference optimizer, since its radius is measured along the momentum.
ARMS = {
  "sgd": Arm(SGD),
  "sgd2x": Arm(SGD, 2),
  "sam": Arm(SAM),
  "sam5": Arm(SAM, overrides=(("sam.every", 5),)),
  "looksam5": Arm(SAM, overrides=(("sam.variant", "looksam"), ("sam.every", 5))),
  "late20": Arm(SAM, overrides=(("sam.start_fraction", 0.8),)),
  "aesam": Arm(SAM, overrides=(("sam.variant", "aesam"),)),
  "msam": Arm(SAM, overrides=(("sam.variant", "msam"), ("sam.rho", 0.3))),
  # SGD with batch norm over groups of 16, as SAM at m = 16 has: the control that separates SAM's
  # per-group ascent from its smaller batch-norm batch.
  "sgd_bn16": Arm(SGD, overrides=(("model.ghost_batch_size", 16),)),
}
DEFAULT_ARMS = ("sgd", "sgd2x", "sam")
# The model axis (`--model`): the network, its arms and what it changes in the size's overrides.
# vit_tiny: a CPU-sized ViT from scratch, AdamW vs AdamW + SAM (rho 0.05, as the ResNet arms).
VIT_TINY = "configs/cifar10_vit_tiny.py"
ARMS.update(adamw=Arm(VIT_TINY), adamw_sam=Arm(VIT_TINY, overrides=(("sam.rho", 0.05),)))
MODELS = {
  "resnet": (DEFAULT_ARMS, {}),
  # sam.m = 0, the per-device batch: what its study ran (m = 128, the whole batch on one device),
  # kept so that the size's m (16, for the ResNet arms) does not change it; --m sets another.
  "vit_tiny": (("adamw", "adamw_sam"), {"model.name": "vit_tiny", "sam.m": 0}),
}
# MSAM takes one gradient at a point along the momentum: no per-group ascent, so no m.
M_ARMS = ("sam", "sam5", "looksam5", "late20", "aesam", "adamw_sam")
CHEAP_ARMS = ("sam5", "looksam5", "late20", "aesam", "msam")
LABEL_NOISE = (0.0, 0.4)


@dataclasses.dataclass(frozen=True)
class Size:
  """What one study size changes in the configs; `why` is printed with the plan."""

  epochs: int
  seeds: tuple[int, ...]
  overrides: dict[str, int | float | str]  # typed as the config keys, so they apply directly
  why: str


SIZES = {
  # 2-core CPU, <= 60 min: XLA's CPU convolutions run ResNet-8 at 16 px at ~900 images/s for
  # SGD and ~450 for SAM (with the input pipeline on the same 2 cores), and a launch costs ~30 s
  # of start-up, so 18 runs of 1,500 images x 40 epochs (80 for the 2x arm) take about an hour.
  # The regime SAM is meant for, a model that can overfit: 150 images per class, flips but no
  # random crops, so that SGD fits the clean train labels and has epochs left to start
  # memorising the noisy ones. (With crop + flip on 2,000 images it still underfitted at 40
  # epochs: 64 % train accuracy on clean labels.) All 10,000 test images are scored (about 0.5 %
  # standard error per run), every 10 epochs.
  "cpu": Size(
    epochs=40,
    seeds=(0, 1, 2),
    overrides={
      "model.name": "resnet8",
      "model.image_size": 16,
      "dtype": "float32",
      "dataset.train_examples": 1500,
      "augment.crop_padding": 0,
      "batch_size": 128,
      # SAM ascends on groups of 16, as on 8 accelerators of 16 each: at m = 128 (the whole
      # batch: --m=128) it memorised the label noise and lost most of its gain (README, results).
      "sam.m": 16,
      "eval_batch_size": 1000,
      "eval_every_epochs": 10,
      "checkpoint_every_epochs": 10,
      "log_every_steps": 11,
    },
    why="ResNet-8 at 16 px on a class-balanced 1,500-image subset, flips, 40 epochs, batch 128",
  ),
  # A check of the whole chain (data, every arm, the report) in a minute or two before a long
  # grid: 200 images, 1 epoch of a 4-wide ResNet-8 at 8 px. Its accuracies mean nothing.
  "smoke": Size(
    epochs=1,
    seeds=(0,),
    overrides={
      "model.name": "resnet8",
      "model.width": 4,
      "model.image_size": 8,
      "dtype": "float32",
      "dataset.train_examples": 200,
      "batch_size": 50,
      "eval_batch_size": 1000,
      "eval_every_epochs": 1,
      "checkpoint_every_epochs": 1,
      "log_every_steps": 2,
    },
    why="a 4-wide ResNet-8 at 8 px, 200 images, 1 epoch, batch 50 (a check, not a result)",
  ),
  # One H100-class GPU, <= 8 min: the configs as they are (ResNet-18, CIFAR stem, 32 px, bf16,
  # batch 256) on all 50,000 images, 30 epochs; `--estimate` prints the FLOP-based time.
  "gpu": Size(
    epochs=30,
    seeds=(0, 1, 2),
    overrides={"eval_every_epochs": 5, "checkpoint_every_epochs": 10},
    why="ResNet-18 (CIFAR stem) at 32 px, bf16, all 50,000 images, 30 epochs, batch 256",
  ),
}


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str
  argv: tuple[str, ...]
  images: int  # train images one run passes through the model (for the cost estimate)
  passes: int  # forward-backward passes per image
  config_file: str = ""  # what argv launches, for checking the config before any run starts
  overrides: tuple[tuple[str, int | float | str | bool], ...] = ()


def repo_root() -> str:
  """The checkout holding launch.py and configs/ (the study runs them as files)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.isfile(os.path.join(root, "launch.py")):
    raise errors.ConfigError(
      f"launch.py not found in {root}; run the study from a jaxsam checkout (pip install -e .)"
    )
  return root


def arm_for(name: str) -> Arm:
  """ARMS[name], or for `<arm>_m<k>` (e.g. sam_m16) that arm with sam.m = k: SAM's ascent on
  groups of k examples, whatever the device count (sam.m = 0 ascends on the per-device batch)."""
  base, _, m = name.rpartition("_m")
  if base in M_ARMS and m.isdigit():
    arm = ARMS[base]
    return dataclasses.replace(arm, overrides=(*arm.overrides, ("sam.m", int(m))))
  if name not in ARMS:
    raise errors.ConfigError(
      f"arm {name!r} is unknown; known: {', '.join(ARMS)}, 'cheap', or <arm>_m<k> "
      f"(sam.m = k) for {', '.join(M_ARMS)}"
    )
  return ARMS[name]


def with_m(arms: Sequence[str], ms: Sequence[int]) -> list[str]:
  """The arms of an m axis: each SAM arm once per m (sam -> sam_m16, sam_m128), the rest once."""
  if not ms:
    return list(arms)
  return [f"{a}_m{m}" if a in M_ARMS else a for a in arms for m in (ms if a in M_ARMS else (0,))]


def plan(
  size: Size,
  data: str,
  out: str,
  seeds: Sequence[int],
  noises: Sequence[float] = LABEL_NOISE,
  num_train: int = 50_000,
  arms: Sequence[str] = DEFAULT_ARMS,
  model: str = "resnet",
) -> list[Run]:
  """Every run of the grid, in the order they run: by seed, then noise, then arm."""
  runs = []
  examples = size.overrides.get("dataset.train_examples", 0) or num_train
  for seed in seeds:
    for noise in noises:
      for name in arms:
        arm = arm_for(name)
        factor = arm.epoch_factor
        overrides = {
          **size.overrides,
          **MODELS[model][1],
          "num_epochs": size.epochs * factor,
          "seed": seed,
          "dataset.label_noise": noise,
          "dataset.source": "image_folder",
          "dataset.path": data,
          "wandb.mode": "disabled",
          "progress_bar": False,
          **dict(arm.overrides),
        }
        if factor > 1:  # the same number of curve points as the 1x arms
          for key in ("eval_every_epochs", "checkpoint_every_epochs"):
            if key in overrides:
              overrides[key] *= factor
        workdir = os.path.join(out, f"{name}-noise{noise:g}-seed{seed}")
        argv = (
          "launch.py",
          f"--config={arm.config_file}",
          f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in overrides.items()),
        )
        runs.append(
          Run(
            os.path.basename(workdir),
            workdir,
            argv,
            images=examples * size.epochs * factor,
            passes=2 if arm.config_file == SAM or dict(arm.overrides).get("sam.rho") else 1,
            config_file=arm.config_file,
            overrides=tuple(overrides.items()),
          )
        )
  return runs


def run_config(run: Run, root: str):
  """The config one planned run launches with: its config file, then its overrides."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location("study_config", os.path.join(root, run.config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # its `from configs import common`: the installed package
  config = module.get_config()
  config.update_from_flattened_dict(dict(run.overrides))
  return config


def check_configs(runs: Sequence[Run], root: str) -> None:
  """Every planned run's config inside its domains (`config_schema`), before any folder exists."""
  for run in runs:
    try:
      config_schema.validate(run_config(run, root))
    except errors.ConfigError as e:
      raise errors.ConfigError(f"run {run.name}: {e}") from e


def finished(workdir: str) -> bool:
  """Whether the run in `workdir` has completed (its summary.json says so)."""
  return bool(workdir_lib.read_summary(workdir).get("completed"))


def execute(runs: Sequence[Run], out: str, root: str) -> None:
  """Runs each unfinished run as its own launch.py process; its output goes to <out>/logs/."""
  os.makedirs(os.path.join(out, "logs"), exist_ok=True)
  env = dict(os.environ)
  # One XLA compilation cache for the whole grid: runs of one arm compile the same steps.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(out), "xla_cache"))
  for i, run in enumerate(runs, 1):
    if finished(run.workdir):
      print(f"[{i}/{len(runs)}] {run.name}: done before, skipped", flush=True)
      continue
    start = time.time()
    log = os.path.join(out, "logs", f"{run.name}.log")
    with open(log, "a") as f:
      code = subprocess.call(
        [sys.executable, *run.argv], cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT
      )
    if code != 0:
      raise errors.ConfigError(
        f"run {run.name} exited with {code}; see {log} (rerun the same command to resume)"
      )
    summary = workdir_lib.read_summary(run.workdir)
    print(
      f"[{i}/{len(runs)}] {run.name}: final test accuracy "
      f"{100 * summary['final_test_accuracy']:.2f}% in {time.time() - start:.0f} s",
      flush=True,
    )


def noise_sections(runs: Sequence[dict]) -> list[str]:
  """study.md's tables, one section per label-noise level: mean ± std over seeds per setting
  first, then the section's runs, setting by setting, seeds in order."""
  lines = []
  for noise in sorted({r["label_noise"] for r in runs}):
    groups = report.group_by_setting([r for r in runs if r["label_noise"] == noise])
    ordered = [r for group in groups.values() for r in sorted(group, key=lambda r: r["seed"])]
    lines += [f"## Label noise {noise:g}", "", "Test accuracy (%), mean ± std over seeds:", ""]
    lines += [report.seed_table(ordered), "", report.markdown(ordered, cross_table=False), ""]
  return lines


# Placeholders for the folders of --data and --out that lie outside the checkout's folder.
PATH_PLACEHOLDERS = {"--data": "DATA", "--out": "RUNS"}


def portable_command(argv: Sequence[str], root: str) -> str:
  """The study's command line as study.md shows it, runnable from the repository root: the
  --data and --out paths relative to it (when within its parent folder), else a placeholder
  folder (`DATA/`, `RUNS/`) and their last component, never this machine's absolute paths."""

  def portable(flag: str, value: str) -> str:
    path = os.path.abspath(os.path.expanduser(value))
    rel = os.path.relpath(path, root)
    inside = not rel.startswith(os.pardir + os.sep + os.pardir) and rel != os.pardir
    return rel if inside else f"{PATH_PLACEHOLDERS[flag]}/{os.path.basename(path)}"

  words, after = [], None  # `after`: the flag whose value is the next word (`--out DIR`)
  for word in argv:
    flag, eq, value = word.partition("=")
    if after:
      word, after = portable(after, word), None
    elif eq and flag in PATH_PLACEHOLDERS and value:
      word = f"{flag}={portable(flag, value)}"
    elif word in PATH_PLACEHOLDERS:
      after = word
    words.append(word)
  return " ".join(["python -m jaxsam.study", *words])


def write_report(runs: Sequence[Run], out: str, command: str, wall_s: float | None) -> str:
  """study.md (per label-noise level: the seed table, then the per-run table) and
  study_curves.png."""
  loaded = [report.load_run(r.workdir) for r in runs if os.path.isdir(r.workdir)]
  curves = report.write_seed_curves(loaded, os.path.join(out, "study_curves.png"))
  lines = [f"# SGD vs SAM: {len(loaded)} runs", "", f"`{command}`", ""]
  if wall_s is not None:
    lines += [f"Wall time of this invocation: {wall_s / 60:.1f} min.", ""]
  lines += [*noise_sections(loaded), f"![curves]({os.path.basename(curves)})", ""]
  path = os.path.join(out, "study.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def step_gflops_per_image(size: Size, model: str = "resnet") -> dict[str, float]:
  """XLA's GFLOP per train image of the size's SGD and SAM steps (compiled here, not run), with
  `model`'s network (the optimizer barely changes the FLOPs)."""
  from jaxsam import quiet  # pylint: disable=import-outside-toplevel

  quiet.quiet_environment(os.environ)  # XLA's C++ INFO/WARNING logs off, as in launch.py
  import jax  # pylint: disable=import-outside-toplevel

  from configs import cifar10_sam, cifar10_sgd  # pylint: disable=import-outside-toplevel
  from jaxsam import parallel, stepcost  # pylint: disable=import-outside-toplevel
  from jaxsam import state as state_lib  # pylint: disable=import-outside-toplevel

  out = {}
  overrides = {
    **{
      k: v
      for k, v in {**size.overrides, **MODELS[model][1]}.items()
      if k.startswith(("model.", "dtype"))
    }
  }
  batch_size = 8  # FLOPs scale linearly with the batch; a small one compiles fast
  mesh = parallel.make_mesh(jax.local_devices()[:1])
  for name, module in (("sgd", cifar10_sgd), ("sam", cifar10_sam)):
    config = module.get_config()
    config.update_from_flattened_dict(overrides)
    config.batch_size = batch_size
    config.sam.m = 0  # a recipe's m need not divide this small batch; FLOPs per image are the same
    step, model, tx, cfg = stepcost.build_step(config, mesh, num_classes=10, steps_per_epoch=100)
    state = state_lib.abstract_state(model, tx, cfg, mesh)
    batch = stepcost.synthetic_batch(batch_size, cfg.image_size, 10, mesh)
    out[name] = stepcost.flops(step.lower(state, batch).compile()) / batch_size / 1e9
  return out


def estimate_seconds(
  runs: Sequence[Run], gflops: dict[str, float], peak_tflops: float, mfu: float
) -> float:
  """Seconds of training compute for the grid at `mfu` of `peak_tflops` (no eval, no compile)."""
  total = sum(r.images * gflops["sam" if r.passes == 2 else "sgd"] for r in runs) * 1e9
  return total / (peak_tflops * 1e12 * mfu)


def model_note(model: str) -> str:
  """What `--model` changes in the size's description (nothing for the ResNet)."""
  if model == "resnet":
    return ""
  return f" (the network: {model} with its config {VIT_TINY}, in place of the ResNet)"


def parse_arms(text: str) -> list[str]:
  """`--arms`: names from ARMS, or 'cheap' for the default three plus the cheaper-SAM arms."""
  names = [a for a in text.split(",") if a]
  names = [n for a in names for n in ((*DEFAULT_ARMS, *CHEAP_ARMS) if a == "cheap" else (a,))]
  if not names:
    raise errors.ConfigError(f"--arms={text!r} names no arm; known: {', '.join(ARMS)}, 'cheap'")
  for name in names:
    arm_for(name)  # one line naming the first unknown arm
  return list(dict.fromkeys(names))


def parse_ms(text: str) -> list[int]:
  """`--m`: SAM's ascent group sizes (sam.m), 0 meaning the per-device batch."""
  try:
    values = [int(x) for x in text.split(",")]
  except ValueError as e:
    raise errors.ConfigError(f"--m={text!r} must be comma-separated integers >= 0") from e
  if any(v < 0 for v in values):
    raise errors.ConfigError(f"--m={text!r} must be comma-separated integers >= 0")
  return list(dict.fromkeys(values))


def parse_floats(flag: str, text: str) -> list[float]:
  try:
    values = [float(x) for x in text.split(",")]
  except ValueError as e:
    raise errors.ConfigError(f"{flag}={text!r} must be comma-separated numbers") from e
  if not all(0 <= v < 1 for v in values):
    raise errors.ConfigError(f"{flag}={text!r}: label noise fractions must be in [0, 1)")
  return values


@cli.entry
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m jaxsam.study", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--size", choices=sorted(SIZES), required=True)
  parser.add_argument(
    "--data", required=True, help="CIFAR-10 as an image folder or archive (<split>/<class>/<image>)"
  )
  parser.add_argument("--out", required=True, help="folder for the runs, study.md and curves")
  parser.add_argument("--seeds", default="", help="comma-separated (default: the size's)")
  parser.add_argument(
    "--arms",
    default="",
    help=f"comma-separated, of {', '.join(ARMS)} (default: the --model's); 'cheap' adds "
    f"{', '.join(CHEAP_ARMS)} to the default three",
  )
  parser.add_argument(
    "--model",
    choices=sorted(MODELS),
    default="resnet",
    help="the network: resnet (the size's ResNet; SGD arms) or vit_tiny (a CPU-sized ViT; arms "
    "adamw, adamw_sam by default)",
  )
  parser.add_argument(
    "--noise",
    default="",
    help="comma-separated label-noise fractions "
    f"(default: {','.join(f'{n:g}' for n in LABEL_NOISE)})",
  )
  parser.add_argument(
    "--m",
    default="",
    help="comma-separated sam.m values: each SAM arm runs once per m, as <arm>_m<k> "
    "(0 = the per-device batch; default: the config's)",
  )
  parser.add_argument("--dry_run", action="store_true", help="print the plan, run nothing")
  parser.add_argument(
    "--estimate",
    action="store_true",
    help="print the grid's FLOP-based GPU time (compiles, runs nothing)",
  )
  parser.add_argument(
    "--peak_tflops",
    type=float,
    default=989.0,
    help="--estimate: the GPU's dense bf16 peak (H100 SXM: 989)",
  )
  parser.add_argument("--mfu", type=float, default=0.25, help="--estimate: assumed MFU")
  args = parser.parse_args(argv)
  size = SIZES[args.size]
  try:
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(size.seeds)
  except ValueError as e:
    raise errors.ConfigError(f"--seeds={args.seeds!r} must be comma-separated integers") from e
  arms = parse_arms(args.arms or ",".join(MODELS[args.model][0]))
  arms = with_m(arms, parse_ms(args.m) if args.m else [])
  noises = parse_floats("--noise", args.noise) if args.noise else list(LABEL_NOISE)
  root = repo_root()
  data = os.path.abspath(os.path.expanduser(args.data))
  if not os.path.exists(data):
    raise errors.ConfigError(
      f"--data={args.data} does not exist; give CIFAR-10 as an image "
      "folder or .tar.gz laid out as <split>/<class>/<image>"
    )
  out = os.path.abspath(args.out)
  runs = plan(size, data, out, seeds, noises=noises, arms=arms, model=args.model)
  check_configs(runs, root)
  print(
    f"jaxsam study --size={args.size} --model={args.model}: {size.why}{model_note(args.model)}; "
    f"{len(runs)} runs "
    f"({len(arms)} arms x {len(noises)} noise levels x seeds {seeds})",
    flush=True,
  )
  if args.estimate:
    gflops = step_gflops_per_image(size, args.model)
    seconds = estimate_seconds(runs, gflops, args.peak_tflops, args.mfu)
    print(
      f"XLA GFLOP per train image: SGD {gflops['sgd']:.3f}, SAM {gflops['sam']:.3f}; the "
      f"grid's training compute at {100 * args.mfu:.0f}% MFU of {args.peak_tflops:g} "
      f"TFLOP/s: {seconds / 60:.1f} min (+ eval, start-up, compiles)",
      flush=True,
    )
  if args.dry_run or args.estimate:
    for run in runs:
      print(" ".join(run.argv))
    return 0
  start = time.time()
  execute(runs, out, root)
  command = portable_command(sys.argv[1:] if argv is None else argv, root)
  print(f"report: {write_report(runs, out, command, time.time() - start)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
