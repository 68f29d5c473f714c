#!/usr/bin/env bash
# Train flux with torchrun.
#   ./run_train.sh                                   debug flavor, shapes, 1 process (CPU if no GPU)
#   NGPU=8 CONFIG_FILE=flux/train_configs/flux_schnell_model.toml ./run_train.sh
#   ./run_train.sh --training.steps 4 --parallelism.data_parallel_shard_degree 2
# NGPU: processes (default: the visible GPUs, else 1). CONFIG_FILE: the TOML (default: the
# debug config). LOG_RANK: ranks whose output is shown (default 0). Other arguments go to
# the trainer.
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${NGPU:-}" ]; then
    NGPU=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
CONFIG_FILE=${CONFIG_FILE:-"flux/train_configs/debug_model.toml"}
LOG_RANK=${LOG_RANK:-0}

# Refuse a bad configuration in one line before torchrun starts (it would add its own
# traceback to the trainer's one-line error).
case " $* " in
    *" --help "* | *" -h "*) ;;
    *) WORLD_SIZE="${NGPU}" python -m flux.config --job.config_file "${CONFIG_FILE}" "$@" ;;
esac

exec torchrun --nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
    --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
    -m flux.train --job.config_file "${CONFIG_FILE}" "$@"
