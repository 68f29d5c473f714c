#!/usr/bin/env bash
# Sample images from a trained model (see flux/scripts/infer.py for every option):
#   ./run_infer.sh --checkpoint outputs/checkpoint/step-30 --prompts "a large red circle at the center on a white background"
# It runs in the environment run_train.sh uses (see flux/scripts/setup_env.sh); paths are
# relative to where it is run from.
set -euo pipefail
. "$(dirname "$0")/flux/scripts/setup_env.sh"
flux_use_env
exec python -m flux.scripts.infer "$@"
