#!/usr/bin/env bash
# Set up (with the browser the review page's tests drive), then run the test suite.
# GPU-marked tests skip themselves without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-browser.sh
exec .venv/bin/python -m pytest "$@"
