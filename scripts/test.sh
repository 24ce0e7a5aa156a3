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
# A worker per core, at most 4 (each imports torch and may start Dagster, a browser or PostgreSQL), a test file
# per worker at a time so that its module fixtures run once; FLEN_TEST_WORKERS=0 runs in this process.
# --durations: the slowest tests, for keeping the suite (and CI) short.
workers=${FLEN_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile --durations=25 "$@"
