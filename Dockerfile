# syntax=docker/dockerfile:1
#
# janus-server images. Three final targets:
#
#   docker build --target cuda -t janus-server:0.1.0 .        # NVIDIA GPUs (last stage: the default)
#   docker build --target cpu  -t janus-server:0.1.0-cpu .    # CPU-only try-out image
#   docker build --target api  -t janus-server-api:0.1.0 .    # `janus-server api` alone: no torch, no model
#
# All run `janus-server` as a non-root user; every CLI flag can be set with an env var JANUS_<FLAG>
# (JANUS_MODEL, JANUS_QUEUE, JANUS_DEVICE, JANUS_PORT, JANUS_GRPC_PORT, JANUS_API_KEY, ...), so the
# default command of cuda and cpu is just `serve` and `docker run -e JANUS_MODEL=... janus-server:0.1.0`
# works; the api image's is `api` (set JANUS_QUEUE=redis://...: its workers run from one of the others).
# Model weights are downloaded into HF_HOME=/models, a volume: mount a persistent one.
#
# Layer order is chosen for the build cache: torch (GBs, changes rarely), then the locked dependencies
# (requirements/serve.txt: every package pinned with its hashes, the same lock CI tests; torch is the
# one package outside it, installed per target), then our own source (changes on every commit). The api
# target installs requirements/api.txt instead: the same pins without the model runtime.
# Base images are pinned by version; bump them deliberately, like the lock (scripts/lock.sh).

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
# The CUDA target uses the small "base" flavour (cudart + forward-compat libs and the NVIDIA_* env
# the container toolkit reads): torch's CUDA wheels bundle cuBLAS/cuDNN/NCCL themselves, so the
# "runtime" flavour would ship those libraries twice (~3 GB). Keep the CUDA major version of the base
# image and of TORCH_INDEX in step; CUDA 13 needs an NVIDIA driver >= 580. For older drivers build with
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu


# ---------------------------------------------------------------------------------------------------
# CPU: the official slim Python image and the CPU-only torch wheel (no CUDA libraries at all).
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements ./requirements
RUN pip install --no-cache-dir --require-hashes -r requirements/serve.txt
COPY janus_core ./janus_core
COPY server ./server
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && janus-server --help > /dev/null


FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 janus \
    && useradd --system --uid 10001 --gid janus --create-home --home-dir /home/janus janus \
    && mkdir -p /models \
    && chown janus:janus /models
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    JANUS_MODEL=deepseek-community/Janus-Pro-1B \
    JANUS_DEVICE=cpu \
    JANUS_DTYPE=float32 \
    JANUS_HOST=0.0.0.0 \
    JANUS_PORT=8000 \
    JANUS_GRPC_PORT=50051 \
    JANUS_METRICS_PORT=9100
VOLUME ["/models"]
WORKDIR /home/janus
USER 10001:10001
EXPOSE 8000 50051 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('JANUS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["janus-server"]
CMD ["serve"]


# ---------------------------------------------------------------------------------------------------
# API only: `janus-server api --queue redis://...`, the REST + gRPC frontends of workers that run from the
# cuda or cpu image. That process never imports torch, transformers or diffusers, so this venv has none
# (requirements/api.txt: requirements/serve.txt's pins without the model runtime); the same image fronts
# GPU and CPU workers. The build checks both: the installed api modules import (-I: not from /src), and the
# model runtime is absent.
FROM ${PYTHON_IMAGE} AS api-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements ./requirements
RUN pip install --no-cache-dir --require-hashes -r requirements/api.txt
COPY janus_core ./janus_core
COPY server ./server
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && janus-server --help > /dev/null \
    && python -I -c "import server.cli, server.runtime, server.http.app, server.rpc.service" \
    && python -I -c "import importlib.util as u; assert not any(map(u.find_spec, ('torch', 'transformers', 'diffusers')))"


FROM ${PYTHON_IMAGE} AS api
RUN groupadd --system --gid 10001 janus \
    && useradd --system --uid 10001 --gid janus --create-home --home-dir /home/janus janus
COPY --from=api-build /opt/venv /opt/venv
# JANUS_MODEL only names what /v1/models lists and OpenAI requests may say: set it to the workers' model.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    JANUS_MODEL=deepseek-community/Janus-Pro-1B \
    JANUS_HOST=0.0.0.0 \
    JANUS_PORT=8000 \
    JANUS_GRPC_PORT=50051
WORKDIR /home/janus
USER 10001:10001
EXPOSE 8000 50051
# REST on JANUS_PORT; no model to load, so it answers within seconds of starting.
HEALTHCHECK --interval=30s --timeout=5s --start-period=1m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('JANUS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["janus-server"]
CMD ["api"]



# ---------------------------------------------------------------------------------------------------
# CUDA: Ubuntu 24.04's own python3.12 (no PPA), a venv in /opt/venv built here and copied below.
FROM ${CUDA_IMAGE} AS cuda-build
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements ./requirements
# Dependencies only, so editing our code does not reinstall them.
RUN pip install --no-cache-dir --require-hashes -r requirements/serve.txt
COPY janus_core ./janus_core
COPY server ./server
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && janus-server --help > /dev/null


FROM ${CUDA_IMAGE} AS cuda
ENV DEBIAN_FRONTEND=noninteractive
# redis-server: on a host with several GPUs `serve` runs one worker per GPU over a private redis-server
# (a unix socket in a private directory, no TCP port) unless JANUS_QUEUE names a Redis of your own.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 ca-certificates redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 janus \
    && useradd --system --uid 10001 --gid janus --create-home --home-dir /home/janus janus \
    && mkdir -p /models \
    && chown janus:janus /models
COPY --from=cuda-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    JANUS_MODEL=deepseek-community/Janus-Pro-1B \
    JANUS_DEVICE=cuda \
    JANUS_QUANTIZATION=none \
    JANUS_HOST=0.0.0.0 \
    JANUS_PORT=8000 \
    JANUS_GRPC_PORT=50051 \
    JANUS_METRICS_PORT=9100
VOLUME ["/models"]
WORKDIR /home/janus
USER 10001:10001
EXPOSE 8000 50051 9100
# Janus-Pro-7B on a 16 GB card (T4, A10-class, RTX 4080): int8 linears and heads, the compiled step
#   docker run --gpus 1 -p 8000:8000 -v models:/models -e JANUS_MODEL=deepseek-ai/Janus-Pro-7B \
#     -e JANUS_QUANTIZATION=int8 -e JANUS_COMPILE=true -e JANUS_API_KEY=... janus-server:0.1.0
# Liveness of `serve`/`api` (REST on JANUS_PORT). Workers answer /health on JANUS_METRICS_PORT;
# docker-compose.yml overrides the check for them. The long start period covers model downloads.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('JANUS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["janus-server"]
CMD ["serve"]
