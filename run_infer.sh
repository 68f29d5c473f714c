#!/usr/bin/env bash
# Sample images from a trained model (see flux/scripts/infer.py for every option):
#   ./run_infer.sh --checkpoint outputs/checkpoint/step-30 --prompts "a large red circle at the center on a white background"
set -euo pipefail
exec python -m flux.scripts.infer "$@"
