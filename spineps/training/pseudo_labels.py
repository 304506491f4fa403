"""Self-training targets: a trained model's own predictions fill the unknown part of a real
scan's target.

A real scan's target (``spineps.training.partial_labels``) knows the annotated structure,
what anatomy implies around it, and certain background; every other voxel is nnU-Net's
ignore label, so the posterior elements, canal, cord and endplates of real anatomy are never
taught. ``pseudo_target`` adopts a previous model's prediction there, conservatively:

- only inside a target's unknown voxels (what the annotation and its rules say is kept);
- never for the classes that the annotation decides (``decided``: in a body-annotated scan
  the body, disc and sacrum classes, in a disc-annotated scan the disc, body and sacrum
  classes), so the model cannot teach itself back the errors the annotation corrects;
- only the interior of each predicted structure (eroded by ``erode_vox`` voxels in every
  direction): borders, where a prediction is least sure, stay unknown;
- predicted background only farther than ``background_margin_vox`` voxels from every
  predicted or annotated structure (real images' negatives, without cementing a miss).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy import ndimage

__all__ = ["pseudo_target"]


def pseudo_target(target: np.ndarray, predicted: np.ndarray, *, ignore: int, decided: Iterable[int],
                  erode_vox: int = 1, background_margin_vox: int = 3) -> np.ndarray:
    """``target`` (network indices with ``ignore``) completed by ``predicted`` (network indices
    on the same grid) as described in the module docstring."""
    if target.shape != predicted.shape:
        raise ValueError(f"target {target.shape} and prediction {predicted.shape} differ in shape")
    out = target.copy()
    unknown = target == ignore
    skip = {int(v) for v in decided} | {0, int(ignore)}
    st = ndimage.generate_binary_structure(3, 1)
    for idx in (int(v) for v in np.unique(predicted)):
        if idx in skip:
            continue
        m = predicted == idx
        core = ndimage.binary_erosion(m, structure=st, iterations=erode_vox) if erode_vox > 0 else m
        out[unknown & core] = idx
    structures = (predicted > 0) | ((target > 0) & (target != ignore))
    far = ~ndimage.binary_dilation(structures, structure=st, iterations=background_margin_vox)
    out[unknown & far & (predicted == 0)] = 0
    return out
