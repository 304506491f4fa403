"""spineps: whole-spine semantic and instance segmentation of sagittal T2w MRI, as a BIDS-App."""

from __future__ import annotations


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("spineps")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from pathlib import Path

        vfile = Path(__file__).resolve().parents[1] / "version"
        return vfile.read_text().strip() if vfile.is_file() else "0+unknown"


__version__ = _version()
