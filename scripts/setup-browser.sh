#!/usr/bin/env bash
# The review page's browser tests drive Debian's chromium through its chromedriver (selenium never
# downloads a browser or a driver here). Installed once; later runs find both and do nothing.
# scripts/test.sh runs this; the demo does not need a browser.
set -euo pipefail
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
