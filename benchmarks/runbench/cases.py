"""The benchmark cases: each a one-scan BIDS dataset under ``--work`` (made once, reused
while the case is unchanged); phantoms come with their ground-truth semantic mask."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("run_benchmark")

REPO = Path(__file__).resolve().parents[2]
REAL_LUMBAR = REPO.parent / "shared" / "data" / "real" / "SCT" / "sub-sctlumbar_T2w.nii.gz"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "spineps-benchmark"


@dataclass(frozen=True)
class CaseSpec:
    name: str
    description: str
    fov: Optional[str] = None  # phantom field of view; None: a file
    spacing: tuple[float, float, float] = (0.75, 0.75, 3.3)  # P, I, R (mm)
    stations: int = 1
    seed: int = 0
    path: Optional[Path] = None

    def key(self) -> str:
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                           if k != "description"}, sort_keys=True)

CASES: dict[str, CaseSpec] = {
    "whole": CaseSpec("whole", "whole-spine phantom C1-sacrum, 0.75x0.75 mm in-plane, 3.3 mm sagittal slices, "
                      "3 stitched stations", fov="whole", stations=3, seed=4242),
    "lumbar": CaseSpec("lumbar", "lumbar phantom, 0.75x0.75 mm in-plane, 3.3 mm sagittal slices", fov="lumbar",
                       seed=4243),
    "real": CaseSpec("real", "real lumbar scan (SCT testing data, sub-sctlumbar_T2w)", path=REAL_LUMBAR),
    "tiny": CaseSpec("tiny", "small coarse lumbar phantom (smoke test)", fov="lumbar", spacing=(3.0, 3.0, 6.0),
                     seed=7),
}

@dataclass
class PreparedCase:
    spec: CaseSpec
    bids_dir: Path
    image: Path
    truth: Optional[Path]  # phantom ground-truth semantic mask

def prepare_case(spec: CaseSpec, work: Path) -> Optional[PreparedCase]:
    """A one-scan BIDS dataset for ``spec`` under ``work/inputs/<name>`` (made once, reused
    while the spec is unchanged). ``None`` when the case's file is absent."""
    import nibabel as nib
    import numpy as np

    root = work / "inputs" / spec.name
    bids = root / "bids"
    sub = f"sub-{spec.name}"
    image = bids / sub / "anat" / f"{sub}_acq-sag_T2w.nii.gz"
    truth = root / "truth_semantic.nii.gz" if spec.fov else None
    stamp = root / "spec.json"
    if stamp.is_file() and stamp.read_text() == spec.key() and image.exists():
        return PreparedCase(spec, bids, image, truth)
    if spec.path is not None and not Path(spec.path).is_file():
        log.warning("case %s skipped: %s is absent", spec.name, spec.path)
        return None
    shutil.rmtree(root, ignore_errors=True)
    image.parent.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": f"spineps benchmark {spec.name}",
                                                               "BIDSVersion": "1.9.0"}))
    if spec.fov is None:
        shutil.copyfile(Path(str(spec.path)), image)  # a copy outside the repository (never committed)
    else:
        from spineps.synth.anatomy import PhantomSpec, make_phantom
        from spineps.synth.render import render_t2w

        t0 = time.perf_counter()
        ph = make_phantom(PhantomSpec(seed=spec.seed, fov=spec.fov, spacing=spec.spacing,
                                      orientation=("P", "I", "R"), stations=spec.stations))
        img = render_t2w(ph, seed=spec.seed, stations=spec.stations)
        nib.save(nib.Nifti1Image(np.asarray(img.data, np.float32), img.affine), str(image))
        nib.save(nib.Nifti1Image(np.asarray(ph.semantic.data, np.uint8), ph.semantic.affine), str(truth))
        log.info("made case %s %s in %.1f s", spec.name, img.shape, time.perf_counter() - t0)
    stamp.write_text(spec.key())
    return PreparedCase(spec, bids, image, truth)
