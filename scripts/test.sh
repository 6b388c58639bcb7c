#!/usr/bin/env bash
# README test command: set up, then run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
bash "$ROOT/scripts/install_browser.sh"  # Debian chromium for tests/test_space.py (no-op when present)
cd "$ROOT"
python -m pytest "$@"
