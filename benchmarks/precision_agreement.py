"""Does ``--precision bf16`` give the same output as ``fp32``? The whole participant pipeline
(both phases, post-processing, naming) on the benchmark cases, once per precision, in one
process each (models loaded once per precision); the final masks are compared.

    .venv/bin/python benchmarks/precision_agreement.py [--cases whole,lumbar,real] [--threads 2]
        [--json benchmarks/results/precision_agreement.json]

Per case and precision: the time of the scan (after model loading) and of the network
forward passes. Agreement of bf16 with fp32: semantic label agreement over all voxels (the
criterion of the benchmarks issue: >= 0.999) and over the voxels either run labels as
foreground, the lowest per-label Dice, vertebra instances (same value voxel for voxel over
the foreground) and whether the level names are identical.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

log = logging.getLogger("precision_agreement")


def run_case(bids: Path, out: Path, precision: str, threads: int) -> dict[str, Any]:
    import torch

    from run_benchmark import ForwardTimer  # noqa: E402  (benchmarks/ on sys.path)
    from spineps import participant
    from spineps.models.registry import load_segmenters
    from spineps.settings import Settings

    settings = Settings(bids_dir=bids, output_dir=out, analysis_level="participant", skip_bids_validation=True,
                        nprocs=threads, omp_nthreads=threads, device="cpu", overwrite=True, precision=precision,
                        version="benchmark")
    torch.set_num_threads(threads)
    semantic, instance = load_segmenters(settings)
    timers = [ForwardTimer(semantic.predictor.network, False), ForwardTimer(instance.network, False)]
    discovery = participant.check_inputs(settings)
    t0 = time.perf_counter()
    participant.run_participant(settings, semantic, instance, discovery)
    scan_s = time.perf_counter() - t0
    return {"precision": semantic.precision, "scan_s": round(scan_s, 2),
            "forward_semantic_s": round(timers[0].seconds, 2), "forward_instance_s": round(timers[1].seconds, 2)}


def compare(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    from run_benchmark import dice_per_label  # noqa: E402

    sem_a = next(a_dir.rglob("*_desc-spine_dseg.nii.gz"))
    sem_b = b_dir / sem_a.relative_to(a_dir)
    a, b = (np.asarray(nib.load(str(p)).dataobj) for p in (sem_a, sem_b))
    fg = (a > 0) | (b > 0)
    dice = {k: v for k, v in dice_per_label(a, b).items() if v is not None}
    inst_a = np.asarray(nib.load(str(sem_a).replace("desc-spine", "desc-vertebrae")).dataobj)
    inst_b = np.asarray(nib.load(str(sem_b).replace("desc-spine", "desc-vertebrae")).dataobj)
    ifg = (inst_a > 0) | (inst_b > 0)
    cent = [json.loads(Path(str(p).replace("desc-spine_dseg.nii.gz", "desc-vertebrae_centroids.json")).read_text())
            for p in (sem_a, sem_b)]
    return {
        "semantic_label_agreement": round(float(np.mean(a == b)), 6),
        "semantic_foreground_agreement": round(float(np.mean(a[fg] == b[fg])), 6) if fg.any() else 1.0,
        "semantic_min_label_dice": min(dice.values()) if dice else 1.0,
        "instance_foreground_agreement": round(float(np.mean(inst_a[ifg] == inst_b[ifg])), 6) if ifg.any() else 1.0,
        "same_levels": sorted(cent[0]["Vertebrae"]) == sorted(cent[1]["Vertebrae"]),
        "levels_fp32": list(cent[0]["Vertebrae"]),
        "levels_bf16": list(cent[1]["Vertebrae"]),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="whole,lumbar,real")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", type=Path, default=None, help="default: run_benchmark.py's work folder")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "precision_agreement.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    from run_benchmark import CASES, DEFAULT_WORK, machine_info, prepare_case  # noqa: E402

    args.work = args.work or DEFAULT_WORK

    from spineps.models.precision import cpu_has_native_bf16

    report: dict[str, Any] = {"machine": machine_info(args.threads), "native_bf16": cpu_has_native_bf16(),
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": {}}
    for name in [c for c in args.cases.split(",") if c]:
        case = prepare_case(CASES[name], args.work)
        if case is None:
            log.info("case %s: input absent, skipped", name)
            continue
        entry: dict[str, Any] = {}
        for precision in ("fp32", "bf16"):
            out = args.work / "precision" / name / precision
            entry[precision] = run_case(case.bids_dir, out, precision, args.threads)
            log.info("%s %s: %s", name, precision, entry[precision])
        entry["agreement"] = compare(args.work / "precision" / name / "fp32", args.work / "precision" / name / "bf16")
        entry["speedup_scan"] = round(entry["fp32"]["scan_s"] / entry["bf16"]["scan_s"], 2)
        log.info("%s agreement: %s", name, entry["agreement"])
        report["cases"][name] = entry
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    cols = ("fp32 s", "bf16 s", "speed-up", "label agr.", "fg agr.", "min Dice", "inst. fg agr.", "levels")
    lines = ["| case | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, e in report["cases"].items():
        g = e["agreement"]
        lines.append(f"| {name} | {e['fp32']['scan_s']} | {e['bf16']['scan_s']} | {e['speedup_scan']}x | "
                     f"{g['semantic_label_agreement']:.5f} | {g['semantic_foreground_agreement']:.4f} | "
                     f"{g['semantic_min_label_dice']:.3f} | {g['instance_foreground_agreement']:.4f} | "
                     f"{'same' if g['same_levels'] else 'differ'} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
