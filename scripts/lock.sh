#!/usr/bin/env bash
# Refreshes the lock (requirements/test.txt, serve.txt, api.txt) to the newest releases that
# pyproject.toml's ranges (and requirements/api.in's and tracing.in's) allow, then reinstalls .venv from
# it and runs the whole test suite:
#   scripts/lock.sh                 # upgrade everything, then test
#   scripts/lock.sh --no-upgrade    # re-resolve after editing pyproject.toml, keeping other pins
#   JANUS_LOCK_ONLY=1 scripts/lock.sh   # write the lock, do not test
# Commit the three files only when the tests pass: upgrading is a deliberate step, never a side effect
# of installing. The lock pins every dependency with hashes except torch, which is installed first,
# on its own (scripts/setup.sh: the CPU wheel; your CUDA build on a GPU machine; the Dockerfile: per
# target): the lock is resolved against the CPU wheel so that torch's own dependencies are pinned
# and none of the CUDA-only ones are. The lock is universal: any Python >= 3.11, any platform.
set -euo pipefail
cd "$(dirname "$0")/.."
upgrade=(--upgrade)
[ "${1:-}" = "--no-upgrade" ] && upgrade=()
uv_version=0.13.9
torch_version="${JANUS_TORCH_VERSION:-2.13.0}"
torch_links="${JANUS_TORCH_FIND_LINKS:-}"
if [ -z "$torch_links" ]; then
  if [ -d /opt/wheels ]; then torch_links=/opt/wheels; else torch_links=https://download.pytorch.org/whl/cpu/torch/; fi
fi
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
tools=.cache/lock-tools
if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$uv_version" ]; then
  "$python" -m venv "$tools"
  "$tools/bin/python" -m pip install -q --disable-pip-version-check "uv==$uv_version"
fi
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "torch==$torch_version+cpu" > "$constraint"
compile=("$tools/bin/uv" pip compile --quiet --universal --python-version 3.11 --generate-hashes
         --no-emit-package torch --find-links "$torch_links" --constraint "$constraint"
         --custom-compile-command "scripts/lock.sh" "${upgrade[@]}")
# test first; serve and api are resolved within it, so no two files pin a package differently
"${compile[@]}" pyproject.toml requirements/build.in --extra test -o requirements/test.txt
# both images carry the tracing extra, so their operators can pass --otlp-traces-endpoint
"${compile[@]}" pyproject.toml requirements/build.in --extra tracing --constraint requirements/test.txt -o requirements/serve.txt
# the api-only image (Dockerfile target `api`): no model runtime, so no torch at all
"${compile[@]}" requirements/tracing.in requirements/api.in requirements/build.in --constraint requirements/test.txt -o requirements/api.txt
echo "lock written: requirements/test.txt, requirements/serve.txt, requirements/api.txt (torch $torch_version installed separately)"
[ -n "${JANUS_LOCK_ONLY:-}" ] && exit 0
JANUS_SETUP_FORCE=1 exec scripts/test.sh
