#!/usr/bin/env bash
# Creates .venv and installs janus-server into it from the lock. Usage: scripts/setup.sh [test]
# What is installed is exactly requirements/serve.txt (or requirements/test.txt for `test`): every
# dependency pinned with hashes, so a fresh machine gets what CI tested; scripts/lock.sh refreshes it.
# torch is the one dependency outside the lock: pinned to the CPU build this machine kind carries (an
# unpinned torch pulls the CUDA stack); GPU users install their own torch first (any version the
# project's range allows) and this script keeps it.
# A second run with nothing changed returns at once: the stamp in .venv records a hash of what the
# install depends on (pyproject.toml, the lock files, this script, the torch pin); JANUS_SETUP_FORCE=1
# reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
lock="requirements/${extra:-serve}.txt"
[ "$extra" = "" ] || [ "$extra" = "test" ] || { echo "usage: scripts/setup.sh [test]" >&2; exit 2; }
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
torch_version="${JANUS_TORCH_VERSION:-2.13.0}"
key=$(cat pyproject.toml requirements/*.txt scripts/setup.sh <(echo "torch==$torch_version") | sha256sum | cut -d' ' -f1)
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
"${pip[@]}" --require-hashes -r "$lock"
"${pip[@]}" --no-deps --no-build-isolation -e .
.venv/bin/python -m pip check >/dev/null || { .venv/bin/python -m pip check >&2; exit 1; }
if [ "$extra" = "test" ]; then
  echo "$key" > .venv/.janus-setup-base  # the test lock holds everything the serve lock does
fi
echo "$key" > "$stamp"
