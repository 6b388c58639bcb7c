#!/usr/bin/env bash
# Create ./.venv (once) and install uncurl-hf into it with the pinned CPU torch.
# Sourced by run.sh and scripts/test.sh so both README commands work on a fresh clone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UNCURL_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.uncurl-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  python -m pip install --quiet --upgrade pip
  # torch is pinned here and in pyproject.toml: an unpinned torch pulls a multi-GB CUDA build.
  python -m pip install --quiet "torch==2.13.0" -e "$ROOT[test]"
  touch "$STAMP"
fi
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1
