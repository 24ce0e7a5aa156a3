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
  .venv/bin/python -m pip install -q -e '.[dev,cluster]'
  # face_recognition's metadata asks for `dlib`, which pip would compile from source; the
  # prebuilt dlib-bin (a dependency in pyproject.toml) provides the same module.
  .venv/bin/python -m pip install -q --no-deps 'face-recognition==1.3.0'
  echo "$want" > "$stamp"
fi
