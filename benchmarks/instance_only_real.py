"""The instance-only path (``spineps instance``) on the real manual body masks.

    .venv/bin/python benchmarks/instance_only_real.py [--instance-model DIR] [--nprocs 2]
        [--json benchmarks/results/instance_only_real.json]

``../shared/data/real/VB2`` (17 lumbar scans, bodies T11-L5 labelled) and ``VB3`` (15 scans,
L1-L5): their ``*_desc-spine_dseg.nii.gz`` (value 49 on each body, nothing else) go through
``spineps instance`` with the bundled instance model (or ``--instance-model``); each manual
body (``*_desc-vert_dseg.nii.gz``) is matched with the predicted vertebra that covers most of
it. Per dataset: scans, bodies, bodies found exactly once (one predicted vertebra each, none
shared, none extra), the instance Dice of each match (min / median), the network time per
scan (``instance_forward`` of the sidecars' timings) and, on VB3 only, the level names that
agree with the manual ones. VB2's manual level values are not anatomical in most scans
(numbered bottom-up or permuted; README "Limits"), so its names are not scored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
DATASETS = (("VB2", False), ("VB3", True))  # (folder, score level names)


def _data(path: Path) -> Any:
    import nibabel as nib
    import numpy as np

    return np.asarray(nib.load(str(path)).dataobj)


def score(masks: Path, out: Path, names: bool) -> dict[str, Any]:
    """Match every manual body with the predicted vertebra covering most of it."""
    import numpy as np

    scans: list[dict[str, Any]] = []
    for ref_path in sorted(masks.glob("*_desc-vert_dseg.nii.gz")):
        sub = ref_path.name.split("_")[0]
        stem = out / sub / "anat" / f"{sub}_desc-vertebrae_dseg"
        ref, pred = _data(ref_path), _data(stem.with_name(stem.name + ".nii.gz"))
        ref_ids = [int(v) for v in np.unique(ref) if v > 0]
        pred_ids = [int(v) for v in np.unique(pred) if 0 < v < 30]
        matches, dice = [], []
        for r in ref_ids:
            a = ref == r
            vals, counts = np.unique(pred[a], return_counts=True)
            counts = np.where(vals > 0, counts, -1)
            v = int(vals[int(np.argmax(counts))]) if counts.max() > 0 else 0
            b = pred == v
            dice.append(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)) if v else 0.0)
            matches.append(v)
        once = len(set(matches)) == len(matches) and 0 not in matches and len(pred_ids) == len(ref_ids)
        side = json.loads(stem.with_name(stem.name + ".json").read_text())
        scans.append({"scan": sub, "bodies": len(ref_ids), "predicted_vertebrae": len(pred_ids), "each_once": once,
                      "dice": [round(float(d), 4) for d in dice],
                      "names_right": sum(int(m == r) for m, r in zip(matches, ref_ids)) if names else None,
                      "network_s": side.get("Timings", {}).get("instance_forward")})
    dices = [d for s in scans for d in s["dice"]]
    net = [s["network_s"] for s in scans if isinstance(s["network_s"], (int, float))]
    return {"scans": len(scans), "bodies": sum(s["bodies"] for s in scans),
            "bodies_found_once": sum(s["bodies"] for s in scans if s["each_once"]),
            "scans_each_body_once": sum(int(s["each_once"]) for s in scans),
            "min_dice": round(min(dices), 3) if dices else None,
            "median_dice": round(statistics.median(dices), 3) if dices else None,
            "names_right": sum(s["names_right"] for s in scans) if names else None,
            "median_network_s": round(statistics.median(net), 2) if net else None, "per_scan": scans}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instance-model", type=Path, default=None, help="default: the bundled instance model")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--real", type=Path, default=REAL)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "instance_only_real.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from spineps.cli.main import main as spineps_main
    from spineps.models.registry import BUNDLED_INSTANCE, bundled_model_dir
    from spineps.models.folder import folder_checksum

    model = args.instance_model or bundled_model_dir(BUNDLED_INSTANCE)
    if model is None or not args.real.is_dir():
        print(f"nothing to do: instance model {model}, real data {args.real}", file=sys.stderr)
        return 66
    import os

    result: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "loadavg_start": list(os.getloadavg()),
                              "instance_model": str(model), "checksum": f"sha256:{folder_checksum(model)}",
                              "nprocs": args.nprocs, "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="spineps-instance-only-") as tmp:
        for name, names in DATASETS:
            masks = args.real / name
            if not any(masks.glob("*_desc-spine_dseg.nii.gz")):
                continue
            out = Path(tmp) / name
            rc = spineps_main(["instance", str(masks), str(out), "--pattern", "*_desc-spine_dseg.nii.gz",
                               "--instance-model", str(model), "--nprocs", str(args.nprocs)])
            if rc != 0:
                print(f"{name}: spineps instance exited {rc}", file=sys.stderr)
                return rc
            result["datasets"][name] = score(masks, out, names)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for name, r in result["datasets"].items():
        named = f", names {r['names_right']}/{r['bodies']}" if r["names_right"] is not None else ""
        print(f"{name}: {r['scans']} scans, {r['bodies_found_once']}/{r['bodies']} bodies found exactly once, "
              f"instance Dice min {r['min_dice']} median {r['median_dice']}{named}, "
              f"network {r['median_network_s']} s per scan (median)")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
