#!/usr/bin/env bash
# Build the CPU image of spineps with podman, offline from any registry, and smoke-test it:
#   1. a Debian bookworm base made with debootstrap (python3, venv, libgomp1 included) and
#      imported as $BASE_IMAGE (skipped when that image exists);
#   2. `podman build` of the repository's Dockerfile on that base (BASE build argument),
#      torch 2.13.0+cpu from the local wheel folder, the rest pinned by
#      containers/constraints-docker.txt, from PyPI through the host's CA bundle;
#   3. `--version`, then `spineps demo` + participant + group runs in the image with
#      --network none, --read-only (tmpfs /tmp) and an arbitrary non-root uid; the bundled
#      models when the image has them, else tiny random-weight model folders (chain only).
#
# usage: containers/build_podman.sh [--no-test | --test-only]   (as root: debootstrap needs it)
# environment: IMAGE (spineps), TAG ($(cat version)-cpu), BASE_IMAGE, WORK_DIR,
#   WHEELS (/opt/wheels), CA_BUNDLE, DEBIAN_MIRROR, PYTHON (host python with spineps, for
#   the test model folders), MODELS_DIR (build-context folder of models to bake in).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VERSION="$(tr -d '[:space:]' < version)"
IMAGE="${IMAGE:-spineps}"
TAG="${TAG:-${VERSION}-cpu}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-bookworm-spineps-base:latest}"
WORK_DIR="${WORK_DIR:-/var/tmp/spineps-podman}"
WHEELS="${WHEELS:-/opt/wheels}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-.venv/bin/python}"
MODELS_DIR="${MODELS_DIR:-containers/models}"
RUN_TESTS=1
BUILD=1
case "${1:-}" in
    --no-test) RUN_TESTS=0 ;;
    --test-only) BUILD=0 ;;
    "") ;;
    *) echo "usage: containers/build_podman.sh [--no-test | --test-only]" >&2; exit 64 ;;
esac

say() { printf '== %s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install -y podman buildah runc debootstrap" >&2; exit 69; }
done
mkdir -p "$WORK_DIR"

# runc (crun fails on some cgroup set-ups) and explicit ulimits
export CONTAINERS_CONF="$WORK_DIR/containers.conf"
cat > "$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
CONF

# ---------------------------------------------------------------- 1. base image
if [[ $BUILD == 0 ]]; then
    say "--test-only: using the existing $IMAGE:$TAG"
elif podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE exists"
else
    say "debootstrap bookworm (minbase + python3, python3-venv, libgomp1, ca-certificates)"
    t0=$SECONDS
    rootfs="$WORK_DIR/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,libgomp1,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" > "$WORK_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK_DIR/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    say "base image $BASE_IMAGE imported in $((SECONDS - t0)) s"
fi

# ---------------------------------------------------------------- 2. the image
build_s=0
if [[ $BUILD == 1 ]]; then
    say "podman build $IMAGE:$TAG (BASE=$BASE_IMAGE)"
    t0=$SECONDS
    podman build --isolation chroot \
        --build-arg BASE="$BASE_IMAGE" \
        --build-arg VERSION="$VERSION" \
        --build-arg IMAGE_TAG="$IMAGE:$TAG" \
        --build-arg MODELS_DIR="$MODELS_DIR" \
        --build-arg PIP_FIND_LINKS_DIR=/wheels \
        --build-arg PIP_CERT_FILE=/host-certs/ca-bundle.crt \
        -v "$WHEELS:/wheels:ro" \
        -v "$CA_BUNDLE:/host-certs/ca-bundle.crt:ro" \
        -t "$IMAGE:$TAG" -t "$IMAGE:latest" .
    build_s=$((SECONDS - t0))
fi
size="$(podman image inspect --format '{{.Size}}' "$IMAGE:$TAG")"
if [[ $BUILD == 1 ]]; then
    say "built $IMAGE:$TAG in ${build_s} s, $((size / 1000000)) MB"
else
    say "image $IMAGE:$TAG: $((size / 1000000)) MB"
fi
[[ $RUN_TESTS == 1 ]] || exit 0

# ---------------------------------------------------------------- 3. smoke tests
RUN=(podman run --rm --network none --read-only --user 12345:12345)
got="$("${RUN[@]}" "$IMAGE:$TAG" --version)"
[[ "$got" == *"$VERSION"* ]] || { echo "--version printed '$got', expected $VERSION" >&2; exit 1; }
say "--version: $got"

t="$WORK_DIR/smoke"
rm -rf "$t"
mkdir -p "$t/data" "$t/out"
chown 12345:12345 "$t/data" "$t/out"
t0=$SECONDS
"${RUN[@]}" -v "$t/data:/data" "$IMAGE:$TAG" demo /data/demo --subjects 2
say "demo dataset written in the image in $((SECONDS - t0)) s"

model_args=()
if "${RUN[@]}" --entrypoint /bin/sh "$IMAGE:$TAG" -c 'test -f /opt/spineps/models/t2w_semantic/inference_config.json'; then
    say "using the models baked into the image"
else
    say "no semantic model in the image: tiny random-weight model folders (checks the chain only)"
    "$PYTHON" containers/make_test_models.py "$t/models" > "$t/models.log" 2>&1 || { cat "$t/models.log" >&2; exit 1; }
    chmod -R a+rX "$t/models"
    model_args=(-v "$t/models:/models:ro" -e SPINEPS_SEMANTIC_MODEL=/models/semantic
                -e SPINEPS_INSTANCE_MODEL=/models/instance)
fi

t0=$SECONDS
"${RUN[@]}" "${model_args[@]}" -v "$t/data/demo:/data:ro" -v "$t/out:/out" "$IMAGE:$TAG" \
    /data /out participant --nprocs 2 --participant-label 01
say "participant run (sub-01) in $((SECONDS - t0)) s"
t0=$SECONDS
"${RUN[@]}" -v "$t/out:/out" "$IMAGE:$TAG" /data /out group
say "group run in $((SECONDS - t0)) s"
find "$t/out" -type f -not -path '*/logs/*' | sort | sed "s#^$t/out/#  out/#"
test -f "$t/out/sub-01/anat/sub-01_acq-sag_desc-spine_dseg.nii.gz"
test -f "$t/out/dataset_description.json"
grep -q '"Type": "docker"' "$t/out/dataset_description.json"
# the derivatives are valid BIDS, checked with the validator inside the image (offline)
"${RUN[@]}" -v "$t/out:/out:ro" --entrypoint /opt/spineps/venv/bin/bids-validator-deno "$IMAGE:$TAG" /out \
    > "$t/validator.log" 2>&1 || { cat "$t/validator.log" >&2; exit 1; }
say "bids-validator-deno in the image: the derivatives are valid"
say "smoke tests passed: image $IMAGE:$TAG, $((size / 1000000)) MB"
