#!/usr/bin/env bash
# Make a headless-capable Chromium available for the browser tests (tests/test_space.py).
# The tests drive Debian's own `chromium` through Playwright (never `playwright install`, which downloads a
# browser build from outside the package registries). Idempotent: does nothing when `chromium` is already on
# PATH. Needs root (as the developers' machines and CI are) and Debian's package index.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: chromium is missing and cannot be installed here (needs root and apt-get);" \
       "browser tests will be skipped" >&2
  exit 0
fi
echo "install_browser.sh: installing Debian chromium for the browser tests (once)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null 2>&1
