#!/usr/bin/env bash
# Set up, then run the main job on the embedded sample character (`flen demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/flen demo "$@"
