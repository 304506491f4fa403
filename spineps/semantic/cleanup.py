"""Clean-up of a semantic mask on the model grid (no Python voxel loops: cc3d + scipy).

- ``remove_small_components``: connected components (per label value) smaller than a volume
  in mm^3 are set to 0; the voxel threshold comes from the grid's voxel volume, so anisotropic
  spacing is respected.
- ``keep_spine``: the spine is the largest connected component of the foreground; components
  that lie entirely outside its bounding box (grown by a margin in mm) are removed.
- ``fill_holes``: background holes enclosed by a structure (bodies, discs, canal with the
  cord inside, cord) are filled with that structure, in 3D and per sagittal slice.

``clean_semantic`` chains them (``CleanupSettings``). Nothing changes the grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional, Sequence

import numpy as np

from spineps.labels import BODY, CANAL, CORD, DISC

__all__ = ["CleanupSettings", "remove_small_components", "keep_spine", "fill_holes", "clean_semantic"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleanupSettings:
    min_component_mm3: float = 30.0
    spine_margin_mm: float = 15.0
    fill_labels: tuple[int, ...] = (BODY, DISC, CANAL, CORD)
    keep_spine: bool = True
    sagittal_axis: Optional[int] = 2  # the L-R axis of the mask (2 in P-I-R), None: 3D fill only


def _voxels_for(mm3: float, spacing: Sequence[float]) -> int:
    vv = float(np.prod([abs(float(s)) for s in spacing]))
    return int(np.ceil(mm3 / vv)) if mm3 > 0 else 0


def remove_small_components(mask: np.ndarray, spacing: Sequence[float], min_mm3: float,
                            connectivity: Literal[6, 18, 26] = 26) -> np.ndarray:
    """Zero every connected component of a single label value whose volume is below
    ``min_mm3`` (voxel count x voxel volume)."""
    import cc3d

    thr = _voxels_for(min_mm3, spacing)
    if thr <= 1 or not mask.any():
        return mask.copy()
    return cc3d.dust(np.ascontiguousarray(mask), threshold=thr, connectivity=connectivity, in_place=False)


def keep_spine(mask: np.ndarray, spacing: Sequence[float], margin_mm: float = 15.0,
               connectivity: Literal[6, 18, 26] = 26) -> np.ndarray:
    """Keep the largest foreground component and everything that touches its bounding box
    grown by ``margin_mm``; remove foreground components entirely outside it."""
    import cc3d

    fg = mask > 0
    if not fg.any():
        return mask.copy()
    cc = cc3d.connected_components(fg, connectivity=connectivity)
    stats = cc3d.statistics(cc)
    counts = np.asarray(stats["voxel_counts"])
    if counts.size <= 2:  # background + one component
        return mask.copy()
    counts = counts.copy()
    counts[0] = 0
    big = int(np.argmax(counts))
    bbs = stats["bounding_boxes"]
    margin = [int(np.ceil(margin_mm / abs(float(s)))) for s in spacing]
    lo = [bbs[big][a].start - margin[a] for a in range(3)]
    hi = [bbs[big][a].stop + margin[a] for a in range(3)]
    keep = np.zeros(counts.size, bool)
    for i in range(1, counts.size):  # loop over components (few), not voxels
        bb = bbs[i]
        if bb is None or counts[i] == 0 and i != big:
            continue
        keep[i] = all(bb[a].stop > lo[a] and bb[a].start < hi[a] for a in range(3))
    keep[big] = True
    keep[0] = False
    out = mask.copy()
    out[~keep[cc]] = 0
    return out


def _fill_binary(structure: np.ndarray, sagittal_axis: Optional[int]) -> np.ndarray:
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(structure)
    if sagittal_axis is not None:
        # 2D fill in every sagittal slice at once: a structuring element without neighbours
        # along the L-R axis makes the fill slice-wise
        st = np.zeros((3, 3, 3), bool)
        idx: list[Any] = [slice(None)] * 3
        idx[sagittal_axis] = 1
        st[tuple(idx)] = ndimage.generate_binary_structure(2, 1)
        filled |= ndimage.binary_fill_holes(structure, structure=st)
    return filled


def fill_holes(mask: np.ndarray, labels: Iterable[int] = (BODY, DISC, CANAL, CORD),
               sagittal_axis: Optional[int] = 2) -> np.ndarray:
    """Fill background voxels enclosed by a structure with its value. The canal counts the
    cord as part of itself (the cord lies inside the canal). Works per label on its
    bounding box; only background voxels change."""
    from spineps.geometry.cropping import bbox_of

    out = mask.copy()
    for lab in labels:
        structure = out == lab
        if lab == CANAL:
            structure |= out == CORD
        if not (out == lab).any():
            continue
        bb = bbox_of(structure, margin=1)
        if bb is None:
            continue
        sub = structure[bb]
        filled = _fill_binary(sub, sagittal_axis)
        region = out[bb]
        region[filled & (region == 0)] = lab
    return out


def clean_semantic(mask: np.ndarray, spacing: Sequence[float], settings: CleanupSettings = CleanupSettings()
                   ) -> np.ndarray:
    """Small components, spine selection, hole filling (in that order)."""
    out = remove_small_components(mask, spacing, settings.min_component_mm3)
    if settings.keep_spine:
        out = keep_spine(out, spacing, settings.spine_margin_mm)
    return fill_holes(out, settings.fill_labels, settings.sagittal_axis)
