"""Eval-only mode: restore a saved model and score it on the whole test split, into `eval.json`.

`python launch.py --mode=eval --workdir=DIR [--checkpoint=PATH]`: the config comes from
`DIR/config.json` (the run's resolved config) unless `--config` is given; the checkpoint is PATH,
else the workdir's latest. The numbers come from the same `train.evaluate` the training loop logs,
with the run's `eval_batch_size`, so they reproduce the logged test metrics of that checkpoint.
"""

import json
import os
from typing import Any

import ml_collections

from jaxsam import checkpoint as ckpt_lib
from jaxsam import errors, parallel, steps, train, writers

EVAL_FILE = "eval.json"


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in `<workdir>/config.json`."""
  path = os.path.join(workdir, train.CONFIG_FILE)
  if not os.path.isfile(path):
    raise errors.ConfigError(
        f"--workdir={workdir} has no {train.CONFIG_FILE}; give the folder of a training run or "
        "pass --config")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise errors.ConfigError(f"{path} cannot be read as JSON ({e}); pass --config") from e


def resolve_checkpoint(workdir: str, checkpoint: str | None) -> str:
  """The checkpoint folder to evaluate: `checkpoint` if given, else the workdir's newest."""
  if checkpoint:
    if not os.path.isdir(checkpoint):
      raise errors.CheckpointError(
          f"--checkpoint={checkpoint} is not a folder; pass a step folder such as "
          f"{os.path.join(workdir, ckpt_lib.LAST_DIR, '<step>')}")
    return os.path.abspath(checkpoint)
  last = os.path.join(workdir, ckpt_lib.LAST_DIR)
  found = sorted((int(n) for n in os.listdir(last) if n.isdigit()), reverse=True) \
      if os.path.isdir(last) else []
  if not found:
    raise errors.CheckpointError(
        f"--workdir={workdir} holds no checkpoint in {ckpt_lib.LAST_DIR}/; train first or pass "
        "--checkpoint=PATH")
  return os.path.abspath(os.path.join(last, str(found[0])))


def evaluate_checkpoint(config: ml_collections.ConfigDict | None, workdir: str, *,
                        checkpoint: str | None = None) -> dict[str, Any]:
  """Scores one checkpoint on the test split; writes and returns the `eval.json` record.

  Args:
    config: the run's config; None reads `<workdir>/config.json`.
    workdir: the training run's folder; `eval.json` is written there.
    checkpoint: a checkpoint step folder (`<workdir>/checkpoints/<step>`, `<workdir>/best/<step>`);
      None takes the newest in `<workdir>/checkpoints/`.

  Returns: {"checkpoint", "step", "epoch", "loss", "top1", "top5", "count",
    "per_class_accuracy"}; accuracies are fractions in [0, 1].
  """
  from jaxsam.data import pipeline  # TF import: only once we know there is work to do
  pipeline.hide_gpus_from_tf()
  if config is None:
    config = load_run_config(workdir)
  path = resolve_checkpoint(workdir, checkpoint)
  setup = train.build_setup(config)
  tx, _ = train.make_optimizer(config, setup)
  state, meta = ckpt_lib.restore(path, train.abstract_train_state(config, setup, tx))
  eval_step = steps.compile_eval_step(setup.mesh, model=setup.model, cfg=setup.step_config)
  metrics = train.evaluate(eval_step, state, setup, config.eval_batch_size)
  result = {
      "checkpoint": path,
      "step": int(parallel.fetch(state.step)),
      "epoch": meta.get("epoch"),
      "loss": metrics["test/loss"],
      "top1": metrics["test/accuracy"],
      "top5": metrics["test/top5"],
      "count": metrics["test/count"],
      "per_class_accuracy": metrics["per_class_accuracy"],
  }
  if parallel.is_main_process():
    out = os.path.join(workdir, EVAL_FILE)
    writers.write_json(out, result)
    print(f"jaxsam eval: {path} (step {result['step']}): loss {result['loss']:.4f}, top-1 "
          f"{100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}% over "
          f"{result['count']} test images -> {out}", flush=True)
  return result
