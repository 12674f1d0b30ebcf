#!/usr/bin/env bash
# Creates .venv and installs janus-server into it. Usage: scripts/setup.sh [test]
# torch is pinned to the CPU build this machine kind carries (an unpinned torch pulls the CUDA stack);
# GPU users install their own torch first (any version the project's range allows) and skip this script.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==${JANUS_TORCH_VERSION:-2.13.0}"
fi
if [ "$extra" = "test" ]; then
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e .
fi
