"""The README's quick start, measured: the demo dataset, the participant and group levels
with the bundled models, then ``spineps evaluate`` against the demo's reference masks.

    .venv/bin/python benchmarks/demo_quickstart.py [--json benchmarks/results/demo_quickstart.json]

Each command runs in a fresh process (``run.py``, as a user would run ``spineps``), with the
default settings (``--precision auto``), and once more at ``--precision fp32``. Records the
wall time of every command with the machine's load average (the timings only mean something
on idle cores), the evaluation summary (mean over the demo's scans) of both runs, and how
many voxels of the two runs' masks carry the same label. The quality numbers depend only
on the code, the bundled models and the CPU's arithmetic; the README quotes them and
``tests/test_readme_numbers.py`` ties them to this JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# (structure, metric) rows of evaluation_summary.tsv the README quotes
QUOTED = [("vertebral_body", "dice"), ("intervertebral_disc", "dice"), ("spinal_canal", "dice"),
          ("arcus_vertebrae", "dice"), ("vertebra", "dice"), ("vertebra_instances", "rq"),
          ("vertebra_instances", "pq"), ("disc_instances", "rq"), ("vertebra_instances", "level_accuracy"),
          ("vertebra_instances", "level_offset_median")]


def _timed(args: list[str], env: dict[str, str]) -> float:
    """Wall time of ``run.py ARGS`` in a fresh process; a failure stops the benchmark."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run.py {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return round(time.perf_counter() - t0, 2)


def _summary(eval_dir: Path) -> dict[str, float]:
    """``structure/metric`` -> mean over the scans, for the quoted rows."""
    with open(eval_dir / "evaluation_summary.tsv", newline="") as fh:
        rows = {(r["structure"], r["metric"]): r for r in csv.DictReader(fh, delimiter="\t")}
    return {f"{s}/{m}": float(rows[(s, m)]["mean"]) for s, m in QUOTED}


def _agreement(a: Path, b: Path, desc: str) -> dict[str, Any]:
    """Share of voxels with the same label in the two runs' ``desc-<desc>`` masks, pooled
    over the scans, and the number of scans whose masks are identical."""
    import nibabel as nib
    import numpy as np

    same = total = identical = 0
    masks = sorted(a.rglob(f"*_desc-{desc}_dseg.nii.gz"))
    for mask in masks:
        x = np.asarray(nib.load(mask).dataobj)
        y = np.asarray(nib.load(b / mask.relative_to(a)).dataobj)
        same += int((x == y).sum())
        total += x.size
        identical += int(np.array_equal(x, y))
    return {"scans": len(masks), "voxel_agreement": same / total, "identical_scans": identical}


def _level(root: Path, out: Path, evaluate: Path, extra: list[str], env: dict[str, str]) -> dict[str, Any]:
    times = {"participant_s": _timed([str(root), str(out), "participant", *extra], env),
             "group_s": _timed([str(root), str(out), "group"], env),
             "evaluate_s": _timed(["evaluate", str(root / "derivatives" / "reference"), str(out), "-o",
                                   str(evaluate)], env)}
    return {"options": extra, "timings": times, "evaluation": _summary(evaluate)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS / "demo_quickstart.json")
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEPS_")}  # the bundled models
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="spineps-demo-bench-") as tmp:
        root = Path(tmp) / "spineps-demo"
        load_before = os.getloadavg()
        demo_s = _timed(["demo", str(root), "--subjects", str(args.subjects)], env)
        default = root / "derivatives" / "spineps"
        auto = _level(root, default, Path(tmp) / "eval", [], env)
        fp32_out = Path(tmp) / "fp32"
        fp32 = _level(root, fp32_out, Path(tmp) / "eval_fp32", ["--precision", "fp32"], env)
        agreement = {desc: _agreement(default, fp32_out, desc) for desc in ("spine", "vertebrae")}
        load_after = os.getloadavg()
    res = {"what": "README quick start: demo, participant, group, evaluate (bundled models)",
           "subjects": args.subjects, "demo_s": demo_s, "default": auto, "fp32": fp32,
           "default_vs_fp32": agreement, "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "load_average_before": load_before, "load_average_after": load_after}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(res, indent=2) + "\n")
    tmp_json.replace(args.json)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
