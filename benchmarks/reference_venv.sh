#!/usr/bin/env bash
# Install the reference implementation (SPINEPS 2.1.3 from PyPI) into its own virtual
# environment, CPU torch pinned, so benchmarks/run_benchmark.py --reference can run it
# side by side with this package.
#
#   bash benchmarks/reference_venv.sh [VENV_DIR]      (default /tmp/spineps-ref-venv)
#
# Workarounds needed on a CPU-only host (see benchmarks/README.md):
# - torch is pinned with a constraints file (torch==2.13.0); without it the dependency chain
#   nnunetv2 -> dynamic-network-architectures -> timm -> torchvision pulls a CUDA torch.
# - torchvision from PyPI is built for CUDA torch: `import torchvision` fails with
#   "operator torchvision::nms does not exist". The reference imports it only indirectly
#   (torchmetrics / timm probe for it), so it is uninstalled after the install.
set -euo pipefail

VENV="${1:-/tmp/spineps-ref-venv}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
if [ -f "$REPO/constraints.txt" ]; then
    cat "$REPO/constraints.txt" > "$CONSTRAINTS"
else
    echo "torch==2.13.0" > "$CONSTRAINTS"
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install --upgrade pip >/dev/null
"$VENV/bin/pip" install -c "$CONSTRAINTS" "torch==2.13.0"
"$VENV/bin/pip" install -c "$CONSTRAINTS" "spineps==2.1.3"
# CUDA-only torchvision breaks any import chain that touches it on CPU torch
"$VENV/bin/pip" uninstall -y torchvision || true
# run the check outside this repository: from here `import spineps` would find ours
(cd / && "$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.endswith("+cpu"), f"torch is {torch.__version__}, expected the CPU build"
import spineps  # noqa: F401
from importlib.metadata import version
assert version("spineps") == "2.1.3", version("spineps")
from spineps.seg_run import segment_image  # noqa: F401  (fails here if torchvision is still broken)
print("reference venv ready: spineps", version("spineps"), "at", spineps.__file__, "torch", torch.__version__)
PY
)
