"""Whole-pipeline speed and peak memory per phase (CPU or CUDA), optionally side by side
with the reference implementation (SPINEPS 2.1.3 from PyPI, see ``reference_venv.sh``).

    .venv/bin/python benchmarks/run_benchmark.py [--cases whole,lumbar,real] [--repeats 3]
        [--threads N] [--device cpu|cuda|auto] [--semantic-model DIR] [--instance-model DIR]
        [--reference /tmp/spineps-ref-venv] [--reference-repeats N] [--work DIR]
        [--json benchmarks/results/cpu.json]

Cases (inputs are made once and cached under ``--work``):

- ``whole``: a whole-spine phantom (C1..sacrum) at NAKO-like geometry: 0.75 x 0.75 mm
  in-plane, 3.3 mm sagittal slices, three stitched stations (``spineps.synth``);
- ``lumbar``: a lumbar-only phantom at the same geometry, one station;
- ``real``: ``shared/data/real/SCT/sub-sctlumbar_T2w.nii.gz`` when present (else skipped);
- ``tiny``: a small coarse phantom for the smoke test (seconds with tiny models).

Every run of a case is a fresh process (``python run_benchmark.py --worker``) that loads
both models and runs the participant level (``spineps.participant.run_participant``) on a
one-scan BIDS dataset. Phases are timed by wrapping the pipeline's functions from outside
(exclusive time of the innermost active phase, like a profiler), and the peak RSS of each
phase is read from ``VmHWM`` after resetting it at each phase change
(``/proc/self/clear_refs``). Pure network time is measured with forward hooks on the two
networks, so the non-network overhead is visible as a fraction. The reference runs in its
own virtual environment through ``benchmarks/reference_worker.py`` on the same input
files and model folders; the outputs of both are compared label by label (Dice).

Prints a table and writes JSON (atomically). The median over ``--repeats`` runs is
reported; the machine load (``/proc/loadavg``) before and after is recorded.

This file is the command line; the jobs live in ``benchmarks/runbench/``: ``cases``
(inputs), ``probe`` (phases, forward timer), ``workers`` (one run in a fresh process, ours
or the reference's), ``agreement`` (Dice), ``report`` (summary, table, JSON). It imports
only the standard library at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runbench/, also when loaded by path (tests)

from runbench.agreement import agreement, dice_per_label, matched_instance_dice, truth_dice
from runbench.cases import CASES, DEFAULT_WORK, REPO, CaseSpec, PreparedCase, prepare_case
from runbench.probe import PHASES, ForwardTimer, PhaseProbe, install_probe, status_kib
from runbench.report import (format_markdown, format_table, loadavg, machine_info, summarise,
                             summarise_reference, write_json_atomic)
from runbench.workers import (reference_instance_folder, resolved_precision, run_ours, run_reference,
                              run_worker, worker_env)

__all__ = ["main", "CASES", "DEFAULT_WORK", "PHASES", "CaseSpec", "PhaseProbe", "ForwardTimer", "prepare_case",
           "install_probe", "status_kib", "dice_per_label", "matched_instance_dice", "agreement", "truth_dice",
           "machine_info", "loadavg", "write_json_atomic", "reference_instance_folder", "worker_env", "run_worker",
           "summarise", "summarise_reference", "format_table", "format_markdown"]

log = logging.getLogger("run_benchmark")

RESULTS = REPO / "benchmarks" / "results"


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="whole,lumbar,real", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--image", type=Path, action="append", default=[],
                    help="also benchmark this NIfTI file (a case named after the file; repeatable)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--semantic-model", type=Path, default=REPO / "spineps" / "data" / "models" / "t2w_semantic")
    ap.add_argument("--instance-model", type=Path, default=REPO / "spineps" / "data" / "models" / "instance")
    ap.add_argument("--reference", type=Path, default=None,
                    help="virtual environment of the reference (benchmarks/reference_venv.sh); off when absent")
    ap.add_argument("--reference-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--no-n4", action="store_true", help="both tools without N4")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="our networks' precision on CPU (the app's --precision; default auto = the app's default)")
    ap.add_argument("--engine", default="auto", choices=("auto", "torch", "onnxruntime"),
                    help="what runs our forward passes on CPU (the app's --engine; default auto = the app's default)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="inputs (cached) and outputs")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/<device>.json")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran)")
    ap.add_argument("--summarize", type=Path, default=None, metavar="JSON",
                    help="print the table and a markdown summary of an existing result file, run nothing")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _specs(args: argparse.Namespace) -> dict[str, CaseSpec]:
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    specs = {n: CASES[n] for n in names}
    for img in args.image:
        stem = "".join(ch for ch in Path(img).name.split(".")[0] if ch.isalnum()) or "image"
        specs[stem] = CaseSpec(stem, f"file {img}", path=Path(img).resolve())
    for label, folder in (("semantic", args.semantic_model), ("instance", args.instance_model)):
        if not (Path(folder) / "inference_config.json").is_file():
            raise SystemExit(f"no {label} model folder at {folder} (inference_config.json missing)")
    return specs


def _reference_python(args: argparse.Namespace) -> Optional[Path]:
    ref_python = Path(args.reference) / "bin" / "python" if args.reference else None
    if ref_python is not None and not ref_python.is_file():
        log.warning("no reference venv at %s (run benchmarks/reference_venv.sh): reference skipped", args.reference)
        return None
    return ref_python


def _runs(case: PreparedCase, args: argparse.Namespace, run_dir: Path, n_ref: int
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Optional[str]]:
    """Our runs and the reference's, taking turns (so a change of machine load hits both
    alike); ``(ours, reference, reference error)``."""
    ours: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    ref_error: Optional[str] = None
    for r in range(max(args.repeats, n_ref)):
        if r < args.repeats:
            res = run_ours(case, r, args, run_dir)
            log.info("  ours run %d: scan %.2f s (forward %.2f s), process %.1f s, peak %.0f MiB", r,
                     res["seconds"]["scan"], res["seconds"]["forward_total"], res["process_wall_s"],
                     res["peak_rss_mib"])
            if res.get("failed"):
                log.warning("  ours run %d: the scan FAILED: %s", r, res["failed"])
            ours.append(res)
        if r < n_ref and ref_error is None:
            try:
                res = run_reference(case, r, args, run_dir)
            except RuntimeError as exc:
                log.error("reference failed on %s: %s", case.spec.name, exc)
                ref_error = str(exc)[-3000:]
                continue
            log.info("  reference run %d: scan %.2f s, process %.1f s, peak %.0f MiB", r,
                     res["seconds"]["scan"], res["process_wall_s"], res["peak_rss_mib"])
            refs.append(res)
    return ours, refs, ref_error


def _case_entry(case: PreparedCase, ours: list[dict[str, Any]], refs: list[dict[str, Any]],
                ref_error: Optional[str]) -> dict[str, Any]:
    """A case's entry of the report: summaries, the comparison with the reference, Dice."""
    entry: dict[str, Any] = {"description": case.spec.description, "input": str(case.image),
                             "shape": ours[0]["shape"], "ours": summarise(ours), "ours_runs": ours}
    if ref_error:
        entry["reference_error"] = ref_error
    if case.truth is not None and ours[0]["outputs"]["semantic"]:
        entry["truth"] = {"ours": truth_dice(ours[0]["outputs"]["semantic"], str(case.truth))}
    if not refs:
        return entry
    entry["reference"] = summarise_reference(refs)
    entry["reference_runs"] = refs
    o, f = entry["ours"], entry["reference"]
    entry["comparison"] = {
        "speedup_scan": round(f["seconds"]["scan"] / o["seconds"]["scan"], 2),
        "speedup_process": round(f["process_wall_s"] / o["process_wall_s"], 2),
        "peak_rss_ratio": round(o["peak_rss_mib"] / f["peak_rss_mib"], 3),
    }
    outs = refs[0].get("outputs", {})
    if outs.get("semantic") and ours[0]["outputs"]["semantic"]:
        agr = agreement(ours[0]["outputs"]["semantic"], outs["semantic"], ours[0]["outputs"]["instance"],
                        outs.get("instance"))
        vals = [v for v in agr["semantic_dice"].values() if v is not None]
        agr["semantic_mean_dice"] = round(sum(vals) / len(vals), 4) if vals else None
        entry["agreement"] = agr
        if case.truth is not None:
            entry["truth"]["reference"] = truth_dice(outs["semantic"], str(case.truth))
    return entry


def _benchmark(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> dict[str, Any]:
    """Every case, ours and (with ``--reference``) the reference's runs: the report."""
    specs = _specs(args)
    ref_python = _reference_python(args)
    work = args.work.resolve()
    if ref_python is not None:
        args.reference_instance_model = reference_instance_folder(Path(args.instance_model).resolve(), work)
    report: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/run_benchmark.py " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "machine": machine_info(args.threads), "loadavg_start": loadavg(), "device": args.device,
        "precision": args.precision, "precision_resolved": resolved_precision(args), "engine": args.engine,
        "repeats": args.repeats, "note": args.note, "cases": {},
    }
    for name, spec in specs.items():
        case = prepare_case(spec, work)
        if case is None:
            report["cases"][name] = {"skipped": f"{spec.path} is absent"}
            continue
        log.info("case %s: %s", name, case.spec.description)
        n_ref = (args.reference_repeats if args.reference_repeats is not None else args.repeats) if ref_python else 0
        ours, refs, ref_error = _runs(case, args, work / "runs", n_ref)
        report["machine"].setdefault("torch", ours[0]["torch"])
        report["machine"]["torch_threads"] = ours[0]["threads"]
        report.setdefault("models", {"semantic": ours[0]["semantic_model"], "instance": ours[0]["instance_model"]})
        report["cases"][name] = _case_entry(case, ours, refs, ref_error)
    report["loadavg_end"] = loadavg()
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    if args.worker is not None:
        res = run_worker(json.loads(args.worker.read_text()))
        write_json_atomic(args.result, res)
        return 0
    if args.summarize is not None:
        rep = json.loads(args.summarize.read_text())
        print("\n".join(rep.get("table", [])))
        print()
        print(format_markdown(rep))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.path.insert(0, str(REPO))
    report = _benchmark(args, argv)
    done = {n: c for n, c in report["cases"].items() if "ours" in c}
    table = format_table({"cases": done}) if done else "(no case ran)"
    report["table"] = table.splitlines()
    out = args.json or (RESULTS / f"{'cpu' if args.device == 'cpu' else args.device}.json")
    write_json_atomic(out, report)
    print(f"# {report['command']}")
    print(f"# {report['machine']['cpu']}, {report['machine']['cores_usable']} usable cores, torch "
          f"{report['machine'].get('torch')}, {args.threads} threads, device {args.device}; load average "
          f"{report['loadavg_start']} -> {report['loadavg_end']}; {report['started_utc']}")
    print(table)
    print(f"# JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
