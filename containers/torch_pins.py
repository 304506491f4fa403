#!/usr/bin/env python3
"""Write the pip constraints for the torch family of a container image to stdout.

    python3 containers/torch_pins.py containers/constraints-torch-cpu.txt > torch-pins.txt

Run with the base image's own ``python3``. When that interpreter already has torch (the
CUDA PyTorch base image), the pins are the installed versions of torch, torchvision,
torchaudio and triton, so pip keeps the base's CUDA build instead of pulling another one.
Otherwise (a bare Debian/Ubuntu base: the CPU variant) the file given as the argument is
copied: ``torch==2.13.0+cpu`` and its torchvision.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

FAMILY = ("torch", "torchvision", "torchaudio", "triton")


def base_pins() -> list[str]:
    """``name==version`` of each torch-family distribution installed in this interpreter."""
    pins = []
    for name in FAMILY:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: torch_pins.py CPU_CONSTRAINTS_FILE\n")
        return 64
    pins = base_pins()
    if any(p.startswith("torch==") for p in pins):
        sys.stdout.write("# torch family of the base image (kept as is)\n" + "\n".join(pins) + "\n")
        return 0
    sys.stdout.write(Path(argv[0]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
