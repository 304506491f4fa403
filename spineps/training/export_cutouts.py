"""Training cutouts for the instance phase (SPINEPS section 2, appendix A).

From a semantic mask and its instance mask (any orientation and spacing), for every
vertebra with a vertebral body (49) in the field of view:

1. both masks are reoriented to ``orientation`` (exact) and resampled to ``spacing``
   (nearest neighbour), the grid the instance model works on;
2. the cutout centre is the rounded centre of mass of that vertebra's body voxels;
3. a cutout of ``cutout_size`` voxels around it (``spineps.geometry.crop_or_pad``: the centre
   voxel sits at index ``size // 2``, zero outside the volume);
4. the *input* is the semantic cutout mapped through ``mapping`` (semantic value -> network
   input value, default ``spineps.labels.DEFAULT_INSTANCE_MAPPING``: 41..49 -> 1..9,
   sacrum and everything else -> 0); the *target* is 2 on the centre vertebra, 1 on the
   vertebra above it and 3 on the one below (anatomical order of the instance values,
   ``spineps.labels.VERTEBRA_ORDER``; neighbours are the next vertebrae *present* in the
   mask), 0 elsewhere, and only where the input is non-zero (the network sees nothing else).
   The sacrum (26) is never a cutout centre nor a target, as in the released model
   (``sacrum_ids``).

``write_cutouts`` stores each cutout as a compressed ``.npz`` (atomically) with ``input``
(uint8), ``target`` (uint8), and, for augmentation pipelines that work on raw values
(``spineps.training.instance.augment`` / ``make_target``), the raw ``semantic`` and
``instance`` cutouts, plus ``ids`` (above, centre, below; 0 = none), ``centre`` (voxel on the
resampled grid), ``spacing`` and ``orientation``. ``load_cutout`` reads one back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from spineps.errors import InputError, UsageError
from spineps.geometry.volume import Volume, float3, int3, str3

__all__ = ["Cutout", "export_cutouts", "write_cutouts", "load_cutout", "vertebra_order"]

log = logging.getLogger(__name__)

BODY = 49
SACRUM = 26


@dataclass(frozen=True, eq=False)
class Cutout:
    """One training cutout. ``above``/``below`` are 0 where no such vertebra is in the mask."""

    centre_id: int
    above: int
    below: int
    centre: tuple[int, int, int]  # voxel on the resampled grid
    input: np.ndarray  # uint8 mapped semantic values
    target: np.ndarray  # uint8 0/1/2/3
    semantic: np.ndarray  # raw semantic values (uint8)
    instance: np.ndarray  # raw instance values (uint16)
    spacing: tuple[float, float, float]
    orientation: tuple[str, str, str]


def vertebra_order(ids: Sequence[int]) -> list[int]:
    """``ids`` (vertebra instance values) sorted top to bottom."""
    from spineps.labels import VERTEBRA_ORDER

    rank = {v: i for i, v in enumerate(VERTEBRA_ORDER)}
    unknown = [v for v in ids if v not in rank]
    if unknown:
        raise ValueError(f"{unknown} are no vertebra instance values")
    return sorted(ids, key=lambda v: rank[v])


def _mapping_lut(mapping: Mapping[int, int], max_value: int) -> np.ndarray:
    lut = np.zeros(max(max_value, max(mapping, default=0)) + 1, dtype=np.uint8)
    for k, v in mapping.items():
        lut[int(k)] = int(v)
    return lut


def export_cutouts(semantic: Volume, instance: Volume, *, spacing: Sequence[float],
                   orientation: Sequence[str] = ("P", "I", "R"), cutout_size: Sequence[int] = (248, 304, 64),
                   mapping: Optional[Mapping[int, int]] = None, min_body_voxels: int = 1,
                   name: str = "case") -> list[Cutout]:
    """All cutouts of one scan, top to bottom (see the module docstring). ``cutout_size`` must
    be divisible by 8 (the instance U-Net needs it). Vertebrae with fewer than
    ``min_body_voxels`` body voxels on the resampled grid get no cutout."""
    from scipy import ndimage

    from spineps.geometry.cropping import crop_or_pad
    from spineps.geometry.orientation import to_orientation
    from spineps.geometry.resampling import resample_to_grid, to_spacing
    from spineps.labels import DEFAULT_INSTANCE_MAPPING, VERTEBRA_VALUES

    size = tuple(int(s) for s in cutout_size)
    if len(size) != 3 or any(s < 8 or s % 8 for s in size):
        raise UsageError(f"cutout_size must be three multiples of 8, got {tuple(cutout_size)}")
    mapping = dict(DEFAULT_INSTANCE_MAPPING if mapping is None else mapping)
    if not instance.same_grid(semantic, atol=1e-3):
        if instance.shape != semantic.shape:
            raise InputError("instance mask is not on the semantic mask's grid (shape "
                             f"{instance.shape} vs {semantic.shape})", name)
        log.warning("%s: instance and semantic affines differ slightly; using the semantic one", name)
        instance = Volume(instance.data, semantic.affine)
    sem, _ = to_orientation(semantic, orientation)
    inst, _ = to_orientation(instance, orientation)
    sem = to_spacing(sem, spacing, order=0)
    inst = resample_to_grid(inst, sem.shape, sem.affine, order=0)
    s = np.asarray(sem.data)
    if s.min(initial=0) < 0 or s.max(initial=0) > 255:
        raise InputError("semantic mask values must lie in 0..255", name)
    s = s.astype(np.uint8)
    i = np.asarray(inst.data).astype(np.uint16)
    body_inst = np.where(s == BODY, i, 0)
    ids = [int(v) for v in np.unique(body_inst) if v in VERTEBRA_VALUES and v != SACRUM]
    if not ids:
        log.info("%s: no vertebra with body voxels; no cutouts", name)
        return []
    counts = ndimage.sum_labels(np.ones_like(body_inst, dtype=np.float32), body_inst, ids)
    ids = [v for v, c in zip(ids, counts) if c >= min_body_voxels]
    centres = ndimage.center_of_mass(np.ones_like(body_inst, dtype=np.float32), body_inst, ids)
    centre_of = {v: tuple(int(np.floor(x + 0.5)) for x in c) for v, c in zip(ids, centres)}
    # every vertebra present in the mask (body or not) may be a neighbour
    present = vertebra_order([int(v) for v in np.unique(i) if v in VERTEBRA_VALUES and v != SACRUM])
    lut_in = _mapping_lut(mapping, int(s.max(initial=0)))
    out: list[Cutout] = []
    for v in vertebra_order(ids):
        k = present.index(v)
        above = present[k - 1] if k > 0 else 0
        below = present[k + 1] if k + 1 < len(present) else 0
        c = centre_of[v]
        sem_c = crop_or_pad(s, c, size)
        inst_c = crop_or_pad(i, c, size)
        inp = lut_in[sem_c]
        tlut = np.zeros(int(max(inst_c.max(initial=0), v, above, below)) + 1, dtype=np.uint8)
        if above:
            tlut[above] = 1
        tlut[v] = 2
        if below:
            tlut[below] = 3
        target = tlut[inst_c]
        target[inp == 0] = 0
        out.append(Cutout(v, above, below, int3(c), inp, target, sem_c, inst_c, float3(sem.spacing), str3(orientation)))
    log.info("%s: %d cutouts of %s", name, len(out), size)
    return out


def write_cutouts(cutouts: Sequence[Cutout], out_dir: Union[str, Path], case: str, *, keep_raw: bool = True
                  ) -> list[Path]:
    """One compressed ``<case>_vert-<id>.npz`` per cutout in ``out_dir`` (atomic). Returns the paths."""
    from spineps.fsutil import atomic_path

    out_dir = Path(out_dir)
    paths = []
    for c in cutouts:
        path = out_dir / f"{case}_vert-{c.centre_id:02d}.npz"
        arrays: dict[str, Any] = {
            "input": c.input, "target": c.target, "ids": np.array([c.above, c.centre_id, c.below], np.int32),
            "centre": np.array(c.centre, np.int32), "spacing": np.array(c.spacing, np.float64),
            "orientation": np.array("".join(c.orientation))}
        if keep_raw:
            arrays["semantic"] = c.semantic
            arrays["instance"] = c.instance
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
        paths.append(path)
    return paths


def load_cutout(path: Union[str, Path]) -> Cutout:
    """Read a cutout written by ``write_cutouts`` (``InputError`` naming the file if it is not one)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = [int(x) for x in z["ids"]]
            inp, target = z["input"], z["target"]
            sem = z["semantic"] if "semantic" in z.files else np.zeros_like(inp)
            inst = z["instance"] if "instance" in z.files else np.zeros(inp.shape, np.uint16)
            centre = int3(z["centre"])
            spacing = float3(z["spacing"])
            orientation = str3(str(z["orientation"]))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"not a cutout file ({type(exc).__name__}: {exc})", path) from None
    return Cutout(ids[1], ids[0], ids[2], centre, inp, target, sem, inst, spacing, orientation)
