#!/usr/bin/env bash
# Train flux with torchrun.
#   ./run_train.sh                                   debug flavor, shapes, 1 process (CPU if no GPU)
#   NGPU=8 CONFIG_FILE=flux/train_configs/flux_schnell_model.toml ./run_train.sh
#   ./run_train.sh --training.steps 4 --parallelism.data_parallel_shard_degree 2
# NGPU: processes (default: the visible GPUs, else 1). CONFIG_FILE: the TOML (default: the
# debug config). LOG_RANK: ranks whose output is shown (default 0). MAX_RESTARTS: how often
# torchrun restarts the processes from the last checkpoint when one dies (default 0). Other
# arguments go to the trainer.
# SIGTERM or SIGUSR1 stops the run after the current step with a checkpoint; the script then
# exits with 75 (run it again to resume).
# It runs in the active environment if that has this checkout's flux installed, else in .venv,
# which the first run sets up (TORCH_SPEC: pip's arguments for torch; see
# flux/scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")"
. flux/scripts/setup_env.sh
flux_use_env

if [ -z "${NGPU:-}" ]; then
    NGPU=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
case "${NGPU}" in  # a count torchrun would take badly
    *[!0-9]* | "" | 0 | 0*)
        echo "flux: error: NGPU=${NGPU}: give the number of processes to start, 1 or more" >&2
        exit 2 ;;
esac
CONFIG_FILE=${CONFIG_FILE:-"flux/train_configs/debug_model.toml"}
LOG_RANK=${LOG_RANK:-0}

# Refuse a bad configuration in one line before torchrun starts (it would add its own
# traceback to the trainer's one-line error).
case " $* " in
    *" --help "* | *" -h "*) ;;
    *) WORLD_SIZE="${NGPU}" python -m flux.config --job.config_file "${CONFIG_FILE}" "$@" ;;
esac

FLUX_REQUEUE_FILE=$(mktemp)
export FLUX_REQUEUE_FILE
trap 'rm -f "${FLUX_REQUEUE_FILE}"' EXIT

torchrun --nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
    --max-restarts "${MAX_RESTARTS:-0}" --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" \
    --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
    -m flux.train --job.config_file "${CONFIG_FILE}" "$@" &
TORCHRUN=$!
# Pass a stop signal on to torchrun, which passes it to every process; then wait for them.
trap 'kill -s TERM ${TORCHRUN} 2>/dev/null || true' TERM
trap 'kill -s USR1 ${TORCHRUN} 2>/dev/null || true' USR1
status=0
while true; do
    wait "${TORCHRUN}" && status=0 || status=$?
    kill -0 "${TORCHRUN}" 2>/dev/null || break  # wait was cut short by a signal: wait again
done
if [ -s "${FLUX_REQUEUE_FILE}" ]; then
    echo "flux: $(cat "${FLUX_REQUEUE_FILE}"): run the same command again to resume" >&2
    exit 75
fi
exit "${status}"
