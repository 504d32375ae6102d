#!/bin/bash
# jaxsam on N nodes x G GPUs under SLURM: one process per node, each driving its node's G GPUs;
# jax.distributed is initialised from SLURM's variables (jaxsam/distributed.py), the global batch
# (--config.batch_size) is split over all N*G GPUs. Any config runs unchanged, the streamed
# ImageNet and Flowers-102 recipes included; submit from the jaxsam checkout (shared by the nodes):
#
#   sbatch --nodes=2 --gpus-per-node=4 scripts/slurm.sh configs/quickstart.py [--config.KEY=V ...]
#   TFDS_DATA_DIR=/shared/tfds sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=96 \
#       scripts/slurm.sh configs/imagenet_resnet50_sam.py
#   sbatch --nodes=2 --gpus-per-node=4 scripts/slurm.sh configs/finetune_flowers102_sam.py
#
# Streamed datasets: every process reads its own shard of the tfds record files, so TFDS_DATA_DIR
# (or --config.dataset.data_dir) must be a folder every node reads (srun passes the environment
# on). A tfds set that is downloaded on first use (Flowers-102) is prepared by process 0 alone
# while the others wait; ImageNet must be prepared beforehand (configs/imagenet_resnet50_sam.py).
# The input decodes JPEGs on the CPU: give each task the node's cores (--cpus-per-task); how many
# a GPU needs is in the README (Measured: streamed input).
#
# The workdir is runs/<config>-<job id>, so a requeued job (preemption, node failure) resumes from
# its last checkpoint. SLURM sends SIGTERM 120 s before the time limit: every process agrees on one
# step, saves it and exits 0; resubmit with WORKDIR=<that folder> to continue.
# One process per GPU also works: --ntasks-per-node=G (each process then takes the GPU at its
# SLURM_LOCALID).
#SBATCH --job-name=jaxsam
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch [--nodes=N --gpus-per-node=G] scripts/slurm.sh CONFIG [--config.KEY=V ...]}
shift
WORKDIR=${WORKDIR:-runs/$(basename "$CONFIG" .py)-${SLURM_JOB_ID}}
PYTHON=${PYTHON:-python}
# sbatch runs a copy of this script from its spool folder, in the folder it was submitted from.
if [[ ! -f launch.py ]]; then
  echo "error: no launch.py in ${PWD}; submit from the jaxsam checkout" >&2
  exit 2
fi

echo "jaxsam: ${SLURM_JOB_NUM_NODES} node(s) x ${SLURM_GPUS_PER_NODE:-?} GPU(s), workdir ${WORKDIR}"
# --kill-on-bad-exit: one failed process ends the others instead of leaving them in a collective.
srun --kill-on-bad-exit=1 "${PYTHON}" launch.py --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
