#!/usr/bin/env bash
# Creates .venv and installs janus-server into it. Usage: scripts/setup.sh [test]
# torch is pinned to the CPU build this machine kind carries (an unpinned torch pulls the CUDA stack);
# GPU users install their own torch first (any version the project's range allows) and skip this script.
# A second run with nothing changed returns at once: the stamp in .venv records a hash of what the
# install depends on (pyproject.toml, this script, the torch pin); JANUS_SETUP_FORCE=1 reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
torch_version="${JANUS_TORCH_VERSION:-2.13.0}"
key=$(cat pyproject.toml scripts/setup.sh <(echo "torch==$torch_version") | sha256sum | cut -d' ' -f1)
stamp=".venv/.janus-setup-${extra:-base}"
if [ -z "${JANUS_SETUP_FORCE:-}" ] && [ -x .venv/bin/janus-server ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==$torch_version"
fi
if [ "$extra" = "test" ]; then
  "${pip[@]}" -e ".[test]"
  echo "$key" > .venv/.janus-setup-base  # the test install holds everything the plain one does
else
  "${pip[@]}" -e .
fi
echo "$key" > "$stamp"
