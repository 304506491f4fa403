"""How close the training phantoms' contrast is to the real scans': median z-scored intensity
per structure and the body-minus-disc contrast, per group of training cases.

    .venv/bin/python benchmarks/phantom_contrast.py --raw WORK/raw/Dataset731_SpinepsT2wSemantic
        [--json benchmarks/results/phantom_contrast.json]

``--raw`` is the nnU-Net raw folder that ``python -m spineps.training.semantic`` exports
(images as the network sees them before its z-scoring: intensity-shifted, capped, N4 on the
real scans; targets with the ignore label). Each image is z-scored over the whole volume
(nnU-Net's ``ZScoreNormalization`` without a mask); per case the median of each labelled
structure is taken (real scans: only what their targets label — bodies, discs, S1, certain
background), then the median over the cases of a group: realistic phantoms (``phantom``,
even index), domain-randomised phantoms (odd index), and each real set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STRUCTURES = {"body": 49, "disc": 100, "canal": 61, "cord": 60, "sacrum": 26, "arcus": 41}


def group_of(case: str) -> str:
    if case.startswith("phantom_"):
        return "phantom_realistic" if int(case.split("_")[1]) % 2 == 0 else "phantom_randomised"
    return case.split("_")[0]


def case_medians(image: np.ndarray, target: np.ndarray) -> dict[str, float]:
    from spineps.training.semantic import LABEL_ORDER

    z = (image - image.mean()) / max(float(image.std()), 1e-6)
    out = {}
    for name, value in {**STRUCTURES, "background": 0}.items():
        m = target == (0 if value == 0 else LABEL_ORDER.index(value) + 1)
        if m.sum() > 100:
            out[name] = float(np.median(z[m]))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "phantom_contrast.json")
    a = ap.parse_args(argv)
    import nibabel as nib

    groups: dict[str, list[dict[str, float]]] = {}
    for lab_p in sorted((a.raw / "labelsTr").glob("*.nii.gz")):
        case = lab_p.name[: -len(".nii.gz")]
        img = np.asarray(nib.load(str(a.raw / "imagesTr" / f"{case}_0000.nii.gz")).dataobj, dtype=np.float32)
        groups.setdefault(group_of(case), []).append(case_medians(img, np.asarray(nib.load(str(lab_p)).dataobj)))
    table = {}
    for g, rows in groups.items():
        med = {n: round(float(np.median([r[n] for r in rows if n in r])), 3)
               for n in [*STRUCTURES, "background"] if any(n in r for r in rows)}
        bd = [r["body"] - r["disc"] for r in rows if "body" in r and "disc" in r]
        table[g] = {"cases": len(rows), "median_z": med,
                    "body_minus_disc": None if not bd else {
                        "median": round(float(np.median(bd)), 3), "p10": round(float(np.percentile(bd, 10)), 3),
                        "p90": round(float(np.percentile(bd, 90)), 3)}}
        bmd = table[g]["body_minus_disc"]
        print(f"{g:20s} {len(rows):3d} cases  " + "  ".join(f"{k} {v:+.2f}" for k, v in med.items())
              + (f"  body-disc {bmd['median']:+.2f} [{bmd['p10']:+.2f}, {bmd['p90']:+.2f}]" if bmd else ""))
    from spineps.fsutil import write_json_atomic

    a.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.json, {"date": time.strftime("%Y-%m-%d"), "groups": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
