#!/usr/bin/env bash
# Set up (with the browser the review page's tests drive and the PostgreSQL the cluster tests start),
# then run the test suite.
# GPU-marked tests skip themselves without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-browser.sh
scripts/setup-servers.sh
.venv/bin/ruff check --quiet .  # the lint rules in pyproject.toml: a finding fails the run like a test
# --durations: the slowest tests, for keeping the suite (and CI) short
exec .venv/bin/python -m pytest --durations=25 "$@"
