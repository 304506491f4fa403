"""Cutout centres and cutout inputs for the instance phase.

Everything here works on arrays already in the model's orientation and spacing (for the
released models P-I-R, so axis 1 is the cranio-caudal axis and a larger index is more
inferior). Centres are returned top to bottom.

- ``body_centres``: one centre per vertebral body. The body voxels are eroded once (to cut
  thin bridges between touching bodies), split into connected components, components
  smaller than ``corpus_size_cleaning`` voxels are dropped, and components that are much
  longer along the spine than a typical body (two bodies the semantic phase merged) are
  split at their narrowest cross-section. Each centre is the component's centre of mass,
  moved onto the nearest body voxel when the centre of mass falls outside it.
- ``cutout_boxes``: the box of ``cutout_size`` voxels around each centre, as the slices in
  the volume and the matching slices in the (zero-padded) cutout.
- ``make_cutout_input``: the mapped semantic cutout (values 0..n-1) and its one-hot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from spineps.geometry.volume import int3

__all__ = [
    "CutoutBox",
    "body_centres",
    "split_merged_bodies",
    "cutout_boxes",
    "map_semantic",
    "make_cutout_input",
    "extract_cutout",
    "one_hot",
    "BODY_VALUES",
]

log = logging.getLogger(__name__)

#: semantic values that count as vertebral body for the centres (49 body, 50/51 legacy body values)
BODY_VALUES = (49, 50, 51)
#: typical vertebral-body height (mm) used when too few bodies are visible to estimate it
DEFAULT_BODY_HEIGHT_MM = 24.0


@dataclass(frozen=True)
class CutoutBox:
    """``volume[src] == cutout[dst]``; the rest of the cutout is zero padding."""

    centre: tuple[int, int, int]
    start: tuple[int, int, int]  # volume index of the cutout's first voxel (may be negative)
    size: tuple[int, int, int]
    src: tuple[slice, slice, slice]
    dst: tuple[slice, slice, slice]


def _vertical_extent(mask: np.ndarray, axis: int) -> int:
    other = tuple(a for a in range(3) if a != axis)
    prof = np.flatnonzero(mask.any(axis=other))
    return int(prof[-1] - prof[0] + 1) if prof.size else 0


def _waist_cuts(prof: np.ndarray, ref: float) -> list[int]:
    """Cut positions (indices into ``prof``) at the narrow waists of a cross-section profile:
    runs of slices with less than half the typical cross-section (the remains of a disc)."""
    typical = float(np.percentile(prof, 75))
    low = prof < 0.5 * typical
    cuts: list[int] = []
    min_piece = max(2, int(round(0.4 * ref)))
    run_start = None
    for i, flag in enumerate(np.append(low, False)):
        if flag and run_start is None:
            run_start = i
        elif not flag and run_start is not None:
            if run_start == 0 or i >= len(prof):  # the tapering ends of a body are no waist
                run_start = None
                continue
            cut = run_start + int(np.argmin(prof[run_start:i]))
            prev = cuts[-1] if cuts else 0
            if cut - prev >= min_piece and (len(prof) - cut) >= min_piece:
                cuts.append(cut)
            run_start = None
    return cuts


def _even_cuts(area: np.ndarray, lo: int, hi: int, extent: int, ref: float) -> list[int]:
    """No waist but far too long: equal pieces of the expected height, cut at the narrowest slices."""
    cuts = []
    pieces = max(2, int(round(extent / ref)))
    smooth = ndimage.uniform_filter1d(area, size=3, mode="nearest")
    for p in range(1, pieces):
        expected = lo + (hi - lo + 1) * p / pieces
        half = max(1, int(round(0.35 * (hi - lo + 1) / pieces)))
        a, b = max(lo + 1, int(expected) - half), min(hi, int(expected) + half + 1)
        if b > a:
            cuts.append(a + int(np.argmin(smooth[a:b])))
    return cuts


def _body_cuts(comp: np.ndarray, axis: int, ref: float, factor: float, piece_ratio: float) -> list[int]:
    """Where one elongated body component is cut (slice indices along ``axis``), [] for none."""
    other = tuple(a for a in range(3) if a != axis)
    extent = _vertical_extent(comp, axis)
    area = comp.sum(axis=other).astype(float)
    nz = np.flatnonzero(area)
    lo, hi = int(nz[0]), int(nz[-1])
    cuts = [lo + c for c in _waist_cuts(area[lo:hi + 1], ref)]
    if not cuts and extent > factor * ref:
        cuts = _even_cuts(area, lo, hi, extent, ref)
    cuts = sorted(set(cuts))
    if cuts:
        # merged bodies are all full bodies; a piece whose widest cross-section is well
        # below another's is a process of one body (C2's dens), not a second body
        bounds = [lo] + cuts + [hi + 1]
        widest = [float(area[x:y].max()) if y > x else 0.0 for x, y in zip(bounds[:-1], bounds[1:])]
        if min(widest) < piece_ratio * max(widest):
            return []
    return cuts


def split_merged_bodies(labels: np.ndarray, n: int, *, axis: int,
                        ref_height: "float | Sequence[float] | np.ndarray",
                        factor: float = 1.6, waist_factor: float = 1.25, piece_ratio: float = 0.65,
                        min_size: int = 1) -> tuple[np.ndarray, int]:
    """Split bodies the semantic phase merged. A component longer than ``waist_factor *
    ref_height`` voxels along ``axis`` is cut at each narrow waist (a run of slices whose
    cross-section is below half the component's typical one: the remains of a disc); one
    longer than ``factor * ref_height`` without any waist is cut into ``round(extent /
    ref_height)`` pieces at the narrowest slices near the expected positions. No split is
    made when a piece's widest cross-section is below ``piece_ratio`` times another's (a
    dens, not a body). Returns the relabelled array and the new component count."""
    out = labels.copy()
    next_label = n + 1
    refs = np.broadcast_to(np.asarray(ref_height, dtype=float), (max(n, 1),))
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        ref = float(refs[lab - 1])
        comp = labels[sl] == lab
        extent = _vertical_extent(comp, axis)
        if extent <= waist_factor * ref:
            continue
        cuts = _body_cuts(comp, axis, ref, factor, piece_ratio)
        if not cuts:
            continue
        piece_of_slice = np.searchsorted(np.asarray(cuts), np.arange(comp.shape[axis]), side="right")
        shape = [1, 1, 1]
        shape[axis] = -1
        piece = np.broadcast_to(piece_of_slice.reshape(shape), comp.shape)
        region = out[sl]
        for k in range(1, len(cuts) + 1):
            sel = comp & (piece == k)
            if sel.sum() >= min_size:
                region[sel] = next_label
                next_label += 1
        log.info("split an elongated body component (%d voxels along the spine, typical %.1f) into %d",
                 extent, ref, len(cuts) + 1)
    # drop empty labels, renumber 1..m
    present = np.unique(out)
    present = present[present > 0]
    lut = np.zeros(int(out.max()) + 1, dtype=np.int32)
    lut[present] = np.arange(1, present.size + 1)
    return lut[out], int(present.size)


def _erode_in_plane(sub: np.ndarray, spacing: Sequence[float], erosion: int, lr_axis: Optional[int]) -> np.ndarray:
    """The body mask eroded within the sagittal plane only (thick slices would erase thin bodies
    along L-R); bodies that the erosion removed completely come back uneroded."""
    import cc3d

    if lr_axis is None:
        sp = np.asarray(spacing, float)
        big = int(np.argmax(sp))
        lr_axis = big if all(sp[big] >= 1.25 * sp[a] for a in range(3) if a != big) else None
    struct = ndimage.generate_binary_structure(3, 1)
    if lr_axis is not None:
        keep = [slice(None)] * 3
        keep[lr_axis] = slice(1, 2)
        flat = np.zeros_like(struct)
        flat[tuple(keep)] = struct[tuple(keep)]
        struct = flat
    work = ndimage.binary_erosion(sub, structure=struct, iterations=erosion)
    orig, n_orig = cc3d.connected_components(sub.astype(np.uint8), connectivity=6, return_N=True)
    hit = np.zeros(n_orig + 1, bool)
    hit[np.unique(orig[work])] = True
    lost = ~hit
    lost[0] = False
    if lost.any():
        work = work | lost[orig]
    return work


def _reference_heights(labels: np.ndarray, n: int, axis: int, default_h: float) -> np.ndarray:
    """Expected height of each body: the median of its nearest neighbours along the spine
    (cervical bodies are half as tall as lumbar ones), within plausible bounds."""
    objs = ndimage.find_objects(labels)
    heights = np.array([_vertical_extent(labels[s] == i, axis) if s is not None else 0
                        for i, s in enumerate(objs, 1)], dtype=float)
    mids = np.array([(s[axis].start + s[axis].stop) / 2 if s is not None else 0 for s in objs], dtype=float)
    refs = np.full(n, default_h)
    if n >= 3:
        for i in range(n):
            by_distance = np.argsort(np.abs(mids - mids[i]))
            others = [j for j in by_distance if j != i][:4]
            refs[i] = float(np.median(heights[others]))
    return np.clip(refs, 0.5 * default_h, 1.5 * default_h)


def _component_centres(labels: np.ndarray, n: int, offset: np.ndarray, axis: int) -> list[tuple[int, int, int]]:
    """The centre of mass of each component, nudged onto it where it falls outside, top to bottom."""
    idx = np.arange(1, n + 1)
    coms = ndimage.center_of_mass(np.ones(labels.shape, bool), labels, idx)
    centres: list[tuple[int, int, int]] = []
    for i, com in zip(idx, coms):
        c = np.round(np.asarray(com)).astype(int)
        c = np.clip(c, 0, np.array(labels.shape) - 1)
        if labels[tuple(c)] != i:  # nudge onto the component's nearest voxel
            pts = np.argwhere(labels == i)
            c = pts[np.argmin(((pts - np.asarray(com)) ** 2).sum(axis=1))]
        g = c + offset
        centres.append((int(g[0]), int(g[1]), int(g[2])))
    centres.sort(key=lambda c: c[axis])
    return centres


def body_centres(semantic: np.ndarray, *, spacing: Sequence[float] = (1.0, 1.0, 1.0), axis: int = 1,
                 corpus_size_cleaning: int = 100, erosion: int = 1, lr_axis: Optional[int] = None,
                 body_values: Sequence[int] = BODY_VALUES,
                 body_height_mm: float = DEFAULT_BODY_HEIGHT_MM) -> list[tuple[int, int, int]]:
    """One centre (voxel index) per vertebral-body component, top to bottom (ascending
    index along ``axis``). ``lr_axis``: the left-right axis, excluded from the erosion
    (default: the axis with clearly the largest spacing, if any)."""
    import cc3d

    body = np.isin(semantic, np.asarray(body_values))
    if not body.any():
        return []
    sl = ndimage.find_objects(body.astype(np.uint8))[0]
    pad = [(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(sl, body.shape)]
    sub = body[tuple(slice(a, b) for a, b in pad)]
    work = _erode_in_plane(sub, spacing, erosion, lr_axis) if erosion > 0 else sub
    labels: np.ndarray
    labels, n = cc3d.connected_components(work.astype(np.uint8), connectivity=6, return_N=True)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(sizes >= corpus_size_cleaning)
    keep = keep[keep > 0]
    if keep.size == 0:
        log.info("no vertebral-body component has %d voxels or more", corpus_size_cleaning)
        return []
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, keep.size + 1)
    labels, n = lut[labels], int(keep.size)
    refs = _reference_heights(labels, n, axis, body_height_mm / float(spacing[axis]))
    labels, n = split_merged_bodies(labels, n, axis=axis, ref_height=refs,
                                    min_size=max(1, corpus_size_cleaning // 2))
    return _component_centres(labels, n, np.array([a for a, _ in pad]), axis)


def cutout_boxes(centres: Sequence[Sequence[int]], cutout_size: Sequence[int],
                 shape: Sequence[int]) -> list[CutoutBox]:
    """The cutout of ``cutout_size`` voxels around each centre (centre at ``size // 2``),
    clipped to the volume; ``dst`` tells where the clipped part lands in the cutout."""
    boxes = []
    for c in centres:
        start = [int(ci) - int(s) // 2 for ci, s in zip(c, cutout_size)]
        src, dst = [], []
        for st, s, n in zip(start, cutout_size, shape):
            a, b = max(st, 0), min(st + int(s), int(n))
            if b <= a:  # centre outside the volume on this axis: empty overlap
                a = b = min(max(st, 0), int(n))
            src.append(slice(a, b))
            dst.append(slice(a - st, a - st + (b - a)))
        boxes.append(CutoutBox(int3(c), int3(start), int3(cutout_size), (src[0], src[1], src[2]),
                               (dst[0], dst[1], dst[2])))
    return boxes


def map_semantic(semantic: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Semantic values -> network input values via a lookup table (unmapped -> 0)."""
    sem = np.asarray(semantic)
    top = max(int(sem.max(initial=0)), max(mapping, default=0)) + 1
    lut = np.zeros(top, dtype=np.uint8)
    for k, v in mapping.items():
        if 0 <= int(k) < top:
            lut[int(k)] = int(v)
    sem = np.clip(sem, 0, top - 1) if sem.min(initial=0) < 0 else sem
    return lut[sem.astype(np.int64, copy=False)]


def extract_cutout(arr: np.ndarray, box: CutoutBox, fill: int = 0) -> np.ndarray:
    out = np.full(box.size, fill, dtype=arr.dtype)
    out[box.dst] = arr[box.src]
    return out


def one_hot(mapped: np.ndarray, n_channels: int) -> np.ndarray:
    """``(n_channels, *shape)`` float32 one-hot of an integer array with values < n_channels."""
    if mapped.size and int(mapped.max()) >= n_channels:
        raise ValueError(f"mapped value {int(mapped.max())} does not fit {n_channels} channels")
    out = np.zeros((n_channels,) + mapped.shape, dtype=np.float32)
    np.put_along_axis(out, mapped[None].astype(np.int64), 1.0, axis=0)
    return out


def make_cutout_input(mapped: np.ndarray, box: CutoutBox, n_channels: int) -> np.ndarray:
    """One-hot input ``(n_channels, *cutout_size)`` of the already mapped volume
    (``map_semantic``) for one cutout; padding is background (channel 0)."""
    return one_hot(extract_cutout(mapped, box), n_channels)
