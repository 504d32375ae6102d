"""Every config key's domain in one table, checked once before a run, eval or analysis writes.

`DOMAINS` maps each dotted key of `configs/common.py` to what it accepts (type, range, names);
`RELATIONS` are the checks that read several keys or the device count. `validate(config)` walks
both and raises one `ConfigError` line naming the key, the value and what is accepted. It runs at
the boundary: `train.train_and_evaluate` (launch.py), `--mode=eval`, `jaxsam.analyze` and
`jaxsam.study` call it before any folder is created. The library functions keep their own checks
for callers that pass values directly; the names they accept are the same constants read here.

Why a table and not ml_collections' types alone: a locked ConfigDict checks a value's type, not
its range (`log_every_steps=0` or `num_epochs=-1` would reach the loop), and a config.json read
back for eval is not typed at all.
"""

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jaxsam import errors


@dataclasses.dataclass(frozen=True)
class Domain:
  """What one key accepts: `ok(value)`, the words for the error line, and a value outside."""

  ok: Callable[[Any], bool]
  words: str
  outside: Any  # one out-of-domain value, so that the table can be walked (tests, docs)
  names: Callable[[], Iterable[str]] | None = None  # a choice's names, read when needed

  @property
  def accepted(self) -> str:
    if self.names is not None:
      return "one of " + ", ".join(repr(n) for n in self.names())
    return self.words


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int, high: int | None = None) -> Domain:
  words = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
  return Domain(lambda v: _is_int(v) and v >= low and (high is None or v <= high), words, low - 1)


def number(
  low: float | None = None,
  high: float | None = None,
  *,
  low_open: bool = False,
  high_open: bool = False,
  infinite: bool = False,
) -> Domain:
  """A real number (not bool, not NaN; finite unless `infinite`) in the given interval."""

  def ok(v: Any) -> bool:
    if not _is_real(v) or math.isnan(v) or (not infinite and math.isinf(v)):
      return False
    if low is not None and (v <= low if low_open else v < low):
      return False
    return high is None or (v < high if high_open else v <= high)

  if low is None and high is None:
    words = "a number, -inf and inf included" if infinite else "a finite number"
    outside = math.nan
  elif high is None:
    words, outside = f"a finite number {'>' if low_open else '>='} {low:g}", low - 1
  else:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    words, outside = f"a number in {lo}{low:g}, {high:g}{hi}", high + 1
  return Domain(ok, words, outside)


def choice(names: Callable[[], Iterable[str]], *, fold_case: bool = False) -> Domain:
  """One of `names()` (a callable, so that the registries are imported only when checked);
  `fold_case` accepts any case (`dataset.in_memory=True` from a command line)."""

  def ok(v: Any) -> bool:
    return isinstance(v, str) and (v.lower() if fold_case else v) in tuple(names())

  return Domain(ok, "", "no_such_name", names)


BOOL = Domain(lambda v: isinstance(v, bool), "True or False", "yes")
TEXT = Domain(lambda v: isinstance(v, str), "a string", 3)
NAME = Domain(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string", "")
RATE = Domain(
  lambda v: _is_real(v) and (v == -1 or 0 <= v < 1),
  "-1 (the architecture's default) or a number in [0, 1)",
  1.5,
)


def pair(low: float, high: float | None) -> Domain:
  """(min, max) with low < min <= max (<= high)."""

  def ok(v: Any) -> bool:
    if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(_is_real(x) for x in v):
      return False
    a, b = v
    return low < a <= b and (high is None or b <= high) and math.isfinite(b)

  bound = "" if high is None else f" <= {high:g}"
  return Domain(ok, f"a pair (min, max) with {low:g} < min <= max{bound}", (0.9, 0.1))


# Names that live with the code that uses them; imported when checked (some pull in JAX or TF).
def _dtypes():
  from jaxsam import state

  return state.DTYPES


def _models():
  from jaxsam import models

  return sorted(models.MODELS)


def _pools():
  from jaxsam.models import vit

  return vit.POOLS


def _variants():
  from jaxsam import sam

  return tuple(sam.POLICIES)  # the registered variants, built-in or added


def _optimizers():
  from jaxsam import optim

  return sorted(optim.OPTIMIZERS)


def _schedules():
  from jaxsam import optim

  return sorted(optim.SCHEDULES)


def _sources():
  from jaxsam.data import sources

  return sorted(k for k in sources.SOURCES if k not in sources.NAMED_SOURCES)


def _in_memory():
  from jaxsam.data import choice

  return choice.IN_MEMORY_CHOICES


def _pipelines():
  from jaxsam.data import device_input

  return device_input.PIPELINES


def _crop_fills():
  from jaxsam.data import augment_spec  # the names without TensorFlow

  return augment_spec.CROP_FILLS


def _autoaugment():
  from jaxsam.data import augment_spec

  return ("", *augment_spec.AUTOAUGMENT_POLICIES)


def _normalizations():
  return NORMALIZATIONS


def _wandb_modes():
  from jaxsam import writers

  return writers.WANDB_MODES


NORMALIZATIONS = ("auto", "imagenet", "inception", "caffe", "dataset")
DOMAINS: dict[str, Domain] = {
  "seed": integer(0),
  "dtype": choice(_dtypes),
  "dataset.name": NAME,
  "dataset.source": choice(_sources),
  "dataset.path": TEXT,
  "dataset.image_size": integer(0),
  "dataset.cache_dir": TEXT,
  "dataset.train_examples": integer(0),
  "dataset.label_noise": number(0, 1, high_open=True),
  "dataset.data_dir": TEXT,
  "dataset.download": BOOL,
  "dataset.train_split": NAME,
  "dataset.test_split": NAME,
  "dataset.in_memory": choice(_in_memory, fold_case=True),
  "dataset.pipeline": choice(_pipelines, fold_case=True),
  "dataset.shuffle_buffer": integer(1),
  "dataset.eval_crop_fraction": number(0, 1, low_open=True),
  "dataset.skip_bad_images": BOOL,
  "dataset.max_image_pixels": integer(0),
  "model.name": choice(_models),
  "model.num_classes": integer(0),
  "model.image_size": integer(0),
  "model.pretrained": TEXT,
  "model.freeze_bn": BOOL,
  "model.cifar_stem": BOOL,
  "model.resnet_v1": BOOL,
  "model.zero_init_residual": BOOL,
  "model.dropout_rate": RATE,
  "model.drop_connect_rate": RATE,
  "model.width": integer(0),
  "model.ghost_batch_size": integer(0),
  "model.pool": choice(_pools),
  "model.normalization": choice(_normalizations),
  "num_epochs": integer(1),
  "max_steps": integer(0),
  "label_smoothing": number(0, 1, high_open=True),
  "batch_size": integer(1),
  "eval_batch_size": integer(1),
  "optimizer.name": choice(_optimizers),
  "optimizer.learning_rate": number(0),
  "optimizer.momentum": number(0, 1, high_open=True),
  "optimizer.nesterov": BOOL,
  "optimizer.weight_decay": number(0),
  "optimizer.grad_clip_norm": number(0),
  "schedule.name": choice(_schedules),
  "schedule.warmup_epochs": number(0),
  "sam.rho": number(0),
  "sam.variant": choice(_variants),
  "sam.eta": number(0),
  "sam.alpha": number(0),
  "sam.rho_min": number(0),
  "sam.eps": number(0, low_open=True),
  "sam.sync": BOOL,
  "sam.m": integer(0),
  "sam.ascent_weight_decay": BOOL,
  "sam.every": integer(1),
  "sam.start_fraction": number(0, 1, high_open=True),
  "sam.reuse_weight": number(0),
  "sam.adaptive_decay": number(0, 1, high_open=True),
  "sam.adaptive_c_start": number(infinite=True),
  "sam.adaptive_c_end": number(infinite=True),
  "accum_steps": integer(1),
  "augment.crop_padding": integer(0),
  "augment.crop_fill": choice(_crop_fills),
  "augment.flip": BOOL,
  "augment.random_resized_crop": BOOL,
  "augment.crop_scale": pair(0, 1),
  "augment.crop_ratio": pair(0, None),
  "augment.cutout_size": integer(0),
  "augment.randaugment.num_ops": integer(0),
  "augment.randaugment.magnitude": number(0, 10),
  "augment.autoaugment": choice(_autoaugment),
  "wandb.mode": choice(_wandb_modes),
  "wandb.project": NAME,
  "wandb.entity": TEXT,
  "wandb.name": TEXT,
  "wandb.tags": TEXT,
  "wandb.group": TEXT,
  "wandb.log_checkpoints": BOOL,
  "log_every_steps": integer(1),
  "eval_every_epochs": integer(1),
  "checkpoint_every_epochs": integer(1),
  "checkpoint_keep": integer(1),
  "progress_bar": BOOL,
}


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of a ConfigDict or a nested mapping (config.json read back)."""
  items = config.items() if isinstance(config, Mapping) or hasattr(config, "items") else ()
  out = {}
  for k, v in items:
    if isinstance(v, Mapping) or hasattr(v, "to_dict"):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


@dataclasses.dataclass(frozen=True)
class Relation:
  """A check over several keys (and, where `needs_devices`, the device count)."""

  keys: tuple[str, ...]
  problem: Callable[[Mapping[str, Any], int | None], str | None]  # the line, or None when fine
  needs_devices: bool = False


def _multiple_of_devices(key: str) -> Relation:
  def problem(flat, devices):
    value = flat[key]
    if value % devices:
      return (
        f"{key}={value} is invalid; accepted: a multiple of the device count {devices} "
        f"(e.g. {devices * max(1, value // devices)})"
      )
    return None

  return Relation((key,), problem, needs_devices=True)


def _accum_divides_batch(flat, devices):
  per_device, n = flat["batch_size"] // devices, flat["accum_steps"]
  if per_device % n:
    return (
      f"accum_steps={n} is invalid; accepted: an integer >= 1 that divides the per-device "
      f"batch {per_device} (batch_size={flat['batch_size']} over {devices} devices)"
    )
  return None


def _one_policy(flat, devices):
  del devices
  policy, num_ops = flat["augment.autoaugment"], flat["augment.randaugment.num_ops"]
  if policy and num_ops > 0:
    return (
      f"augment.autoaugment={policy!r} and augment.randaugment.num_ops={num_ops} are both set; "
      "accepted: one of them (set the other to '' / 0)"
    )
  return None


RELATIONS: tuple[Relation, ...] = (
  _multiple_of_devices("batch_size"),
  _multiple_of_devices("eval_batch_size"),
  Relation(("batch_size", "accum_steps"), _accum_divides_batch, needs_devices=True),
  Relation(("augment.autoaugment", "augment.randaugment.num_ops"), _one_policy),
)


def problems(config: Any, num_devices: int | None = None) -> list[str]:
  """Every violation, one line each: key domains first, then relations whose keys are valid.

  Keys absent from the table are left alone here (a locked config has refused them already, and
  a config.json of an older jaxsam may lack some); keys absent from the config are skipped.
  """
  flat = flatten(config)
  out = []
  for key, value in flat.items():
    domain = DOMAINS.get(key)
    if domain is not None and not domain.ok(value):
      out.append(f"{key}={value!r} is invalid; accepted: {domain.accepted}")
  bad = {line.split("=", 1)[0] for line in out}
  for relation in RELATIONS:
    if any(k not in flat or k in bad for k in relation.keys):
      continue
    if relation.needs_devices and num_devices is None:
      continue
    line = relation.problem(flat, num_devices)
    if line:
      out.append(line)
  return out


def validate(config: Any, num_devices: int | None = None) -> None:
  """ConfigError with the first violation (one line) when any key is outside its domain.

  `num_devices` (the global device count) turns on the relations that need it; None skips them
  (the study plans runs without knowing the devices of the machine they run on).
  """
  found = problems(config, num_devices)
  if found:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise errors.ConfigError(found[0] + more)
