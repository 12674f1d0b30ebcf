#!/usr/bin/env bash
# Wheels a borrowed GPU box lacks, for its python, at the versions of requirements/serve.txt:
#   bench/gpu/wheels.sh [DIR] [PYTHON_VERSION]        # default bench/gpu/wheels (git-ignored), 3.12
# The box (this project's device machines: Python 3.12, torch, numpy, Pillow, safetensors, tokenizers, grpcio,
# httpx, prometheus-client, uvloop preinstalled; no network) gets the server's own dependencies and the
# transformers we test against (with kernels, which its model loading requires). bench/gpu/run.sh and all.sh install DIR/*.whl into a private directory put first
# on PYTHONPATH; nothing of the box's site-packages changes. torch and numpy are never carried (the box's CUDA
# build and the numpy it was built with stay).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="${1:-$root/bench/gpu/wheels}"
pyver="${2:-3.12}"
names=(
  transformers kernels tomlkit huggingface-hub httpx2 httpcore2 truststore idna click regex typing-extensions anyio
  fastapi starlette annotated-doc pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
  annotated-types opentelemetry-api importlib-metadata zipp uvicorn h11 python-multipart redis
  grpcio grpcio-health-checking grpcio-reflection protobuf diffusers
)
pins=()
for name in "${names[@]}"; do
  # the first `name==version` line of the lock (a marker-split package has one per Python; both are 3.11+)
  pin="$(grep -m1 -iE "^${name}==[^ ;]+" "$root/requirements/serve.txt" | sed -E 's/[ ;\\].*//')" || true
  [[ -n "$pin" ]] || { echo "wheels.sh: $name is not in requirements/serve.txt" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p "$dest"
rm -f "$dest"/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dest" "${pins[@]}"
du -ch "$dest"/*.whl | tail -1
