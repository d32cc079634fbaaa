# T2Diff recall service images.  Targets:
#
#   runtime (default, last stage)  the serving image; VARIANT=cpu|gpu picks its base:
#       docker build -t t2diff-recall:cpu .
#       docker build --build-arg VARIANT=gpu -t t2diff-recall:gpu .
#   trainer                        torch (CPU build) + .[train,serve], for the bootstrap and
#                                  nightly rebuild jobs:
#       docker build --target trainer -t t2diff-recall:trainer .
#
# Build with BuildKit (the docker default): it builds only the stages the chosen target
# needs, so a cpu build never pulls the CUDA base.  Base images are pinned by tag; pin them
# by digest too (@sha256:...) in a release pipeline.
#
# No `# syntax=` line: the Dockerfile front end built into BuildKit reads it, so a build
# needs no registry but the one holding the base images.
#
# Dependencies are installed from the lock files (requirements/*.lock, `make lock`
# regenerates them from pyproject.toml) *before* the source is copied, so editing code does
# not re-download them; the project itself is then installed with --no-deps.  Every image
# gets the same versions, whenever it is built.
#
# Package index: pip reads the build ARGs PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
# PIP_TRUSTED_HOST and PIP_CERT from each RUN's environment (an ARG given no value is unset
# there, and none is kept in the image's environment).  Behind a mirror with its own CA:
#       docker build --build-arg PIP_INDEX_URL=https://mirror.example/pypi/simple \
#           --secret id=pip_ca,src=ca-bundle.pem --build-arg PIP_CERT=/run/secrets/pip_ca .
# The CA bundle (PEM, every CA pip must trust) comes in as a build secret, mounted into each
# pip RUN only, never a layer.  ARG values show in `docker history`: put no credentials in
# an index URL (use a netrc secret or the mirror's token auth instead).  The trainer's CPU
# torch wheel comes from TORCH_CPU_INDEX, the tower worker's CUDA one from TORCH_CUDA_INDEX.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------
# cpu: build a virtualenv with .[serve] (no torch) and copy it into a clean slim image.
FROM ${PYTHON_IMAGE} AS build-cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/scripts/check_image.py /tmp/
COPY requirements/serve.lock /tmp/
RUN --mount=type=secret,id=pip_ca pip install --no-cache-dir -r /tmp/serve.lock
COPY pyproject.toml ./
COPY README.md ./
COPY contracts/ contracts/
COPY model/ model/
COPY index_builder/ index_builder/
COPY service/ service/
COPY release/ release/
COPY worker/ worker/
COPY t2diff_cli/ t2diff_cli/
RUN --mount=type=secret,id=pip_ca pip install --no-cache-dir --no-deps . \
    && pip check \
    && python /tmp/check_image.py --present t2diff-recall onnxruntime faiss-cpu \
        --absent torch onnxruntime-gpu --import service.app \
    && t2diff --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime-cpu
RUN groupadd --system --gid 10001 t2diff \
    && useradd --system --uid 10001 --gid t2diff --home-dir /home/t2diff --create-home \
        --shell /usr/sbin/nologin t2diff \
    && mkdir -p /data \
    && chown t2diff:t2diff /data
COPY --from=build-cpu /opt/venv /opt/venv

# ---------------------------------------------------------------------------------------
# gpu: the same on a CUDA 12 + cuDNN 9 runtime base with onnxruntime-gpu and faiss-gpu-cu12
# (.[serve,gpu] minus the CPU builds of the same modules, which would overwrite them), from
# requirements/serve-gpu.lock, resolved for Python 3.12 (Ubuntu 24.04's; the project needs
# >= 3.11).  Its pins (requirements/gpu-pins.txt) keep both wheels on CUDA 12:
# onnxruntime-gpu >= 1.27 on PyPI is built for CUDA 13.
FROM ${CUDA_IMAGE} AS build-gpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# DL3008: Ubuntu's python3 is pinned by the pinned CUDA base tag; exact apt versions would
# break every time Ubuntu ships a security update to the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/scripts/check_image.py /tmp/
COPY requirements/serve-gpu.lock /tmp/
RUN --mount=type=secret,id=pip_ca pip install --no-cache-dir -r /tmp/serve-gpu.lock
COPY pyproject.toml ./
COPY README.md ./
COPY contracts/ contracts/
COPY model/ model/
COPY index_builder/ index_builder/
COPY service/ service/
COPY release/ release/
COPY worker/ worker/
COPY t2diff_cli/ t2diff_cli/
# Metadata checks only: importing the CUDA builds needs a driver the build host may lack.
RUN --mount=type=secret,id=pip_ca pip install --no-cache-dir --no-deps . \
    && pip check \
    && python /tmp/check_image.py --present t2diff-recall onnxruntime-gpu faiss-gpu-cu12 \
        --absent torch onnxruntime faiss-cpu

FROM ${CUDA_IMAGE} AS runtime-gpu
ENV DEBIAN_FRONTEND=noninteractive
# DL3008: see build-gpu.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 t2diff \
    && useradd --system --uid 10001 --gid t2diff --home-dir /home/t2diff --create-home \
        --shell /usr/sbin/nologin t2diff \
    && mkdir -p /data \
    && chown t2diff:t2diff /data
COPY --from=build-gpu /opt/venv /opt/venv

# ---------------------------------------------------------------------------------------
# tower-worker: the GPU sidecar that runs the user tower with torch and the fused Triton
# kernel (worker/server.py) and answers the api over a Unix socket.  torch lives in this
# image only: the cpu and gpu serving images stay torch-free.  The CUDA build of torch
# brings its own CUDA libraries and Triton; the base gives the driver-facing runtime.
#   docker build --target tower-worker -t t2diff-recall:tower-worker .
FROM ${CUDA_IMAGE} AS tower-worker
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu126
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# DL3008: see build-gpu.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 t2diff \
    && useradd --system --uid 10001 --gid t2diff --home-dir /home/t2diff --create-home \
        --shell /usr/sbin/nologin t2diff \
    && mkdir -p /data /run/t2diff \
    && chown t2diff:t2diff /data /run/t2diff
RUN --mount=type=secret,id=pip_ca \
    pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_CUDA_INDEX}"
COPY requirements/serve-gpu.lock /tmp/
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contracts/ contracts/
COPY model/ model/
COPY index_builder/ index_builder/
COPY service/ service/
COPY release/ release/
COPY worker/ worker/
COPY t2diff_cli/ t2diff_cli/
# --no-deps: the worker needs numpy and torch (both here), not the serving or training
# extras; numpy at the version the GPU serving image locks.
RUN --mount=type=secret,id=pip_ca pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir -c /tmp/serve-gpu.lock numpy \
    && python -c "import worker.server, triton" \
    && rm -rf /src
WORKDIR /data
USER 10001:10001
# The socket lives on a volume shared with the api (deploy/docker-compose.gpu.yml).
HEALTHCHECK --interval=10s --timeout=8s --start-period=300s --retries=3 \
    CMD ["python", "-m", "worker.server", "--ping", "--socket", "/run/t2diff/tower.sock"]
CMD ["python", "-m", "worker.server", "--artifacts", "/data/artifacts/current", \
     "--socket", "/run/t2diff/tower.sock", "--device", "cuda"]

# ---------------------------------------------------------------------------------------
# trainer: torch CPU build + .[train,serve]; runs `t2diff data|train|export|build-index|
# sessions load|rebuild` against the shared /data volume (bootstrap and rebuild jobs).
FROM ${PYTHON_IMAGE} AS trainer
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && groupadd --system --gid 10001 t2diff \
    && useradd --system --uid 10001 --gid t2diff --home-dir /home/t2diff --create-home \
        --shell /usr/sbin/nologin t2diff \
    && mkdir -p /data \
    && chown t2diff:t2diff /data
WORKDIR /src
COPY deploy/scripts/check_image.py /tmp/
COPY requirements/train.lock /tmp/
# The lock pins the CPU build of torch (torch==X+cpu: no CUDA libraries, ~10x smaller),
# which only PyTorch's CPU index has: install that one line from there, then the rest of
# the lock from the package index (torch is already satisfied).
RUN --mount=type=secret,id=pip_ca \
    pip install --no-cache-dir --no-deps "$(grep -E '^torch==' /tmp/train.lock)" \
        --index-url "${TORCH_CPU_INDEX}" \
    && pip install --no-cache-dir -r /tmp/train.lock
COPY pyproject.toml ./
COPY README.md ./
COPY contracts/ contracts/
COPY model/ model/
COPY index_builder/ index_builder/
COPY service/ service/
COPY release/ release/
COPY worker/ worker/
COPY t2diff_cli/ t2diff_cli/
RUN --mount=type=secret,id=pip_ca pip install --no-cache-dir --no-deps . \
    && pip check \
    && python /tmp/check_image.py --present t2diff-recall torch onnxruntime faiss-cpu \
        --import torch onnx service.app \
    && t2diff --help > /dev/null \
    && python -c "import torch; assert torch.version.cuda is None, 'want the CPU build'" \
    && rm -rf /src
COPY --chmod=0755 deploy/scripts/ /opt/t2diff/bin/
ENV PATH=/opt/t2diff/bin:$PATH \
    T2DIFF_DATA_ROOT=/data \
    T2DIFF_ARTIFACTS_DIR=/data/artifacts/current \
    T2DIFF_INDEX_DIR=/data/indexes/current \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /data
USER 10001:10001
CMD ["t2diff", "--help"]

# ---------------------------------------------------------------------------------------
# runtime: the serving image (default target).  `FROM runtime-${VARIANT}` selects the base.
# DL3006: runtime-${VARIANT} names a stage of this file (runtime-cpu/runtime-gpu), whose
# bases are pinned above, not a registry image that could take a tag.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="t2diff-recall" \
      org.opencontainers.image.description="T2Diff two-tower recall service (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --chmod=0755 deploy/scripts/ /opt/t2diff/bin/
# Containers listen on all interfaces (the service's own default is 127.0.0.1).
# OMP_*: FAISS's OpenMP threads spin-wait between calls and burn the cores that concurrent
# requests need; serving parallelises over requests, so one passive thread per call.
ENV PATH=/opt/venv/bin:/opt/t2diff/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    T2DIFF_VARIANT=${VARIANT} \
    T2DIFF_HOST=0.0.0.0 \
    T2DIFF_PORT=8000 \
    T2DIFF_ARTIFACTS_DIR=/data/artifacts/current \
    T2DIFF_INDEX_DIR=/data/indexes/current \
    T2DIFF_REDIS_URL=redis://redis:6379/0 \
    T2DIFF_FAISS_THREADS=1 \
    OMP_WAIT_POLICY=PASSIVE \
    OMP_NUM_THREADS=1
WORKDIR /data
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=4s --start-period=60s --retries=3 \
    CMD ["python", "/opt/t2diff/bin/healthcheck.py", "/healthz", "--timeout", "3"]
CMD ["t2diff", "serve"]
