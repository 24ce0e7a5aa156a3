#!/usr/bin/env bash
# Creates .venv and installs FLENwheel with its test extras. Idempotent: skips pip when
# pyproject.toml has not changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.flen-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 'setuptools<81' wheel
  # torch first, pinned: on these machines 2.13.0 is a CPU build on local disk, where an open
  # range would pull a multi-GB CUDA build from PyPI. Keep a torch that is already there.
  .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q 'torch==2.13.0'
  .venv/bin/python -m pip install -q -e '.[dev]'
  # face_recognition's metadata asks for `dlib`, which pip would compile from source; the
  # prebuilt dlib-bin (a dependency in pyproject.toml) provides the same module.
  .venv/bin/python -m pip install -q --no-deps 'face-recognition==1.3.0'
  echo "$want" > "$stamp"
fi
# The review page's browser tests drive Debian's chromium through its chromedriver (selenium never
# downloads a browser or a driver here). Installed once; later runs find both and do nothing.
if [ "${FLEN_SKIP_BROWSER:-}" != 1 ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium + chromium-driver for the browser tests (apt-get)"
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
        >"$log" 2>&1; then
      tail -20 "$log" >&2; rm -f "$log"; exit 1
    fi
    rm -f "$log"
  else
    echo "setup: /usr/bin/chromium or /usr/bin/chromedriver is missing and cannot be installed here (needs root" \
         "and apt-get): install chromium and chromium-driver, or set FLEN_SKIP_BROWSER=1 to skip the browser tests" >&2
  fi
fi
