#!/usr/bin/env bash
# The cluster tests start a real PostgreSQL from Debian's package (initdb + pg_ctl in a temp folder;
# as root they run as the package's `postgres` user) and moto's S3 server (a Python package,
# installed by setup.sh). Installed once; later runs find PostgreSQL and do nothing.
# scripts/test.sh runs this; the demo does not need it.
set -euo pipefail
if [ "${FLEN_SKIP_SERVERS:-}" != 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing postgresql for the cluster tests (apt-get)"
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } \
        >"$log" 2>&1; then
      tail -20 "$log" >&2; rm -f "$log"; exit 1
    fi
    rm -f "$log"
  else
    echo "setup: PostgreSQL (initdb, pg_ctl) is missing and cannot be installed here (needs root and apt-get):" \
         "install Debian's postgresql package, or set FLEN_SKIP_SERVERS=1 to skip the cluster tests" >&2
  fi
fi
