"""Eval-only mode: restore a saved model and score it on the whole test split, into `eval.json`.

`python launch.py --mode=eval --workdir=DIR [--checkpoint=PATH]`: the config comes from
`DIR/config.json` (the run's resolved config) unless `--config` is given; the checkpoint is PATH,
else the workdir's latest. The numbers come from `evaluate_test_split`, which the training loop
logs too, with the run's `eval_batch_size`, so they reproduce the logged test metrics of that
checkpoint. `evaluate_train_fit` is the end-of-run fit of the train labels.
"""

from typing import Any

import jax
import ml_collections
import numpy as np

from jaxsam import checkpoint as ckpt_lib
from jaxsam import config_schema, losses, parallel, run_setup, steps, writers
from jaxsam import state as state_lib
from jaxsam import workdir as workdir_lib
from jaxsam.data import pipeline, sources, train_split


def summed_over_batches(eval_step, state, setup: run_setup.Setup, batches) -> dict[str, np.ndarray]:
  """`eval_step`'s masked sums over `batches` (this process's slices of global batches), totalled
  on the devices, one program per batch, and fetched once at the end."""
  totals = parallel.replicate(losses.zero_eval_sums(setup.num_classes), setup.mesh)
  for batch in batches:
    totals = eval_step(state, parallel.shard_batch(batch, setup.mesh), totals)
  return parallel.fetch(totals)


def evaluate_test_split(
  eval_step, state: state_lib.TrainState, setup: run_setup.Setup, global_batch: int
) -> dict:
  """Loss, top-1, top-5 and per-class accuracy over the whole test split, each example once."""
  batches = setup.data.test_batches(
    global_batch=global_batch,
    size=setup.step_config.image_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  totals = summed_over_batches(eval_step, state, setup, batches)
  count = float(totals["count"])
  return {
    "test/loss": float(totals["loss"]) / count,
    "test/accuracy": float(totals["correct"]) / count,
    "test/top5": float(totals["correct_top5"]) / count,
    "test/count": int(count),
    "per_class_accuracy": (totals["class_correct"] / np.maximum(totals["class_count"], 1)).tolist(),
  }


def _split_accuracy(
  eval_step, state, setup: run_setup.Setup, split: sources.Split, global_batch: int
):
  batches = pipeline.eval_batches(
    split,
    global_batch=global_batch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  totals = summed_over_batches(eval_step, state, setup, batches)
  return float(totals["correct"]) / max(float(totals["count"]), 1.0)


def evaluate_train_fit(eval_step, state, setup: run_setup.Setup, config, global_batch: int) -> dict:
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
  pipeline.hide_gpus_from_tf()
  if config is None:
    config = workdir_lib.read_config(workdir)
  # Before anything is written: every key's domain, then the workdir's lock (one writer at a time;
  # eval.json must not land in a folder a training run is writing).
  config_schema.validate(config)
  workdir_lib.check_not_held(workdir)
  with run_setup.hold_workdir(workdir, "an eval (launch.py --mode=eval)"):
    return _evaluate(config, workdir, checkpoint)


def _evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None) -> dict:
  path = workdir_lib.resolve_checkpoint(workdir, checkpoint)
  setup = run_setup.build_setup(config, workdir=workdir)
  tx, _ = run_setup.setup_optimizer(config, setup)
  state, meta = ckpt_lib.restore(path, run_setup.abstract_state(setup, tx))
  eval_step = steps.compile_eval_step(setup.mesh, model=setup.model, cfg=setup.step_config)
  metrics = evaluate_test_split(eval_step, state, setup, config.eval_batch_size)
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
