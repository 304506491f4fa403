"""The per-scan memory estimate (``spineps.resources.estimate_scan``) against every measured peak.

    .venv/bin/python benchmarks/memory_estimate.py [--json benchmarks/results/memory_estimate.json]

No network runs here: it recomputes the estimate for what the other benchmarks measured and
writes both side by side (``ratio`` = estimate / measured; >= 1 means the check would have
let the scan run and the scan fitted; the check refuses a scan whose estimate exceeds the
room left, so a ratio far above 1 refuses scans that would fit).

- **Released-size networks**, one forward (the calibration points of the network constants):
  ``results/semantic_official_layout.json`` (one nnU-Net tile, 64 x 256 x 256, 32 features,
  float32 torch / ONNX Runtime / bfloat16: peak RSS minus RSS before the forward) and
  ``results/instance_speed.json`` (one cutout of the released instance U-Net, dim 16,
  248 x 304 x 64, batch 1: contiguous / channels-last / ONNX Runtime; the input tensors the app
  also holds, int64 indices + one-hot + its contiguous copy, are added to the measured growth).
- **Whole pipeline, bundled models** (``results/cpu.json``: default settings, bfloat16 torch;
  ``results/cpu_fp32.json``: float32, the semantic network in ONNX Runtime): the process's peak
  RSS minus what it held when the scan's check ran: the import floor with both models loaded
  and pybids imported (``results/import_floor.json``, 508 MiB), plus, for ONNX Runtime, what its
  session adds at model load (the ``load`` phase peak of ``cpu_fp32.json`` minus that of
  ``cpu.json``). The footprint is that of the bundled model folders of this checkout; when
  their checksums differ from the ones measured the rows say so (rerun ``run_benchmark.py``).
- **In a real cgroup** (``--cgroup-run``, root with a writable cgroup v1 memory hierarchy;
  about 2 minutes): the app with the bundled models on one 512 x 512 x 96 noise scan
  (0.5 x 0.5 x 3 mm) in a child of this process's memory cgroup with a 4000 MB limit; the
  cgroup's peak usage (``memory.max_usage_in_bytes``) minus its usage when the scan's check ran
  (from the app's debug line) against the estimate. This is what a kernel-enforced limit
  (SLURM ``task/cgroup``) counts; ``tests/test_memory.py`` runs the same scan under 900 MB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MIB = 1024 * 1024
#: the phantom cases of run_benchmark.py (benchmarks/runbench/cases.py): spacing in P, I, R
PHANTOM_SPACING = (0.75, 0.75, 3.3)
REAL_CASE = REPO.parent / "shared" / "data" / "real" / "SCT" / "sub-sctlumbar_T2w.nii.gz"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def released_rows() -> list[dict[str, Any]]:
    """Estimate vs measurement for one forward of each released-size network and engine."""
    from spineps.resources import InstanceFootprint, SemanticFootprint

    rows: list[dict[str, Any]] = []
    sem = _load("semantic_official_layout.json")
    tile = tuple(reversed(sem["patch"]))  # the JSON holds nnU-Net's (R, I, P) order; footprints are (P, I, R)
    variants = {"torch": ("fp32", "torch"), "onnxruntime": ("fp32", "onnxruntime"), "bf16": ("bf16", "torch")}
    for r in sem["results"]:
        precision, engine = variants[r["variant"]]
        fp = SemanticFootprint(("P", "I", "R"), (0.75, 0.75, 1.65), (0.75, 0.75, 1.65), tile, sem["features"][0], 15,
                               precision=precision, engine=engine)
        measured = (r["peak_rss_mib"] - r["rss_before_forward_mib"]) * MIB
        rows.append(_row(f"released semantic tile {r['variant']}", fp.tile_bytes(), measured))
    inst = _load("instance_speed.json")
    kinds = {(False, False): ("fp32", "torch", False), (True, False): ("fp32", "torch", True),
             (False, True): ("fp32", "onnxruntime", False)}
    for m in inst["measurements"]:
        if not m["what"].startswith("released layout"):
            continue
        precision, engine, cl = kinds[(bool(m["channels_last_3d"]), "ONNX Runtime" in m["what"])]
        cutout = tuple(int(v) for v in m["size"])
        fp = InstanceFootprint(("P", "I", "R"), (3.0, 3.0, 6.0), (3.0, 3.0, 6.0), cutout, 10, 16, batch=1,
                               precision=precision, engine=engine, channels_last=cl)
        voxels = cutout[0] * cutout[1] * cutout[2]
        inputs = voxels * (8 + 2 * 4 * 10)  # int64 indices, float32 one-hot and its contiguous copy
        rows.append(_row(f"released instance cutout {precision} {engine}{' channels-last' if cl else ''}",
                         fp.batch_bytes(), m["peak_mib_above_start"] * MIB + inputs))
    return rows


def _row(what: str, estimate: float, measured: float, **extra: Any) -> dict[str, Any]:
    return {"what": what, "estimate_mib": round(estimate / MIB, 1), "measured_mib": round(measured / MIB, 1),
            "ratio": round(estimate / measured, 3) if measured > 0 else None, **extra}


def _bundled_footprint(precision: str, engine: str) -> Any:
    import torch

    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.models.registry import BUNDLED_INSTANCE, BUNDLED_SEMANTIC, bundled_model_dir
    from spineps.resources import Footprint
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    torch.set_num_threads(1)
    sem_dir, ins_dir = bundled_model_dir(BUNDLED_SEMANTIC), bundled_model_dir(BUNDLED_INSTANCE)
    if sem_dir is None or ins_dir is None:
        return None, {}
    sem = NnUNetSemanticSegmenter.from_folder(sem_dir, device="cpu", nprocs=1, precision=precision, engine=engine)
    ins = UNetInstanceSegmenter.from_folder(ins_dir, device="cpu", nprocs=1, precision=precision)
    checks = {"semantic": sem.provenance()["checksum"], "instance": ins.provenance()["checksum"]}
    return Footprint.of(sem, ins), checks


def _case_geometry(name: str, shape: Sequence[int]) -> Optional[tuple[tuple[int, ...], tuple[float, ...], Any]]:
    import numpy as np

    if name in ("whole", "lumbar"):
        aff = np.diag([*PHANTOM_SPACING, 1.0])[:, [1, 2, 0, 3]]  # array axes P, I, R -> world y, z, x
        return tuple(shape), PHANTOM_SPACING, aff
    if name == "real" and REAL_CASE.is_file():
        from spineps.geometry.io import read_header

        h = read_header(REAL_CASE)
        return h.spatial_shape, h.spacing, h.affine
    return None


def pipeline_rows() -> list[dict[str, Any]]:
    """Estimate vs measured peak above the floor, for the cases of cpu.json and cpu_fp32.json."""
    from spineps.resources import estimate_scan

    floor = next(s["rss_mib"] for s in _load("import_floor.json")["steps"] if s["step"].startswith("pybids"))
    base = _load("cpu.json")
    rows: list[dict[str, Any]] = []
    for result, precision, engine in (("cpu.json", "bf16", "torch"), ("cpu_fp32.json", "fp32", "onnxruntime")):
        data = _load(result)
        footprint, checks = _bundled_footprint(precision, engine)
        if footprint is None:
            continue
        same = all(checks[k] == data["models"][k]["checksum"] for k in checks)
        for name, case in data["cases"].items():
            geom = _case_geometry(name, case["shape"])
            if geom is None:
                continue
            shape, spacing, affine = geom
            extra = (case["ours"]["phases"]["load"]["peak_mib"] - base["cases"][name]["ours"]["phases"]["load"]
                     ["peak_mib"]) if engine == "onnxruntime" else 0.0
            measured = (case["ours"]["peak_rss_mib"] - floor - max(extra, 0.0)) * MIB
            est = estimate_scan(shape, spacing, affine=affine, footprint=footprint)
            rows.append(_row(f"pipeline {name} ({result}: {precision} {engine})", est.memory_bytes, measured,
                             floor_mib=round(floor + max(extra, 0.0), 1), network_mib=round(est.network_bytes / MIB, 1),
                             models_as_measured=same))
    return rows


def cgroup_rows() -> list[dict[str, Any]]:
    """The real-cgroup measurement of ``--cgroup-run`` (see the module docstring)."""
    import os
    import re
    import shutil
    import subprocess
    import tempfile
    import uuid

    sys.path.insert(0, str(REPO))
    from tests.bids_factory import BidsFactory

    me = next(ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
              if "memory" in ln.split(":", 2)[1].split(","))
    cg = Path("/sys/fs/cgroup/memory") / me.lstrip("/") / f"spineps-estimate-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="spineps-memory-estimate-"))
    try:
        cg.mkdir()
        limit = 4000 * MIB
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        ds = BidsFactory(work / "bids")
        ds.add("01", acq="sag", shape=(512, 512, 96), spacing=(0.5, 0.5, 3.0))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEPS_")}
        env["PYTHONPATH"] = str(REPO)
        cmd = (f'echo $$ > "{cg}/cgroup.procs" && exec "{sys.executable}" "{REPO / "run.py"}" "{ds.root}" '
               f'"{work / "out"}" participant --skip-bids-validation --device cpu -v')
        proc = subprocess.run(["sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=1800)
        m = re.search(r"about ([\d,]+) MB of memory.*?; ([\d,]+) MB memory available", proc.stderr)
        if proc.returncode != 0 or m is None:
            raise RuntimeError(f"the run failed ({proc.returncode}): {proc.stderr[-2000:]}")
        estimate = float(m.group(1).replace(",", "")) * MIB
        used_before = limit - float(m.group(2).replace(",", "")) * MIB
        peak = int((cg / "memory.max_usage_in_bytes").read_text())
        return [_row("real cgroup v1, 512x512x96 scan, bundled models (default settings)", estimate,
                     peak - used_before, cgroup_peak_mib=round(peak / MIB, 1),
                     cgroup_usage_at_check_mib=round(used_before / MIB, 1))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                import time

                time.sleep(0.1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=RESULTS / "memory_estimate.json")
    ap.add_argument("--cgroup-run", action="store_true", help="also measure one scan in a real cgroup (root)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from spineps import resources

    rows = released_rows() + pipeline_rows() + (cgroup_rows() if args.cgroup_run else [])
    out = {"what": "spineps.resources.estimate_scan against measured peaks (estimate / measured = ratio)",
           "constants": {"semantic_tile_bytes": {f"{p}/{e}": v for (p, e), v in resources.SEMANTIC_TILE_BYTES.items()},
                         "instance_cutout_bytes": {f"{p}/{e}/{'cl' if c else 'contiguous'}": v
                                                   for (p, e, c), v in resources.INSTANCE_CUTOUT_BYTES.items()},
                         "image_bytes_per_voxel": resources.IMAGE_BYTES_PER_VOXEL,
                         "network_fixed_mib": resources.NETWORK_FIXED_BYTES / MIB},
           "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    width = max(len(r["what"]) for r in rows)
    print(f"{'what':<{width}}  estimate MiB  measured MiB  ratio")
    for r in rows:
        print(f"{r['what']:<{width}}  {r['estimate_mib']:>12.1f}  {r['measured_mib']:>12.1f}  {r['ratio']:>5.2f}"
              + ("" if r.get("models_as_measured", True) else "  (models differ from the measured ones)"))
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
