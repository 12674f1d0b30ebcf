#!/usr/bin/env bash
# The GPU check in one command: bench/gpu/run.sh [--device cpu --shape tiny] [--only gen] [--shapes 1b] ...
# Prints one table (and writes $OUT/gpu.md + $OUT/gpu.json when OUT is set). Needs python with torch,
# transformers, numpy, Pillow, safetensors and tokenizers; nothing of the server. Wheels placed in
# bench/gpu/wheels/ (e.g. a newer transformers for an offline box) go into a private directory put
# first on PYTHONPATH; the box's own site-packages are never changed. See docs/benchmarks.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$(command -v python3 || command -v python)}"
if [[ -z "${JANUS_BENCH_DEPS_READY:-}" ]] && compgen -G "$here/wheels/*.whl" >/dev/null; then
  deps="${JANUS_BENCH_DEPS:-${TMPDIR:-/tmp}/janus-bench-deps}"
  "$python" -m pip install --quiet --no-index --no-deps --upgrade --target "$deps" "$here"/wheels/*.whl
  export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
fi
# The repository first, so its janus_core is the one measured even where another copy is installed.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
cd "$root"
exec "$python" -m bench.gpu.check "$@"
