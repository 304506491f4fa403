# spineps BIDS-App image: `docker run IMAGE bids_dir output_dir participant`.
# Variants, build commands, pinning and the official weights: docs/containers.md.
#
#   GPU (default base: the CUDA PyTorch image; its torch is kept, pinned at build time):
#     docker build --build-arg VERSION=$(cat version) \
#         --build-arg BASE_DIGEST=@sha256:<digest of the base tag> -t spineps:$(cat version) .
#   CPU (any Debian/Ubuntu image; torch 2.13.0+cpu from containers/constraints-torch-cpu.txt):
#     docker build --build-arg BASE=debian:bookworm-slim --build-arg VERSION=$(cat version) \
#         --build-arg PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" \
#         -t spineps:$(cat version)-cpu .
#   containers/build_podman.sh builds the CPU variant offline with podman.
#
#   docker run --rm --gpus all --read-only --tmpfs /tmp -u "$(id -u):$(id -g)" \
#       -v /data/bids:/data:ro -v /data/out:/out spineps:$(cat version) /data /out participant

# The base image by tag, and optionally its digest ("@sha256:...") to pin the exact image.
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
ARG BASE_DIGEST=

# ---------------------------------------------------------------- shared runtime base
FROM ${BASE}${BASE_DIGEST} AS runtime-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3 with venv, and the OpenMP runtime, only where the base lacks python's venv
# (a bare Debian/Ubuntu base; the PyTorch base has them). Versions: the base's release.
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---------------------------------------------------------------- build stage
FROM runtime-base AS build
# extra pip options, e.g. "--extra-index-url https://download.pytorch.org/whl/cpu" (CPU
# variant from the internet); a CA bundle and a local wheel folder (mounted into the build,
# e.g. `podman build -v /opt/wheels:/wheels:ro`) go in through pip's environment
# variables, which also reach pip's isolated build-dependency installs
ARG PIP_ARGS=""
ARG PIP_CERT_FILE=""
ARG PIP_FIND_LINKS_DIR=""
# a folder of the build context with model folders to bake in (e.g. the official SPINEPS
# weights): <MODELS_DIR>/t2w_semantic/ and <MODELS_DIR>/instance/ replace the bundled ones
ARG MODELS_DIR=containers/models
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md version ./
COPY containers/constraints-docker.txt containers/constraints-torch-cpu.txt containers/torch_pins.py containers/
COPY spineps ./spineps
# 1. torch pins: the base's own torch family (GPU base), else the CPU pins of the repo;
# 2. a venv (seeing the base's site-packages only when the base brings torch);
# 3. spineps with every dependency pinned by the lock file;
# 4. the bundled models moved to /opt/spineps/models (the package's data/models becomes a
#    link there, so the bundled-model lookup finds whatever is baked in).
# hadolint ignore=SC2086
RUN if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi \
    && if [ -n "$PIP_FIND_LINKS_DIR" ]; then export PIP_FIND_LINKS="$PIP_FIND_LINKS_DIR"; fi \
    && python3 containers/torch_pins.py containers/constraints-torch-cpu.txt > /tmp/torch-pins.txt \
    && cat /tmp/torch-pins.txt \
    && if python3 -c "import torch" 2>/dev/null; then \
           python3 -m venv --system-site-packages /opt/spineps/venv; \
       else \
           python3 -m venv /opt/spineps/venv; \
       fi \
    && /opt/spineps/venv/bin/pip install ${PIP_ARGS} \
           -c containers/constraints-docker.txt -c /tmp/torch-pins.txt . \
    && /opt/spineps/venv/bin/python -I -c "import spineps, nnunetv2, torch, nibabel, bids; print('torch', torch.__version__)" \
    && pkg="$(/opt/spineps/venv/bin/python -I -c 'import pathlib, spineps; print(pathlib.Path(spineps.__file__).parent)')" \
    && case "$pkg" in /opt/spineps/venv/*) ;; *) echo "spineps imported from $pkg, not the venv" >&2; exit 1 ;; esac \
    && mkdir -p /opt/spineps/models \
    && if [ -d "$pkg/data/models" ]; then cp -a "$pkg/data/models/." /opt/spineps/models/ && rm -rf "$pkg/data/models"; fi \
    && mkdir -p "$pkg/data" && ln -s /opt/spineps/models "$pkg/data/models" && test -L "$pkg/data/models" \
    && rm -rf /root/.cache /tmp/torch-pins.txt
COPY ${MODELS_DIR}/ /tmp/extra-models/
RUN for d in /tmp/extra-models/*/; do \
        [ -f "$d/inference_config.json" ] || continue; \
        name="$(basename "$d")"; rm -rf "/opt/spineps/models/$name"; cp -a "$d" "/opt/spineps/models/$name"; \
    done \
    && rm -rf /tmp/extra-models \
    && chmod -R a+rX /opt/spineps \
    && /opt/spineps/venv/bin/python -I -c "from spineps.models.registry import bundled_model_dir as b; print('bundled models found:', b('t2w_semantic'), b('instance'))" \
    && echo "models baked in:" && ls -l /opt/spineps/models/

# ---------------------------------------------------------------- final image
FROM runtime-base
ARG VERSION=unknown
# the image's name:tag, recorded in the derivatives' GeneratedBy.Container
ARG IMAGE_TAG=spineps:${VERSION}
LABEL org.opencontainers.image.title="spineps" \
      org.opencontainers.image.description="SPINEPS BIDS-App: whole-spine segmentation of sagittal T2w MRI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /opt/spineps /opt/spineps
COPY version /version

# A read-only root file system and any (non-root) user: home and every cache under /tmp
# (give the container a writable /tmp), models under /opt/spineps/models (outside $HOME,
# which Apptainer replaces with the host's), nothing ever fetched from the network.
ENV VIRTUAL_ENV=/opt/spineps/venv \
    PATH=/opt/spineps/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TORCH_HOME=/tmp/.cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    HF_HUB_OFFLINE=1 \
    DENO_DIR=/tmp/.cache/deno \
    DENO_NO_UPDATE_CHECK=1 \
    nnUNet_raw=/tmp/nnunet/raw \
    nnUNet_preprocessed=/tmp/nnunet/preprocessed \
    nnUNet_results=/tmp/nnunet/results \
    nnUNet_def_n_proc=2 \
    nnUNet_n_proc_DA=2 \
    SPINEPS_MODELS_DIR=/opt/spineps/models \
    SPINEPS_CONTAINER_TYPE=docker \
    SPINEPS_CONTAINER_TAG=${IMAGE_TAG}

RUN chmod a+r /version \
    && echo "spineps:x:10001:10001:spineps:/tmp/home:/usr/sbin/nologin" >> /etc/passwd \
    && echo "spineps:x:10001:" >> /etc/group
WORKDIR /tmp
USER 10001:10001

ENTRYPOINT ["/opt/spineps/venv/bin/spineps"]
CMD ["--help"]
