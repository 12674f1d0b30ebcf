#!/usr/bin/env bash
# Everything one GPU loan should return, in priority order, inside one time budget:
#   bench/gpu/all.sh                 # CUDA, bf16: ~8 minutes (JANUS_GPU_BUDGET=480 seconds in all)
#   bench/gpu/all.sh --cpu           # the same parts on CPU with tiny shapes, in about a minute
#   JANUS_GPU_PARTS=rest,flow bench/gpu/all.sh
# Parts (each under its own `timeout`, its output in $OUT/<part>.txt as it goes; a part that fails or runs out
# of time leaves what it printed and the next part still runs):
#   env       versions, nvidia-smi, the commit, tests/unit/test_step_graphs.py (a CUDA graph captured and replayed)
#   check     bench/gpu/run.sh: 1B and 7B shapes, generation at 1/16/64, understanding, transformers, the
#             greedy check, --compile (its gpu.md and gpu.json land in $OUT too)
#   rest      janus-server serve on a random 1B checkpoint written on the device: 16 /v1/generate and 16
#             /v1/understand together over HTTP (200s, images/s, p95), 16 greedy questions against transformers
#   flow      bench/bench_flow.py: JanusFlow's engine at c=8 against DeepSeek's loop one request at a time
#   previews  bench/bench_previews.py on the 1B checkpoint: images/s with previews off and on
# Wheels in bench/gpu/wheels or $JANUS_BENCH_WHEELS (bench/gpu/wheels.sh fetches them; carry that folder) go into a private directory
# first on PYTHONPATH. Without $OUT the files go to ./gpu-out.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$(command -v python3 || command -v python)}"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
cpu=0
[[ "${1:-}" == "--cpu" ]] && cpu=1
parts="${JANUS_GPU_PARTS:-env,check,rest,flow,previews}"
budget="${JANUS_GPU_BUDGET:-$([[ $cpu == 1 ]] && echo 300 || echo 480)}"
started=$SECONDS

wheels="${JANUS_BENCH_WHEELS:-$here/wheels}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  deps="${JANUS_BENCH_DEPS:-${TMPDIR:-/tmp}/janus-bench-deps}"
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$deps" "$wheels"/*.whl \
    || echo "all.sh: installing the carried wheels failed" >&2
  export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}" JANUS_BENCH_DEPS_READY=1  # run.sh: installed already
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$root"

if [[ $cpu == 1 ]]; then
  dev=cpu dtype=float32 ckpt_shape=tiny levels=1,4 questions=4 flow=(--shape tiny --concurrency 4 --steps 3)
  previews_args="--requests 4 --concurrency 2 --repeats 1"
else
  dev=cuda dtype=bfloat16 ckpt_shape=1b levels=1,16 questions=16 flow=(--shape 1.3b --concurrency 8 --steps 30)
  previews_args="--requests 32 --concurrency 16 --repeats 1"
fi
ckpt="${JANUS_GPU_CKPT:-${TMPDIR:-/tmp}/janus-gpu-$ckpt_shape}"
export python ckpt ckpt_shape dev dtype levels questions previews_args here out root

# part NAME COMMAND...: run COMMAND with NAME's share of what is left of the budget (the shares of NAME and the
# parts after it that will run, so time a part leaves unused goes to the later ones)
declare -A share=([env]=3 [check]=46 [rest]=25 [flow]=17 [previews]=9)
order=(env check rest flow previews)
part() {
  local name=$1
  shift
  [[ ",$parts," == *",$name,"* ]] || return 0
  local left=$((budget - (SECONDS - started))) rest_shares=0 seen=0 p
  for p in "${order[@]}"; do
    [[ $p == "$name" ]] && seen=1
    ((seen)) && [[ ",$parts," == *",$p,"* ]] && rest_shares=$((rest_shares + share[$p]))
  done
  local secs=$((left * share[$name] / rest_shares))
  ((secs < 15 && left >= 15)) && secs=15
  if ((secs < 10)); then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$out/summary.txt"
    return 0
  fi
  echo "== $name: up to ${secs}s: $*" | tee -a "$out/summary.txt"
  local t0=$SECONDS
  export PART_SECONDS=$secs
  # (a shell function runs through `bash -c`, exported with the variables it reads, so timeout can run it)
  if [[ $(type -t "$1") == function ]]; then
    timeout -s INT -k 20 "$secs" bash -c "$*" > "$out/$name.txt" 2>&1
  else
    timeout -s INT -k 20 "$secs" "$@" > "$out/$name.txt" 2>&1
  fi
  local rc=$?
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="out of time"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="failed (exit $rc)"
  echo "== $name: $verdict after $((SECONDS - t0))s" | tee -a "$out/summary.txt"
}

env_report() {
  date -u
  git -C "$root" log -1 --format='commit %h %s' 2>/dev/null || true
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$python" - <<'EOF'
import importlib.metadata as md
import sys

import torch

print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
for name in ("transformers", "tokenizers", "huggingface-hub", "diffusers", "fastapi", "uvicorn", "pydantic",
             "grpcio", "protobuf", "triton", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
EOF
  # a first CUDA graph captured and replayed, seconds before the check depends on it
  "$python" -m pytest -q -p no:cacheprovider --noconftest "$root/tests/unit/test_step_graphs.py" 2>&1 | tail -5
}

# The checkpoint is built on the device (seconds on a GPU), once, by whichever of rest and previews runs first.
checkpoint() {
  "$python" -m bench.gpu.model "$ckpt" --shape $ckpt_shape --device $dev --dtype $dtype
}
rest() {
  checkpoint && "$python" bench/bench_rest.py --model-dir "$ckpt" --device $dev --dtype $dtype \
    --concurrency $levels --check $questions --ref-requests 1 --max-new-tokens 64 --prefix-trials 2
}
previews() {
  checkpoint && "$python" bench/bench_previews.py --model "$ckpt" --device $dev $previews_args
}
# run.sh plans its sections to its own --budget: what this part gets, less a margin for its set-up
gpu_check() {
  if [[ $dev == cpu ]]; then
    bash "$here/run.sh" --device cpu --shape tiny --out "$out"
  else
    bash "$here/run.sh" --budget $((PART_SECONDS > 40 ? PART_SECONDS - 30 : 10)) --out "$out"
  fi
}
export -f env_report checkpoint rest previews gpu_check

: > "$out/summary.txt"
part env env_report
part check gpu_check
part rest rest
part flow "$python" bench/bench_flow.py --device $dev --dtype $dtype "${flow[@]}"
part previews previews
echo "== all: $((SECONDS - started))s of ${budget}s" | tee -a "$out/summary.txt"
