"""Group level at cohort scale: ``build_group`` over N synthetic participant-output trees.

The trees are what the participant level leaves (masks, sidecars, morphometry table, QC
figure), made from a few exact-geometry column phantoms (``tests/group_cohort.py``) copied
under N names, with a few deliberate defects (a missing level, a collapsed body, a disc
without instance). Two timings: the normal path (morphometry tables present) and the
fall-back path where the group level measures every scan from its masks.

    .venv/bin/python benchmarks/group_scale.py [--scans 200] [--json benchmarks/results/group_scale.json]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scans", type=int, default=200)
    ap.add_argument("--templates", type=int, default=6)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "group_scale.json")
    ap.add_argument("--keep", type=Path, default=None, help="build the cohort here and keep it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from spineps.group.report import REPORT_HTML, build_group
    from tests.group_cohort import make_cohort, make_templates

    root = args.keep or Path(tempfile.mkdtemp(prefix="spineps-group-scale-"))
    t0 = time.perf_counter()
    tpl = make_templates(args.templates, spacing=(1.2, 1.2, 3.0))
    t_tpl = time.perf_counter() - t0
    full, bare = root / "with_morphometry", root / "masks_only"
    t0 = time.perf_counter()
    make_cohort(full, args.scans, templates=tpl)
    t_cohort = time.perf_counter() - t0
    make_cohort(bare, args.scans, templates=tpl, measurements=False, figure=False)

    t0 = time.perf_counter()
    g = build_group(full)
    t_group = time.perf_counter() - t0
    t0 = time.perf_counter()
    g2 = build_group(bare)
    t_masks = time.perf_counter() - t0
    html = full / REPORT_HTML
    res = {
        "scans": args.scans,
        "templates": len(tpl),
        "group_seconds": round(t_group, 3),
        "group_timings": g.timings,
        "group_from_masks_seconds": round(t_masks, 3),
        "per_scan_from_masks_ms": round(1000 * t_masks / args.scans, 1),
        "report_html_kb": round(html.stat().st_size / 1024, 1),
        "group_tsv_kb": round((full / "group_T2w.tsv").stat().st_size / 1024, 1),
        "levels_tsv_kb": round((full / "group_T2w_levels.tsv").stat().st_size / 1024, 1),
        "flagged_scans": g.n_flagged,
        "outlier_measurements": g.n_outliers,
        "flagged_scans_from_masks": g2.n_flagged,
        "setup_seconds": {"templates": round(t_tpl, 2), "cohort": round(t_cohort, 2)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    rows = [("scans", res["scans"]), ("group run (morphometry present)", f"{t_group:.2f} s"),
            ("  read / stats / write",
             f"{g.timings['read']:.2f} / {g.timings['stats']:.2f} / {g.timings['write']:.2f} s"),
            ("group run (measured from masks)", f"{t_masks:.2f} s ({res['per_scan_from_masks_ms']} ms/scan)"),
            ("report HTML", f"{res['report_html_kb']} kB"), ("group_T2w.tsv", f"{res['group_tsv_kb']} kB"),
            ("group_T2w_levels.tsv", f"{res['levels_tsv_kb']} kB"),
            ("flagged scans / outlier measurements", f"{g.n_flagged} / {g.n_outliers}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.json}" + (f"; cohort kept in {root}" if args.keep else ""))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
