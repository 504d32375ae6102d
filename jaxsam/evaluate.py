"""Eval-only mode: restore a saved model and score it on the whole test split, into `eval.json`.

`python launch.py --mode=eval --workdir=DIR [--checkpoint=PATH]`: the config comes from
`DIR/config.json` (the run's resolved config) unless `--config` is given; the checkpoint is PATH,
else the workdir's latest. The numbers come from the same `train.evaluate_test_split` the training
loop logs, with the run's `eval_batch_size`, so they reproduce the logged test metrics of that
checkpoint.
"""

from typing import Any

import ml_collections

from jaxsam import checkpoint as ckpt_lib
from jaxsam import config_schema, parallel, steps, train, writers
from jaxsam import workdir as workdir_lib


def evaluate_checkpoint(
  config: ml_collections.ConfigDict | None, workdir: str, *, checkpoint: str | None = None
) -> dict[str, Any]:
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
    config = workdir_lib.read_config(workdir)
  # Before anything is written: every key's domain, then the workdir's lock (one writer at a time;
  # eval.json must not land in a folder a training run is writing).
  config_schema.validate(config)
  workdir_lib.check_not_held(workdir)
  with train.hold_workdir(workdir, "an eval (launch.py --mode=eval)"):
    return _evaluate(config, workdir, checkpoint)


def _evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None) -> dict:
  path = workdir_lib.resolve_checkpoint(workdir, checkpoint)
  setup = train.build_setup(config, workdir=workdir)
  tx, _ = train.setup_optimizer(config, setup)
  state, meta = ckpt_lib.restore(path, train.abstract_train_state(config, setup, tx))
  eval_step = steps.compile_eval_step(setup.mesh, model=setup.model, cfg=setup.step_config)
  metrics = train.evaluate_test_split(eval_step, state, setup, config.eval_batch_size)
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
    out = workdir_lib.RunDir(workdir).eval
    writers.write_json(out, result)
    print(
      f"jaxsam eval: {path} (step {result['step']}): loss {result['loss']:.4f}, top-1 "
      f"{100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}% over "
      f"{result['count']} test images -> {out}",
      flush=True,
    )
  return result
