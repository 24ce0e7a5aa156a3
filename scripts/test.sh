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
# Workers: much of the suite waits on Dagster daemons and subprocesses, so several run at once (on 2 cores the CPU
# then limits it: 50 instead of 73 minutes); each starts its own servers and model processes (a few GiB at its
# peak), so free memory sets how many.
# FLEN_TEST_WORKERS=0 runs everything in this one process. Which tests share a worker: tests/conftest.py.
workers="${FLEN_TEST_WORKERS:-}"
if [ -z "$workers" ]; then
  by_memory=$(( $(awk '/MemAvailable/ {m = $2} END {print m + 0}' /proc/meminfo) / 1048576 / 5 ))
  workers=$(( by_memory > 4 ? 4 : (by_memory < 1 ? 1 : by_memory) ))
fi
# --durations: the slowest tests, for keeping the suite (and CI) short
exec .venv/bin/python -m pytest --durations=25 -n "$workers" --dist loadgroup "$@"
