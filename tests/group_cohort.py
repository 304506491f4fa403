"""Synthetic participant-output trees for the group-level tests and benchmark: what the
participant level leaves in ``output_dir`` (masks, sidecars, morphometry, figure), made from
a handful of exact-geometry column phantoms (``tests/measure_phantoms.py``) with varied sizes
and a few deliberate defects, written under many subject names on grids scaled by a random
factor (a larger or smaller subject), with measurements scaled accordingly."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from spineps.geometry.io import save_volume
from spineps.geometry.volume import Volume

try:
    from tests.measure_phantoms import make_column
except ImportError:  # run from tests/ directly
    from measure_phantoms import make_column

__all__ = ["Template", "make_templates", "write_scan", "make_cohort"]


@dataclass
class Template:
    semantic: Volume
    instance: Volume
    naming: dict
    defect: Optional[str] = None


def make_templates(n: int = 6, *, spacing=(1.2, 1.2, 3.0), defects: bool = True) -> list[Template]:
    """``n`` normal variants (sizes drawn with a fixed seed, spread like adult cohorts: body and
    disc heights about 6-10 %, canal about 10 %, so measurement noise stays below the cohort
    spread) plus, with ``defects``, one with a missing vertebra (a gap), one with a collapsed
    (short) body and one with a disc left out of the instance mask (semantic/instance
    disagreement)."""
    rng = np.random.default_rng(7)
    out = []
    levels = (19, 20, 21, 22, 23)
    for i in range(n):
        ph = make_column(levels=levels, spacing=spacing, body_h_post=float(rng.normal(26, 1.5)),
                         body_h_ant=float(rng.normal(23.5, 1.5)), disc_h=float(rng.normal(9, 1.0)),
                         spine_tilt_deg=float(rng.uniform(5, 20)), grid_oblique_deg=float(rng.uniform(0, 12)),
                         canal_axes=(float(rng.normal(10, 1.0)), float(rng.normal(7, 0.8))),
                         cord_radius=float(rng.normal(4.0, 0.4)))
        naming = {"rule": "sacrum", "confidence": round(min(0.99, 0.8 + 0.02 * i), 2),
                  "levels": ["T12", "L1", "L2", "L3", "L4"]}
        out.append(Template(ph.semantic, ph.instance, naming))
    if defects:
        ph = make_column(levels=levels, spacing=spacing)
        inst = np.asarray(ph.instance.data).copy()
        sem = np.asarray(ph.semantic.data).copy()
        gone = (inst == 21) | (inst == 121) | (inst == 221)
        inst[gone] = 0
        sem[gone] = 0
        out.append(Template(ph.semantic.with_data(sem), ph.instance.with_data(inst),
                            {"rule": "sacrum", "confidence": 0.3, "levels": ["T12", "L1", "L3", "L4"],
                             "warnings": ["a level is missing"]}, "gap"))
        ph = make_column(levels=levels, spacing=spacing, body_h_post=26.0, body_h_ant=23.5)
        # collapse L3 (22): keep only its lower part of the body -> short heights, small volume
        sem = np.asarray(ph.semantic.data).copy()
        inst = np.asarray(ph.instance.data).copy()
        A = ph.instance.affine
        idx = np.argwhere(inst == 22)
        world = idx @ A[:3, :3].T + A[:3, 3]
        z = world @ np.asarray(_axis(ph))
        cut = z > np.percentile(z, 55)
        sel = idx[cut]
        sem[sel[:, 0], sel[:, 1], sel[:, 2]] = 0
        inst[sel[:, 0], sel[:, 1], sel[:, 2]] = 0
        out.append(Template(ph.semantic.with_data(sem), ph.instance.with_data(inst),
                            {"rule": "sacrum", "confidence": 0.9, "levels": ["T12", "L1", "L2", "L3", "L4"]},
                            "collapsed"))
        ph = make_column(levels=levels, spacing=spacing)
        inst = np.asarray(ph.instance.data).copy()
        inst[inst == 121] = 0
        out.append(Template(ph.semantic, ph.instance.with_data(inst),
                            {"rule": "sacrum", "confidence": 0.85, "levels": ["T12", "L1", "L2", "L3", "L4"]},
                            "inconsistent"))
    return out


def _axis(ph) -> list:
    return ph.truth["axis"]


def _sidecar(description: str, source: str, naming: Optional[dict] = None) -> dict:
    d = {"Description": description, "Sources": [source], "Manual": False, "SoftwareName": "spineps",
         "SoftwareVersion": "test"}
    if naming is not None:
        d["LevelNaming"] = naming
    return d


def _scaled(vol: Volume, scale: float) -> Volume:
    aff = vol.affine.copy()
    aff[:3, :3] *= scale
    return Volume(vol.data, aff)


def _scaled_measurements(m, scale: float):
    """Measurements of the same masks on a grid ``scale`` times larger: lengths scale by
    ``scale``, areas by its square, volumes by its cube (the estimators are scale-equivariant
    up to their 0.5 mm profile bins); angles, percentages and ratios do not change."""
    from dataclasses import replace

    from spineps.measure.morphometry import LevelValue

    power = {"mm3": 3, "mm2": 2, "mm": 1}
    vals = [LevelValue(v.level, v.structure, v.measure, v.value * scale ** power.get(v.measure.rsplit("_", 1)[1], 0))
            for v in m.values]
    return replace(m, values=vals, voxel_volume_mm3=m.voxel_volume_mm3 * scale ** 3,
                   spacing=tuple(x * scale for x in m.spacing))


def write_scan(out: Path, stem: str, tpl: Template, *, measurements: bool = True, figure: bool = True,
               scale: float = 1.0, cache: Optional[dict] = None) -> Path:
    """Write one scan's participant outputs as the participant level does (masks, sidecars,
    and optionally morphometry and figure). ``stem``: e.g. ``sub-001_ses-1_acq-sag``.
    ``scale`` enlarges the voxel grid (a bigger or smaller subject with the same anatomy);
    ``cache`` keeps the template's measurements and figure between calls."""
    from spineps.measure.figures import write_figure
    from spineps.measure.scan import measure_scan, morphometry_paths, write_measurements

    cache = {} if cache is None else cache
    parts = stem.split("_")
    folder = out / parts[0]
    if parts[1].startswith("ses-"):
        folder = folder / parts[1]
    folder = folder / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    sem = folder / f"{stem}_desc-spine_dseg.nii.gz"
    ins = folder / f"{stem}_desc-vertebrae_dseg.nii.gz"
    save_volume(_scaled(tpl.semantic, scale), sem, dtype=np.uint8)
    save_volume(_scaled(tpl.instance, scale), ins, dtype=np.uint16)
    src = f"bids:raw:{folder.relative_to(out).as_posix()}/{stem}_T2w.nii.gz"
    if measurements:
        if "m" not in cache:
            cache["m"] = measure_scan(tpl.semantic, tpl.instance, tpl.naming)
        write_measurements(_scaled_measurements(cache["m"], scale), morphometry_paths(sem)[0])
    if figure:
        png = folder / f"{stem}_desc-spine_dseg.png"
        if "png" in cache:
            shutil.copyfile(cache["png"], png)
        else:  # no title: the file is copied to other scans of the cohort
            cache["png"] = write_figure(tpl.semantic, tpl.instance, png)
    (folder / f"{stem}_desc-spine_dseg.json").write_text(json.dumps(_sidecar("semantic", src)))
    (folder / f"{stem}_desc-vertebrae_dseg.json").write_text(json.dumps(_sidecar("instance", src, tpl.naming)))
    return sem


def make_cohort(out: Path, n_scans: int, *, templates: Optional[list[Template]] = None, measurements: bool = True,
                figure: bool = True, scale_sd: float = 0.04) -> list[str]:
    """``n_scans`` scans (``sub-0001_acq-sag`` ...; every 5th subject has two sessions), each
    a template written on a grid scaled by a factor drawn around 1 (sd ``scale_sd``, fixed
    seed), so the cohort's measurements spread continuously. Returns the stems."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "synthetic cohort", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "spineps", "Version": "test"}]}))
    tpls = templates if templates is not None else make_templates()
    stems = []
    subj = 0
    while len(stems) < n_scans:
        subj += 1
        sessions = ["1", "2"] if subj % 5 == 0 else [None]
        for ses in sessions:
            if len(stems) >= n_scans:
                break
            stems.append(f"sub-{subj:04d}" + (f"_ses-{ses}" if ses else "") + "_acq-sag")
    # normal templates fill most scans, each defect template appears now and then
    normal = [t for t in tpls if t.defect is None]
    defect = [t for t in tpls if t.defect is not None]
    rng = np.random.default_rng(11)
    caches: dict[int, dict] = {}
    for k, stem in enumerate(stems):
        tpl = defect[(k // 13) % len(defect)] if defect and k % 13 == 5 else normal[k % len(normal)]
        scale = float(np.clip(rng.normal(1.0, scale_sd), 0.85, 1.15)) if scale_sd else 1.0
        write_scan(out, stem, tpl, measurements=measurements, figure=figure, scale=scale,
                   cache=caches.setdefault(id(tpl), {}))
    return stems
