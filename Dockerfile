# spineps BIDS-App image (CPU).
#   docker build -t spineps:$(cat version) .
#   docker run --rm --read-only --tmpfs /tmp -u "$(id -u):$(id -g)" \
#       -v /data/bids:/data:ro -v /data/out:/out spineps:$(cat version) /data /out participant
# BASE selects the base image (any Debian-like image with python3 >= 3.10 and venv);
# TORCH_PIP_ARGS tells pip where the CPU build of torch comes from (e.g. a local wheel
# folder: "--find-links /wheels").
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ARG VERSION=unknown

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libgomp1: OpenMP runtime of torch / SimpleITK (version from the base image's release)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/spineps \
    PATH=/opt/spineps/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/src
COPY pyproject.toml constraints.txt version README.md ./
COPY spineps ./spineps
COPY run.py ./

# torch first (CPU build), then the app with the constraints that keep that torch
# (versions pinned by pyproject.toml + constraints.txt)
# hadolint ignore=DL3013
RUN python3 -m venv /opt/spineps \
    && pip install ${TORCH_PIP_ARGS} torch==2.13.0 \
    && pip install -c constraints.txt . \
    && python -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 'torch is not the CPU build')" \
    && (pip list --format=freeze | grep -i '^nvidia-' && exit 1 || true) \
    && cp version /version \
    && chmod -R a+rX /opt/spineps /version

# A read-only root file system and any (non-root) user: every cache and home under /tmp,
# models inside the installed package (outside $HOME, readable by all), never online.
ENV HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TORCH_HOME=/tmp/.cache/torch \
    DENO_DIR=/tmp/.cache/deno \
    DENO_NO_UPDATE_CHECK=1 \
    nnUNet_raw=/tmp/nnunet/raw \
    nnUNet_preprocessed=/tmp/nnunet/preprocessed \
    nnUNet_results=/tmp/nnunet/results \
    nnUNet_def_n_proc=2 \
    nnUNet_n_proc_DA=2 \
    SPINEPS_CONTAINER_TYPE=docker \
    SPINEPS_CONTAINER_TAG=spineps:${VERSION}

WORKDIR /tmp
RUN useradd --system --uid 10001 --no-create-home --home-dir /tmp/home --shell /usr/sbin/nologin spineps
USER 10001

ENTRYPOINT ["spineps"]
CMD ["--help"]
