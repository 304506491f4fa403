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

``cord_by_contrast`` corrects the one class a previous model gets systematically too small
on real scans: the spinal cord. In T2w (and the water-fat scans) the cord is darker than the
CSF around it; where a model found the cord in a slice across the canal but called most of it
canal, the dark part of the predicted canal that touches the predicted cord is the cord.
``dark_canal`` finds the rest of the predicted canal that is as dark as cord (the cord in the
slices where the model found none, the conus, nerve roots): neither cord nor canal is taught
there.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy import ndimage

__all__ = ["cord_by_contrast", "dark_canal", "pseudo_target"]


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


def cord_by_contrast(image: np.ndarray, predicted: np.ndarray, *, cord: int, canal: int, axis: int,
                     min_ratio: float = 1.3) -> np.ndarray:
    """The spinal cord inside the predicted canal, slice by slice across the canal (``axis``:
    the superior-inferior axis of the arrays): in a slice where the prediction has both cord
    and canal voxels and the canal's median intensity is at least ``min_ratio`` times the
    cord's, the voxels of ``predicted`` cord or canal darker than the midpoint of the two
    medians that are connected (in the slice) to the predicted cord. Slices without predicted
    cord, or without that contrast, contribute only the predicted cord (nothing is grown
    below the conus or where CSF is not bright). Returns a boolean mask."""
    if image.shape != predicted.shape:
        raise ValueError(f"image {image.shape} and prediction {predicted.shape} differ in shape")
    out = predicted == cord
    st = ndimage.generate_binary_structure(2, 1)
    for k in range(image.shape[axis]):
        idx = tuple(k if a == axis else slice(None) for a in range(image.ndim))
        p, im = predicted[idx], image[idx]
        c, q = p == cord, p == canal
        t = _cord_threshold(im, c, q, min_ratio)
        if t is None:
            continue
        dark = (c | q) & (im < t)
        comp, n = ndimage.label(dark, structure=st)
        if n == 0:
            continue
        keep = np.unique(comp[c & dark])
        keep = keep[keep > 0]
        out[idx] = c | np.isin(comp, keep)
    return out


def dark_canal(image: np.ndarray, predicted: np.ndarray, *, cord: int, canal: int,
               min_ratio: float = 1.3) -> np.ndarray:
    """The voxels of the predicted canal darker than the midpoint of the scan's predicted cord
    and canal medians (no voxel where the prediction has no cord, or where the canal is not
    ``min_ratio`` times brighter than the cord). Returns a boolean mask."""
    if image.shape != predicted.shape:
        raise ValueError(f"image {image.shape} and prediction {predicted.shape} differ in shape")
    q = predicted == canal
    t = _cord_threshold(image, predicted == cord, q, min_ratio)
    return np.zeros(image.shape, bool) if t is None else q & (image < t)


def _cord_threshold(image: np.ndarray, cord: np.ndarray, canal: np.ndarray, min_ratio: float) -> "float | None":
    """The intensity midway between the median of ``image`` in the ``cord`` and in the
    ``canal`` mask; None where either has fewer than 3 voxels or the canal is not ``min_ratio``
    times brighter than the cord."""
    if cord.sum() < 3 or canal.sum() < 3:
        return None
    mc, mq = float(np.median(image[cord])), float(np.median(image[canal]))
    return None if mq < min_ratio * mc else 0.5 * (mc + mq)
