#!/bin/bash
# jaxsam on N nodes x G GPUs under SLURM: one process per node, each driving its node's G GPUs;
# jax.distributed is initialised from SLURM's variables (jaxsam/distributed.py), the global batch
# (--config.batch_size) is split over all N*G GPUs.
#
#   sbatch --nodes=2 --gpus-per-node=4 scripts/slurm.sh configs/quickstart.py [--config.KEY=V ...]
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

echo "jaxsam: ${SLURM_JOB_NUM_NODES} node(s) x ${SLURM_GPUS_PER_NODE:-?} GPU(s), workdir ${WORKDIR}"
# --kill-on-bad-exit: one failed process ends the others instead of leaving them in a collective.
srun --kill-on-bad-exit=1 "${PYTHON}" launch.py --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
