#!/usr/bin/env bash
# Train flux on several nodes under SLURM: one torchrun per node, rendezvous on the first.
#
#   sbatch --nodes 4 flux/scripts/slurm_train.sh                       (8 GPUs per node)
#   CONFIG_FILE=flux/train_configs/flux_dev_model.toml sbatch --nodes 16 flux/scripts/slurm_train.sh \
#       --parallelism.data_parallel_replicate_degree 16
#
# Submit from the repository root with the virtual environment active (sbatch passes the
# environment on). Arguments after the script go to the trainer; the TOML's
# data_parallel_shard_degree = -1 fills the world (FSDP across all GPUs); for HSDP set
# data_parallel_replicate_degree to the node count, as above. Checkpoints go to
# <dump_folder>/checkpoint, so a resubmitted job resumes from the last one.
#
# Preemption and time limits: SLURM sends SIGUSR1 (--signal below, 5 minutes ahead) or
# SIGTERM; every rank finishes its step, a checkpoint is written, and the job requeues
# itself (scontrol requeue) to resume from it. A process that dies is restarted from the
# last checkpoint up to MAX_RESTARTS times (default 3) within the job.
#SBATCH --job-name=flux
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"  # sbatch runs a copy of this script; work where it was submitted
CONFIG_FILE=${CONFIG_FILE:-"flux/train_configs/flux_schnell_model.toml"}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
PORT=${PORT:-29500}

# Refuse a bad configuration once, in one line, before any node starts.
WORLD_SIZE=$((SLURM_JOB_NUM_NODES * GPUS_PER_NODE)) python -m flux.config \
    --job.config_file "${CONFIG_FILE}" "$@"

# Rank 0 writes this file when it stopped for a signal after saving a checkpoint.
export FLUX_REQUEUE_FILE="${FLUX_REQUEUE_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.flux-requeue-${SLURM_JOB_ID}}"
rm -f "${FLUX_REQUEUE_FILE}"
# The batch shell gets SIGTERM too: note it and wait for the job step instead of dying.
trap 'echo "flux: got SIGTERM, waiting for the checkpoint"' TERM

status=0
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "${SLURM_JOB_NUM_NODES}" --nproc_per_node "${GPUS_PER_NODE}" \
    --rdzv_id "${SLURM_JOB_ID}" --rdzv_backend c10d --rdzv_endpoint "${HEAD_NODE}:${PORT}" \
    --max-restarts "${MAX_RESTARTS:-3}" --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" \
    --local-ranks-filter 0 --role rank --tee 3 \
    -m flux.train --job.config_file "${CONFIG_FILE}" "$@" || status=$?

if [ -s "${FLUX_REQUEUE_FILE}" ]; then
    echo "flux: $(cat "${FLUX_REQUEUE_FILE}"): requeueing job ${SLURM_JOB_ID}"
    rm -f "${FLUX_REQUEUE_FILE}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
exit "${status}"
