"""Per-scan measurements (volumes, morphometry, QC) and figures.

Public API (imported lazily, so importing ``spineps.measure`` costs nothing):
``measure_scan``, ``Measurements``, ``write_measurements``, ``read_measurements``,
``morphometry_paths``, ``write_figure`` (``spineps.measure.figures``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["measure_scan", "Measurements", "write_measurements", "read_measurements", "morphometry_paths",
           "write_figure"]

_FROM = {
    "measure_scan": "scan", "Measurements": "scan", "write_measurements": "scan", "read_measurements": "scan",
    "morphometry_paths": "scan", "write_figure": "figures",
}


def __getattr__(name: str) -> Any:
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(f"spineps.measure.{_FROM[name]}"), name)
    raise AttributeError(name)
