"""Annotation fusion (SPINEPS paper section 2.2): several automated label sources for one scan
combined into one 14-structure semantic ("spine") mask, without manual work.

Rule, applied in the order the sources are given:

1. Each source is a label file plus a mapping ``source value -> community semantic value``
   (``spineps.labels``); values the mapping does not name are dropped (counted in the
   report). A source on another grid than the first (reference) source is resampled onto
   the reference grid with nearest neighbour through world coordinates.
2. Sources are added one after another: a voxel takes a source's value only while it is
   still background. A voxel already labelled as a *different* structure is never
   overwritten (the conflict is counted per source and structure pair in the report).
3. Spinal cord (60) is the one exception: cord voxels replace spinal-canal voxels (61),
   whichever source came first, because a canal segmentation covers the whole dural sac and
   the cord lies inside it. Cord voxels outside the canal (``cord_outside``):

   - ``"extend"`` (default): kept where the voxel is background (the canal is taken to
     extend around them); dropped where another structure already claims the voxel;
   - ``"clip"``: dropped unless the voxel is canal (the cord is clipped to the canal).

   Canal voxels never overwrite cord voxels.
4. Endplates (``fill_endplates=True``): along the scan's cranio-caudal axis (the array axis
   nearest to world S-I), a run of background voxels between a vertebral-body voxel (49) and
   a disc voxel (100) no longer than ``max_gap_mm`` is filled with endplate (62); where a
   body voxel touches a disc voxel directly along that axis, the body voxel of the contact
   becomes endplate (``relabel_contacts``). Endplates thus appear only at body/disc
   interfaces, as in the paper's reference masks. Existing 62 voxels of a source are kept.

``fuse_sources`` returns the fused ``Volume`` (uint8, on the reference grid) and a report;
``write_fusion`` writes the mask atomically with a JSON sidecar that records the sources
(paths, SHA-256 checksums, mappings), their order, the rule and the per-structure counts.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from spineps.errors import InputError, UsageError
from spineps.geometry.volume import Volume
from spineps.labels import BODY, CANAL, CORD, DISC, ENDPLATE, INSTANCE_PARTS, SEMANTIC

__all__ = [
    "LabelSource",
    "FusionResult",
    "PRESETS",
    "RULE",
    "parse_mapping",
    "parse_source_spec",
    "fuse_sources",
    "fill_endplate_gaps",
    "cranio_caudal_axis",
    "write_fusion",
    "sha256_of",
]

log = logging.getLogger(__name__)

_SEMANTIC_VALUES = tuple(lab.value for lab in SEMANTIC if lab.value)

#: named mappings for common sources (``--source FILE:PRESET``)
PRESETS: dict[str, dict[int, int]] = {
    # a mask already in the community values (e.g. a SPINEPS output or a corrected reference)
    "spine": {v: v for v in _SEMANTIC_VALUES},
    # vertebra substructures only (41..49), as a subregion tool writes them
    "subregions": {v: v for v in INSTANCE_PARTS},
    # binary masks of single structures
    "cord": {1: CORD},
    "canal": {1: CANAL},
    "body": {1: BODY},
    "disc": {1: DISC},
    "sacrum": {1: 26},
    # a body / disc / canal / sacrum tool with the example coding of the issue
    "body-disc-canal": {1: BODY, 2: DISC, 3: CANAL, 4: 26},
}

#: the rule as recorded in every sidecar
RULE = ("sources are added in the given order; a voxel already labelled as a different structure is never "
        "overwritten, except that spinal cord (60) replaces spinal canal (61); cord outside the canal: "
        "{cord_outside}; endplate fill: {fill}")


def sha256_of(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class LabelSource:
    """One label source: a label volume and the mapping of its values to community values.
    ``path`` is recorded in the report (and used by ``load`` when ``volume`` is None)."""

    mapping: dict[int, int]
    volume: Optional[Volume] = None
    path: Optional[Path] = None
    name: str = ""
    preset: Optional[str] = None

    def __post_init__(self) -> None:
        self.mapping = {int(k): int(v) for k, v in dict(self.mapping).items()}
        if self.path is not None:
            self.path = Path(self.path)
        if not self.name:
            self.name = self.path.name if self.path is not None else "source"
        bad = {v for v in self.mapping.values() if v != 0 and v not in _SEMANTIC_VALUES}
        if bad:
            raise UsageError(f"source {self.name}: mapping targets {sorted(bad)} are no semantic label values "
                             f"(known: {list(_SEMANTIC_VALUES)})")

    @classmethod
    def from_file(cls, path: Union[str, Path], mapping: Union[str, Mapping[int, int]]) -> "LabelSource":
        """A source read from ``path`` (validated by ``load_volume``); ``mapping`` is a dict,
        a preset name or a ``"1=49,2=100"`` string."""
        preset = mapping if isinstance(mapping, str) and mapping.strip().lower() in PRESETS else None
        m = parse_mapping(mapping) if isinstance(mapping, str) else dict(mapping)
        return cls(mapping=m, path=Path(path), preset=preset)

    def load(self) -> Volume:
        if self.volume is None:
            if self.path is None:
                raise UsageError(f"source {self.name} has neither a volume nor a path")
            from spineps.geometry.io import load_volume

            self.volume = load_volume(self.path, kind="label")
        return self.volume


@dataclass
class FusionResult:
    semantic: Volume
    report: dict[str, Any] = field(default_factory=dict)


def parse_mapping(text: str) -> dict[int, int]:
    """``"1=49,2=100,3=61"`` (targets may be registry names: ``"1=body,2=disc"``) or a
    preset name (``PRESETS``) -> ``{1: 49, 2: 100, 3: 61}``."""
    from spineps.labels import resolve_label

    key = text.strip().lower()
    if key in PRESETS:
        return dict(PRESETS[key])
    out: dict[int, int] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise UsageError(f"label mapping item {item!r} is not SOURCE=TARGET (mapping {text!r}; "
                             f"presets: {', '.join(sorted(PRESETS))})")
        src, dst = (s.strip() for s in item.split("=", 1))
        try:
            s_val = int(src)
            d_val = resolve_label(dst)
        except (KeyError, ValueError):
            raise UsageError(f"label mapping item {item!r}: source must be an integer and target a label value "
                             f"or name") from None
        if s_val in out and out[s_val] != d_val:
            raise UsageError(f"label mapping {text!r} maps source value {s_val} twice")
        out[s_val] = d_val
    if not out:
        raise UsageError(f"empty label mapping {text!r}")
    return out


def parse_source_spec(spec: str) -> LabelSource:
    """``"PATH:MAPPING"`` (split at the last colon; MAPPING as in ``parse_mapping``) or a bare
    ``PATH`` (taken as already in community values, preset ``spine``)."""
    path, sep, mapping = spec.rpartition(":")
    if not sep or "=" not in mapping and mapping.strip().lower() not in PRESETS:
        if sep and not Path(spec).exists() and Path(path).exists():
            raise UsageError(f"--source {spec!r}: {mapping!r} is neither SRC=DST pairs nor a preset "
                             f"({', '.join(sorted(PRESETS))})")
        return LabelSource.from_file(spec, "spine")
    return LabelSource.from_file(path, mapping)


def cranio_caudal_axis(affine: np.ndarray) -> int:
    """The array axis that points nearest to world S-I."""
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    cos = np.abs(rot[2, :]) / np.linalg.norm(rot, axis=0)
    return int(np.argmax(cos))


def _lut(mapping: Mapping[int, int], max_value: int) -> np.ndarray:
    lut = np.zeros(max(max_value, max(mapping, default=0)) + 1, dtype=np.uint8)
    for k, v in mapping.items():
        if k >= 0:
            lut[k] = v
    return lut


def _neighbour_along(arr: np.ndarray, axis: int, reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel, the index along ``axis`` of the nearest non-zero voxel strictly before
    it (``reverse``: strictly after it) and that voxel's value (index -1/len and 0 if none)."""
    n = arr.shape[axis]
    shape = [1, 1, 1]
    shape[axis] = n
    idx = np.arange(n).reshape(shape)
    nz = arr != 0
    if not reverse:
        pos = np.where(nz, idx, -1)
        pos = np.maximum.accumulate(pos, axis=axis)
        # strictly before: shift by one
        prev = np.full_like(pos, -1)
        sl_dst = [slice(None)] * 3
        sl_src = [slice(None)] * 3
        sl_dst[axis], sl_src[axis] = slice(1, None), slice(None, -1)
        prev[tuple(sl_dst)] = pos[tuple(sl_src)]
        pos = prev
    else:
        rev = [slice(None)] * 3
        rev[axis] = slice(None, None, -1)
        pos = np.where(nz, idx, n)[tuple(rev)]
        pos = np.minimum.accumulate(pos, axis=axis)[tuple(rev)]
        nxt = np.full_like(pos, n)
        sl_dst = [slice(None)] * 3
        sl_src = [slice(None)] * 3
        sl_dst[axis], sl_src[axis] = slice(None, -1), slice(1, None)
        nxt[tuple(sl_dst)] = pos[tuple(sl_src)]
        pos = nxt
    valid = (pos >= 0) & (pos < n)
    val = np.take_along_axis(arr, np.clip(pos, 0, n - 1), axis=axis)
    return pos, np.where(valid, val, 0)


def fill_endplate_gaps(semantic: np.ndarray, axis: int, *, max_gap: int, relabel_contacts: bool = True,
                   body: int = BODY, disc: int = DISC, endplate: int = ENDPLATE) -> tuple[np.ndarray, dict[str, int]]:
    """Fill background runs of at most ``max_gap`` voxels between body and disc along ``axis``
    with ``endplate``; with ``relabel_contacts``, body voxels touching a disc voxel directly
    along ``axis`` become ``endplate``. Works on the bounding box of body and disc; returns a
    new array and the voxel counts of both steps."""
    from spineps.geometry.cropping import bbox_of

    out = np.array(semantic, copy=True)
    counts = {"gap_filled": 0, "contacts_relabelled": 0}
    both = (semantic == body) | (semantic == disc)
    box = bbox_of(both)
    if box is None or not (semantic == body).any() or not (semantic == disc).any():
        return out, counts
    sub = out[box]
    if max_gap > 0:
        p_idx, p_val = _neighbour_along(sub, axis, reverse=False)
        n_idx, n_val = _neighbour_along(sub, axis, reverse=True)
        pair = ((p_val == body) & (n_val == disc)) | ((p_val == disc) & (n_val == body))
        gap = (sub == 0) & pair & ((n_idx - p_idx - 1) <= max_gap)
        sub[gap] = endplate
        counts["gap_filled"] = int(gap.sum())
    if relabel_contacts:
        b, d = sub == body, sub == disc
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        lo_t, hi_t = tuple(lo), tuple(hi)
        contact = np.zeros_like(b)
        contact[lo_t] |= b[lo_t] & d[hi_t]   # body above/before a disc voxel
        contact[hi_t] |= b[hi_t] & d[lo_t]   # body after a disc voxel
        sub[contact] = endplate
        counts["contacts_relabelled"] = int(contact.sum())
    out[box] = sub
    return out, counts


def _describe_source(src: LabelSource, vol: Volume, resampled: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": src.name,
        "path": str(src.path) if src.path is not None else None,
        "sha256": sha256_of(src.path) if src.path is not None and Path(src.path).is_file() else None,
        "mapping": {str(k): v for k, v in sorted(src.mapping.items())},
        "preset": src.preset,
        "shape": list(vol.shape),
        "resampled_to_reference": resampled,
    }
    return entry


def fuse_sources(sources: Sequence[LabelSource], *, fill_endplates: bool = True, max_gap_mm: float = 4.0,
                 relabel_contacts: bool = True, cord_outside: str = "extend") -> FusionResult:
    """Fuse ``sources`` (in priority order, the first defines the grid) by the rule of the
    module docstring. Raises ``UsageError`` for bad arguments and ``InputError`` (naming the
    file) for a source that does not overlap the reference grid or holds non-integer labels."""
    from spineps.geometry.resampling import resample_to_grid

    if not sources:
        raise UsageError("fusion needs at least one label source")
    if cord_outside not in ("extend", "clip"):
        raise UsageError(f"cord_outside must be 'extend' or 'clip', got {cord_outside!r}")
    ref = sources[0].load()
    out = np.zeros(ref.shape, dtype=np.uint8)
    report: dict[str, Any] = {"sources": [], "order": [], "reference_grid": {
        "shape": list(ref.shape), "spacing": [round(s, 6) for s in ref.spacing], "axcodes": list(ref.axcodes),
        "affine": np.round(ref.affine, 6).tolist()}}
    for k, src in enumerate(sources):
        vol = src.load()
        where = src.path if src.path is not None else src.name
        data = np.asarray(vol.data)
        if not np.issubdtype(data.dtype, np.integer) and not np.issubdtype(data.dtype, np.bool_):
            if not np.all(np.equal(np.mod(data, 1), 0)):
                raise InputError("label source holds non-integer values", where)
        resampled = False
        had_mapped = bool(np.isin(data, [k for k, v in src.mapping.items() if v != 0]).any())
        if not vol.same_grid(ref):
            vol = resample_to_grid(vol, ref.shape, ref.affine, order=0, fill=0)
            resampled = True
            log.info("source %s resampled (nearest) onto the reference grid %s", src.name, ref.shape)
        data = np.asarray(vol.data).astype(np.int64, copy=False)
        if data.min(initial=0) < 0:
            raise InputError("label source holds negative values", where)
        present = np.unique(data)
        unmapped = [int(v) for v in present if v != 0 and v not in src.mapping]
        mapped = _lut(src.mapping, int(present.max(initial=0)))[data]
        entry = _describe_source(src, vol, resampled)
        entry["unmapped_values"] = unmapped
        if resampled and had_mapped and not mapped.any():
            raise InputError("label source does not overlap the reference grid", where)
        is_cord = mapped == CORD
        free = out == 0
        take = (mapped != 0) & (free | (is_cord & (out == CANAL)))
        if cord_outside == "clip":
            outside = is_cord & free
            take &= ~outside
            if outside.any():
                entry["cord_clipped_outside_canal"] = int(outside.sum())
        else:
            outside = int((is_cord & free).sum())
            if outside:
                entry["cord_outside_canal_kept"] = outside
        clash = (mapped != 0) & ~take & (out != mapped)
        conflicts: dict[str, int] = {}
        if clash.any():
            code = mapped[clash].astype(np.int64) * 256 + out[clash]
            for c, n in zip(*np.unique(code, return_counts=True)):
                conflicts[f"{int(c) // 256}->{int(c) % 256}"] = int(n)
        vals, cnt = np.unique(mapped[take], return_counts=True)
        added = {str(int(v)): int(n) for v, n in zip(vals, cnt)}
        out[take] = mapped[take]
        entry["added"] = added
        entry["conflicts_not_overwritten"] = conflicts
        report["sources"].append(entry)
        report["order"].append(src.name)
    fill_info: dict[str, Any] = {"enabled": bool(fill_endplates)}
    if fill_endplates:
        axis = cranio_caudal_axis(ref.affine)
        max_gap = max(1, int(round(max_gap_mm / ref.spacing[axis])))
        out, counts = fill_endplate_gaps(out, axis, max_gap=max_gap, relabel_contacts=relabel_contacts)
        fill_info.update({"axis": axis, "max_gap_mm": max_gap_mm, "max_gap_voxels": max_gap,
                          "relabel_contacts": relabel_contacts, **counts})
    report["endplates"] = fill_info
    report["rule"] = RULE.format(cord_outside=cord_outside,
                                 fill=(f"background runs <= {max_gap_mm} mm between body (49) and disc (100) along "
                                       f"the cranio-caudal axis -> endplate (62)"
                                       + ("; body voxels touching a disc -> endplate" if relabel_contacts else ""))
                                 if fill_endplates else "off")
    report["cord_outside"] = cord_outside
    vals, cnt = np.unique(out, return_counts=True)
    report["voxels_per_label"] = {str(int(v)): int(c) for v, c in zip(vals, cnt) if v != 0}
    return FusionResult(Volume(out, ref.affine.copy()), report)


def write_fusion(result: FusionResult, path: Union[str, Path], *, extra: Optional[Mapping[str, Any]] = None
                 ) -> tuple[Path, Path]:
    """Write the fused mask (atomically, uint8) and its JSON sidecar (same name, ``.json``).
    Returns both paths."""
    from spineps import __version__ as version  # the package version, for provenance
    from spineps.fsutil import write_json_atomic
    from spineps.geometry.io import save_volume

    path = Path(path)
    name = path.name
    if not (name.endswith(".nii.gz") or name.endswith(".nii")):
        raise UsageError(f"fused mask must be written as .nii or .nii.gz, got {path}")
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    side = path.with_name(stem + ".json")
    save_volume(result.semantic, path, dtype=np.uint8)
    sidecar = {"Description": "semantic spine mask fused from automated label sources (SPINEPS section 2.2)",
               "SpinepsVersion": version, "Fusion": result.report, **dict(extra or {})}
    write_json_atomic(side, sidecar)
    return path, side
