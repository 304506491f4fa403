"""Finding existing semantic masks: the input of the instance-only path (``spineps instance``).

The instance phase needs no image (paper, section 2.4): a semantic mask with the community
label values (41-49 vertebra parts, 52/53/62 endplates, 60 cord, 61 canal, 100 discs,
26 sacrum) is enough. The masks may come from our own semantic phase, another tool or a
manual segmentation; they only need BIDS-like names that start with ``sub-<label>``, so
that the outputs can be named and placed like those of a participant run.

``discover_semantic_masks`` returns a :class:`~spineps.bids.discovery.Discovery` whose scans
are the masks. Entities that describe the mask itself (``desc``, ``seg``, ``label``,
``mod``) are left out of the scan's entities, so ``sub-01_acq-sag_desc-spine_dseg.nii.gz``
(ours) and ``sub-01_acq-sag_mod-T2w_seg-spine_msk.nii.gz`` (the reference tool's) both give
outputs named ``sub-01_acq-sag_desc-spine_dseg.nii.gz`` / ``..._desc-vertebrae_dseg.nii.gz``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

from spineps.bids.discovery import Discovery, Scan, parse_bids_name
from spineps.errors import NoMatchError
from spineps.settings import DEFAULT_MASK_PATTERN

__all__ = ["DEFAULT_MASK_PATTERN", "MASK_ENTITIES", "discover_semantic_masks", "mask_scan"]

log = logging.getLogger(__name__)

#: ``DEFAULT_MASK_PATTERN`` (from ``spineps.settings``): where ``spineps instance`` looks by
#: default: our own semantic masks (and any other BIDS derivative that names its spine masks
#: ``desc-spine_dseg``)
#: entities that describe the mask, not the scan: not carried into output names
MASK_ENTITIES = ("desc", "seg", "label", "mod")


def mask_scan(path: Union[str, Path], root: Union[str, Path]) -> Scan:
    """A :class:`Scan` for a mask file (``ValueError`` for a name that is not BIDS-like)."""
    entities, suffix, ext = parse_bids_name(Path(path).name)
    if ext not in (".nii", ".nii.gz"):
        raise ValueError(f"not a NIfTI file (.nii or .nii.gz): {Path(path).name}")
    kept = {k: v for k, v in entities.items() if k not in MASK_ENTITIES}
    return Scan(Path(path).absolute(), Path(root).absolute(), kept, suffix, ext)


def discover_semantic_masks(root: Union[str, Path], pattern: str = DEFAULT_MASK_PATTERN, *,
                            participant_labels: Optional[Sequence[str]] = None,
                            session_labels: Optional[Sequence[str]] = None) -> Discovery:
    """Every file under ``root`` that matches the glob ``pattern`` (relative to ``root``;
    ``**`` spans folders).

    A file whose name is not BIDS-like, whose header fails ``read_header``'s checks, or whose
    outputs would have the same name as another mask's is *unusable* (a failed scan of the
    run: named, with the reason, while the others are processed). Masks of other subjects
    or sessions than asked for are skipped. ``NoMatchError`` (exit 18) when the pattern
    matches no file, or the labels select none.
    """
    from spineps.errors import SpinepsError
    from spineps.geometry.io import read_header

    root = Path(root).absolute()
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if not found:
        raise NoMatchError(f"no file under {root} matches {pattern!r} (the semantic masks to start from; "
                           "set --pattern to how they are named)")
    subjects = set(participant_labels or ())
    sessions = set(session_labels or ())
    scans: list[Scan] = []
    skipped: list[tuple[Path, str]] = []
    unusable: list[tuple[Path, str]] = []
    by_key: dict[str, Path] = {}
    for path in found:
        try:
            scan = mask_scan(path, root)
        except ValueError as exc:
            unusable.append((path, f"{exc} (expected sub-<label>[_ses-<label>]_..._<suffix>.nii[.gz])"))
            continue
        if subjects and scan.subject not in subjects:
            skipped.append((path, "subject not selected"))
            continue
        if sessions and scan.session not in sessions:
            skipped.append((path, "session not selected"))
            continue
        if scan.key in by_key:
            unusable.append((path, f"its outputs would have the same names as those of {by_key[scan.key].name} "
                                   f"(both are {scan.key} once desc/seg/label/mod are left out); narrow --pattern"))
            continue
        try:
            read_header(path)  # validated: 3D (or 4D with one volume), sane affine and spacing
        except SpinepsError as exc:
            unusable.append((path, getattr(exc, "reason", None) or str(exc)))
            continue
        by_key[scan.key] = path
        scans.append(scan)
    for path, why in skipped:
        log.debug("skipped %s: %s", path, why)
    for path, why in unusable:
        log.warning("cannot use %s: %s", path, why)
    if not scans and not unusable:
        raise NoMatchError(f"the participant/session labels select none of the {len(found)} mask(s) under {root}")
    log.info("%d semantic mask(s) found under %s (%s)", len(scans), root, pattern)
    return Discovery(scans=scans, skipped=skipped, unusable=unusable)
