"""Do the faster ways of running the networks give the output of float32 torch? The whole
participant pipeline (both phases, post-processing, naming) on the benchmark cases, once per
variant (models loaded once per variant); the final masks are compared with ``fp32``
(``--precision fp32 --engine torch``, what nnU-Net itself does on CPU):

- ``fp32_onnxruntime``: ``--precision fp32`` with the default ``--engine auto`` (the semantic
  network in ONNX Runtime, the instance U-Net in torch: what the app runs for fp32);
- ``bf16``: ``--precision bf16`` (bfloat16 autocast in torch).

    .venv/bin/python benchmarks/precision_agreement.py [--cases whole,lumbar,real] [--threads 2]
        [--json benchmarks/results/precision_agreement.json]

Per case and variant: the time of the scan (after model loading) and of the network
forward passes. Agreement of each variant with fp32: semantic label agreement over all voxels (the
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


#: variant -> (--precision, --engine)
VARIANTS = {"fp32": ("fp32", "torch"), "fp32_onnxruntime": ("fp32", "auto"), "bf16": ("bf16", "torch")}


def run_case(bids: Path, out: Path, precision: str, engine: str, threads: int) -> dict[str, Any]:
    import torch

    from runbench.probe import ForwardTimer  # benchmarks/ is on sys.path
    from spineps import participant
    from spineps.loading import load_segmenters
    from spineps.settings import Settings

    settings = Settings(bids_dir=bids, output_dir=out, analysis_level="participant", skip_bids_validation=True,
                        nprocs=threads, omp_nthreads=threads, device="cpu", overwrite=True, precision=precision,
                        engine=engine, version="benchmark")
    torch.set_num_threads(threads)
    semantic, instance = load_segmenters(settings)
    timers = [ForwardTimer(semantic.predictor.network, False), ForwardTimer(instance.network, False)]
    discovery = participant.check_inputs(settings)
    t0 = time.perf_counter()
    participant.run_participant(settings, semantic, instance, discovery)
    scan_s = time.perf_counter() - t0
    return {"precision": semantic.precision, "engines": [semantic.engine, instance.engine], "scan_s": round(scan_s, 2),
            "forward_semantic_s": round(timers[0].seconds, 2), "forward_instance_s": round(timers[1].seconds, 2)}


def compare(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    from runbench.agreement import dice_per_label

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
    from runbench.cases import CASES, DEFAULT_WORK, prepare_case
    from runbench.report import machine_info

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
        for variant, (precision, engine) in VARIANTS.items():
            out = args.work / "precision" / name / variant
            entry[variant] = run_case(case.bids_dir, out, precision, engine, args.threads)
            log.info("%s %s: %s", name, variant, entry[variant])
        base = args.work / "precision" / name / "fp32"
        for variant in list(VARIANTS)[1:]:
            entry[variant]["agreement"] = compare(base, args.work / "precision" / name / variant)
            entry[variant]["speedup_scan"] = round(entry["fp32"]["scan_s"] / entry[variant]["scan_s"], 2)
            log.info("%s %s agreement: %s", name, variant, entry[variant]["agreement"])
        report["cases"][name] = entry
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    cols = ("variant", "fp32 s", "variant s", "speed-up", "label agr.", "fg agr.", "min Dice", "inst. fg agr.",
            "levels")
    lines = ["| case | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, e in report["cases"].items():
        for variant in list(VARIANTS)[1:]:
            v = e[variant]
            g = v["agreement"]
            lines.append(f"| {name} | {variant} | {e['fp32']['scan_s']} | {v['scan_s']} | {v['speedup_scan']}x | "
                         f"{g['semantic_label_agreement']:.5f} | {g['semantic_foreground_agreement']:.4f} | "
                         f"{g['semantic_min_label_dice']:.3f} | {g['instance_foreground_agreement']:.4f} | "
                         f"{'same' if g['same_levels'] else 'differ'} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
