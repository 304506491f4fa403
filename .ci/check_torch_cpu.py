"""CI check: torch is the CPU build and no CUDA (nvidia-*) package came in.

    .venv/bin/python .ci/check_torch_cpu.py

Exits 0 when the environment is right; otherwise 1 with what is wrong and what to do: on a
machine whose pip brings the CUDA build of torch (PyPI's default on Linux x86_64, several GB
with the nvidia-* packages), install the CPU build from PyTorch's own CPU wheel index.
"""

from __future__ import annotations

import sys
from importlib import metadata

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH = "torch==2.13.0"


def _fix(venv: str = ".venv") -> str:
    return (f"install the CPU build from PyTorch's CPU wheel index, then the rest with the constraints:\n"
            f"    {venv}/bin/pip uninstall -y torch $({venv}/bin/pip list --format=freeze | grep -i '^nvidia-' "
            f"| cut -d= -f1)\n"
            f"    {venv}/bin/pip install {TORCH} --index-url {CPU_INDEX}\n"
            f"    {venv}/bin/pip install -c constraints.txt -e \".[test]\"\n"
            f"(or start from a fresh venv with the second and third line; see the README, \"Quick start\")")


def problems() -> list[str]:
    out: list[str] = []
    try:
        import torch
    except ImportError as exc:
        return [f"torch cannot be imported ({exc})"]
    version = str(getattr(torch, "__version__", "?"))
    print("torch", version)
    if not version.endswith("+cpu"):
        out.append(f"torch {version} is not the +cpu build (pip brought the CUDA build, or a dependency "
                   "replaced the CPU build)")
    nvidia = sorted({d.metadata["Name"] for d in metadata.distributions()
                     if (d.metadata["Name"] or "").lower().startswith("nvidia-")})
    if nvidia:
        out.append(f"CUDA packages are installed (they must not be): {', '.join(nvidia)}")
    return out


def main() -> int:
    found = problems()
    if not found:
        return 0
    for p in found:
        print(f"error: {p}", file=sys.stderr)
    print(_fix(), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
