#!/usr/bin/env bash
# README main command: set up, prune the embedded tiny-switch-8 x2 on sentiment and print the table, then the
# task-specificity lines of the embedded decoder (uncurl demo-run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
uncurl demo-run "$@"
