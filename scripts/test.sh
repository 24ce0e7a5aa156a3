#!/usr/bin/env bash
# Set up, then run the test suite (GPU-marked tests skip themselves without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
