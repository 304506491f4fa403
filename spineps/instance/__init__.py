"""The instance phase: vertebra instances from a semantic mask.

- ``network.InstanceUNet3D``: the 3D residual U-Net with the released parameter layout.
- ``checkpoint``: Lightning-style checkpoints, loaded with ``weights_only`` safety.
- ``cutouts``: vertebral-body centres and the one-hot cutouts around them.
- ``merge``: consensus merging of the per-cutout above/centre/below predictions.
- ``segmenter.UNetInstanceSegmenter``: the whole phase on a model folder.

Importing this package imports neither torch nor numpy; the names below load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "InstanceUNet3D",
    "load_instance_checkpoint",
    "save_instance_checkpoint",
    "body_centres",
    "cutout_boxes",
    "make_cutout_input",
    "merge_cutout_predictions",
    "UNetInstanceSegmenter",
]

_WHERE = {
    "InstanceUNet3D": "network",
    "load_instance_checkpoint": "checkpoint",
    "save_instance_checkpoint": "checkpoint",
    "body_centres": "cutouts",
    "cutout_boxes": "cutouts",
    "make_cutout_input": "cutouts",
    "merge_cutout_predictions": "merge",
    "UNetInstanceSegmenter": "segmenter",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
