#!/usr/bin/env bash
# Run the tests, on the CPU, with no network.
#   ./run_tests.sh                              lint, format, types, then every test (what CI runs)
#   ./run_tests.sh tests/test_flow.py -k loss   only pytest, with these arguments
# It runs in the active environment if that has this checkout's flux with the dev extra
# installed, else in .venv, which the first run sets up (see flux/scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")"
. flux/scripts/setup_env.sh
flux_use_env dev

if [ $# -eq 0 ]; then
    python -m ruff check flux tests
    python -m ruff format --check flux tests
    python -m mypy
fi
exec python -m pytest -q "$@"
