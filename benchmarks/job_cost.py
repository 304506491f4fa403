"""The cost of one participant job, whole process, ours and the reference (SPINEPS 2.1.3) in
turn in the same call, on the real lumbar scan with the same model folders (the bundled ones).

    .venv/bin/python benchmarks/job_cost.py --reference /tmp/spineps-ref-venv [--repeats 4]
        [--threads 2] [--sharing] [--json benchmarks/results/job_cost.json]

Per repeat, each in a fresh process started by this script:

- **ours**: the command line itself (``spineps.cli.main.main``, as ``run.py`` runs it) on a
  one-scan BIDS dataset, defaults otherwise (BIDS validation on). The driver
  (``--worker``) installs an import hook first (``jobcost/timeline.py``) that times every
  outermost import and the fixed-cost steps from outside the library: interpreter start,
  validation, indexing, model loading, and the moment the first voxel is read (with the
  resident memory after each: the floor under the peak). Peak RSS: ``VmHWM`` at exit.
- **reference**: ``reference_worker.py`` in its venv (imports, model loading,
  ``segment_image``; see ``run_benchmark.py``), the same files, folders and threads.

Whole-process wall time is measured here, from just before the start to the exit.
Medians over ``--repeats``. ``--sharing`` adds the work-sharing case: 5 copies of the scan
as 5 subjects, one process against 4 processes started at once into one output folder
(``--sharing-threads`` threads each), with how many scans each process computed.

Standard library only at import time; JSON written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # runbench/, jobcost/

REPO = HERE.parent
MODELS = REPO / "spineps" / "data" / "models"
DEFAULT_JSON = HERE / "results" / "job_cost.json"


# ----------------------------------------------------------------------------- the worker
def _worker(cfg_path: str, result_path: str) -> int:
    from jobcost.timeline import install, rss_mib

    timeline = install(float(os.environ["JOBCOST_T0"]))
    cfg = json.loads(Path(cfg_path).read_text())
    from spineps.cli.main import main

    code = main(cfg["argv"])
    res = {"exit_code": code, "interpreter_s": round(timeline.started, 4), "steps": timeline.steps,
           "first_voxel": timeline.first_voxel, "imports_s": round(timeline.import_s, 4),
           "end_s": round(timeline.now(), 4), "peak_rss_mib": round(rss_mib("VmHWM"), 1),
           "modules": sorted(m.split(".")[0] for m in sys.modules if "." not in m)}
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, result_path)
    return code


# ----------------------------------------------------------------------------- runs
def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (what a job's memory limit sees;
    e.g. the BIDS validator running beside the model loading)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return total / 1024


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Optional[Path] = None) -> tuple[float, int, float]:
    """Start, wait; the whole process's wall time, exit code and the peak resident memory of
    its process tree (sampled every 20 ms)."""
    env = dict(env, JOBCOST_T0=repr(time.time()))
    cpu0 = children_cpu_s()
    t0 = time.perf_counter()
    peak = 0.0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        while proc.poll() is None:
            peak = max(peak, tree_rss_mib(proc.pid))
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    global LAST_CPU_S
    LAST_CPU_S = round(children_cpu_s() - cpu0, 3)
    return wall, int(proc.returncode), round(peak, 1)


LAST_CPU_S = 0.0  # CPU time (user + system) of the process tree of the last run of ``_spawn``


def children_cpu_s() -> float:
    """User + system CPU time of this process's finished (waited-for) children and theirs:
    less sensitive to the machine's load than wall time."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _our_argv(bids: Path, out: Path, threads: int, extra: Sequence[str] = ()) -> list[str]:
    return [str(bids), str(out), "participant", "--nprocs", str(threads), "--omp-nthreads", str(threads),
            "--semantic-model", str(MODELS / "t2w_semantic"), "--instance-model", str(MODELS / "instance"), *extra]


def run_ours(bids: Path, work: Path, repeat: int, threads: int) -> dict[str, Any]:
    from runbench.workers import worker_env

    run = work / "ours" / f"run{repeat}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "cfg.json").write_text(json.dumps({"argv": _our_argv(bids, run / "deriv", threads)}))
    wall, rc, tree_peak = _spawn([sys.executable, str(Path(__file__).resolve()), "--worker", str(run / "cfg.json"),
                                  str(run / "result.json")], run / "log.txt", worker_env(threads))
    if rc != 0 or not (run / "result.json").is_file():
        raise RuntimeError(f"our run failed (exit {rc}): {(run / 'log.txt').read_text()[-3000:]}")
    res = json.loads((run / "result.json").read_text())
    res["process_wall_s"] = round(wall, 3)
    res["tree_peak_rss_mib"] = tree_peak
    res["cpu_s"] = LAST_CPU_S
    m = _VALIDATOR.search((run / "log.txt").read_text(errors="replace"))
    res["validator_s"] = float(m.group(1)) if m else None
    return res


_VALIDATOR = re.compile(r"BIDS validation of .*?, ([0-9.]+) s from its start")


def run_reference(case: Any, repeat: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The reference's worker (``runbench.workers.run_reference``: imports, models,
    ``segment_image``), whole process, with its process tree's peak sampled beside it."""
    import threading

    from runbench.workers import run_reference as run_ref

    peak, stop = [0.0], threading.Event()

    def sample() -> None:  # the worker is this process's only child while it runs
        me = os.getpid()
        while not stop.is_set():
            with open(f"/proc/{me}/task/{me}/children") as fh:
                kids = [int(c) for c in fh.read().split()]
            peak[0] = max([peak[0], *(tree_rss_mib(k) for k in kids)])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0 = children_cpu_s()
    try:
        res = run_ref(case, repeat, args, work)
    finally:
        stop.set()
        sampler.join()
    res["cpu_s"] = round(children_cpu_s() - cpu0, 3)
    res["tree_peak_rss_mib"] = round(peak[0], 1)
    return res


def fixed_cost(res: dict[str, Any]) -> dict[str, float]:
    """Our fixed cost before the first voxel, by part (seconds); ``imports`` counts the
    imports outside the named steps, ``other`` the rest (argument parsing, logging set-up,
    output folder ...). A step that starts after the first voxel (the model loading, while
    the N4 helper corrects the first scan) counts 0 here and its time goes to
    ``after_first_voxel`` (``<step>``: seconds)."""
    steps = {s["step"]: s for s in res["steps"]}
    first = res["first_voxel"]["at_s"]
    out = {"interpreter": res["interpreter_s"]}
    inside, named_imports, after = 0.0, 0.0, {}
    for name in ("validation", "indexing", "model_loading"):
        s = steps.get(name, {"s": 0.0, "imports_s": 0.0, "start_s": 0.0})
        if s.get("start_s", 0.0) >= first and s["s"] > 0:
            after[name] = s["s"]
            s = {"s": 0.0, "imports_s": 0.0}
        out[f"{name}_imports"] = s["imports_s"]
        out[name] = round(s["s"] - s["imports_s"], 4)
        inside += s["s"]
        named_imports += s["imports_s"]
    out["imports"] = round(res["first_voxel"]["imports_s"] - named_imports, 4)
    out["other"] = round(first - res["interpreter_s"] - inside - out["imports"], 4)
    out["before_first_voxel"] = round(first, 4)
    for name, s in after.items():
        out[f"{name}_after_first_voxel"] = round(s, 4)
    return out


def memory(res: dict[str, Any]) -> dict[str, float]:
    out = {f"after_{s['step']}": s["rss_after_mib"] for s in res["steps"]}
    out["floor_at_first_voxel"] = res["first_voxel"]["rss_mib"]
    out["peak"] = res["peak_rss_mib"]
    return out


# ----------------------------------------------------------------------------- work sharing
_SUMMARY = re.compile(r"summary: (\d+) scan\(s\): (\d+) processed, (\d+) skipped")


def sharing_cohort(image: Path, work: Path, n: int = 5) -> Path:
    bids = work / "cohort" / "bids"
    if not (bids / "dataset_description.json").is_file():
        for i in range(1, n + 1):
            anat = bids / f"sub-{i:02d}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, anat / f"sub-{i:02d}_T2w.nii.gz")
        (bids / "dataset_description.json").write_text(json.dumps({"Name": "job cost cohort",
                                                                   "BIDSVersion": "1.9.0"}))
    return bids


def run_sharing(bids: Path, work: Path, processes: int, threads: int) -> dict[str, Any]:
    """``processes`` CLI processes started at once on the cohort into one output folder."""
    from runbench.workers import worker_env

    run = work / "sharing" / f"p{processes}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    env = worker_env(threads)
    t0 = time.perf_counter()
    procs = []
    for k in range(processes):
        fh = open(run / f"proc{k}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(REPO / "run.py"), *_our_argv(bids, run / "deriv", threads)],
                                       stdout=fh, stderr=subprocess.STDOUT, env=env), fh))
    walls, codes = [], []
    for p, fh in procs:
        codes.append(p.wait())
        walls.append(round(time.perf_counter() - t0, 2))
        fh.close()
    counts = []
    for k in range(processes):
        m = _SUMMARY.search((run / f"proc{k}.log").read_text(errors="replace"))
        counts.append({"processed": int(m.group(2)), "skipped": int(m.group(3))} if m else None)
    done = len(list((run / "deriv").rglob("*_desc-vertebrae_dseg.json")))
    return {"processes": processes, "threads_each": threads, "wall_s": max(walls), "process_walls_s": walls,
            "exit_codes": codes, "per_process": counts, "scans_complete": done}


# ----------------------------------------------------------------------------- report
def _median(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarise(ours: list[dict[str, Any]], refs: list[dict[str, Any]]) -> dict[str, Any]:
    fixed = [fixed_cost(r) for r in ours]
    mem = [memory(r) for r in ours]
    out: dict[str, Any] = {
        "ours": {"process_wall_s": _median([r["process_wall_s"] for r in ours]),
                 "peak_rss_mib": _median([r["peak_rss_mib"] for r in ours]),
                 "tree_peak_rss_mib": _median([r["tree_peak_rss_mib"] for r in ours]),
                 "cpu_s": _median([r.get("cpu_s") for r in ours]),
                 "validator_s": _median([r.get("validator_s") for r in ours]),
                 "fixed_cost_s": {k: _median([f[k] for f in fixed]) for k in fixed[0]},
                 "memory_mib": {k: _median([m.get(k) for m in mem]) for k in mem[0]},
                 "scan_s": _median([r["end_s"] - r["first_voxel"]["at_s"] for r in ours])},
    }
    if refs:
        ref = {"process_wall_s": _median([r["process_wall_s"] for r in refs]),
               "peak_rss_mib": _median([r["peak_rss_mib"] for r in refs]),
               "tree_peak_rss_mib": _median([r["tree_peak_rss_mib"] for r in refs]),
               "cpu_s": _median([r.get("cpu_s") for r in refs]),
               "imports_s": _median([r["seconds"]["import"] for r in refs]),
               "model_load_s": _median([r["seconds"]["model_load"] for r in refs]),
               "scan_s": _median([r["seconds"]["scan"] for r in refs]),
               "rss_before_scan_mib": _median([r.get("rss_before_scan_mib") for r in refs])}
        ref["before_scan_s"] = round(ref["process_wall_s"] - ref["scan_s"], 3)
        out["reference"] = ref
        out["speedup"] = round(ref["process_wall_s"] / out["ours"]["process_wall_s"], 2)
        if ref["cpu_s"] and out["ours"]["cpu_s"]:
            out["cpu_ratio"] = round(ref["cpu_s"] / out["ours"]["cpu_s"], 2)
        out["rss_ratio"] = round(out["ours"]["peak_rss_mib"] / ref["peak_rss_mib"], 3)
        out["tree_rss_ratio"] = round(out["ours"]["tree_peak_rss_mib"] / ref["tree_peak_rss_mib"], 3)
    return out


def format_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    o, r = s["ours"], s.get("reference")
    lines = ["| whole process, real lumbar scan | ours | SPINEPS 2.1.3 | ratio |", "| --- | --- | --- | --- |"]
    if r:
        lines += [f"| wall time s | {o['process_wall_s']:.2f} | {r['process_wall_s']:.2f} | "
                  f"{s['speedup']:.2f}x faster |",
                  f"| peak RSS MiB | {o['peak_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {s['rss_ratio']:.2f} |",

                  f"| before the first voxel s | {o['fixed_cost_s']['before_first_voxel']:.2f} | "
                  f"{r['before_scan_s']:.2f} | |",
                  f"| memory floor MiB (before the first voxel) | {o['memory_mib']['floor_at_first_voxel']:.0f} | "
                  f"{r['rss_before_scan_mib'] or float('nan'):.0f} | |"]
        if "tree_rss_ratio" in s:  # (not in the results of the first version of this script)
            lines.insert(4, f"| peak RSS of the process tree MiB (sampled, validator included) | "
                            f"{o['tree_peak_rss_mib']:.0f} | {r['tree_peak_rss_mib']:.0f} | "
                            f"{s['tree_rss_ratio']:.2f} |")
        if "cpu_ratio" in s:
            lines.insert(3, f"| CPU time s (process tree, user + system) | {o['cpu_s']:.2f} | {r['cpu_s']:.2f} | "
                            f"{s['cpu_ratio']:.2f}x less |")
    else:
        lines += [f"| wall time s | {o['process_wall_s']:.2f} | - | |",
                  f"| peak RSS MiB | {o['peak_rss_mib']:.0f} | - | |"]
    f = o["fixed_cost_s"]
    lines += ["", "| our fixed cost, part | s |", "| --- | --- |"]
    lines += [f"| {k.replace('_', ' ')} | {v:.2f} |" for k, v in f.items()]
    lines += ["", "| our resident memory | MiB |", "| --- | --- |"]
    lines += [f"| {k.replace('_', ' ')} | {v:.0f} |" for k, v in o["memory_mib"].items()]
    if report.get("sharing"):
        lines += ["", "| processes on 5 scans, one output folder | wall s | scans computed per process |",
                  "| --- | --- | --- |"]
        for row in report["sharing"]:
            per = ", ".join(str(c["processed"]) if c else "?" for c in row["per_process"])
            lines.append(f"| {row['processes']} x {row['threads_each']} thread(s) | {row['wall_s']:.1f} | {per} |")
    return "\n".join(lines)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("CFG", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--reference", type=Path, help="the reference's venv (benchmarks/reference_venv.sh)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sharing", action="store_true", help="also 1 vs 4 processes on 5 scans")
    ap.add_argument("--sharing-threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/spineps-job-cost"))
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--summarize", type=Path, metavar="JSON", help="print the README tables of a result file")
    return ap.parse_args(argv)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # e.g. run from a ``git archive`` copy
        return os.environ.get("JOBCOST_COMMIT", "unknown")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    if args.worker:
        return _worker(*args.worker)
    if args.summarize:
        sys.stdout.write(format_markdown(json.loads(args.summarize.read_text())) + "\n")
        return 0
    from runbench.cases import CASES, prepare_case
    from runbench.report import loadavg, machine_info
    from runbench.workers import reference_instance_folder

    case = prepare_case(CASES["real"], args.work)
    if case is None:
        sys.stderr.write(f"the real lumbar scan is absent: {CASES['real'].path}\n")
        return 1
    ns = argparse.Namespace(threads=args.threads, device="cpu", semantic_model=MODELS / "t2w_semantic",
                            reference=args.reference, no_n4=False, reference_instance_model=None)
    if args.reference:
        ns.reference_instance_model = reference_instance_folder(MODELS / "instance", args.work)
    started, load0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), loadavg()
    ours: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    sharing: list[dict[str, Any]] = []

    def report(done: bool) -> dict[str, Any]:  # written after every run: a long run keeps what it measured
        rep = {"started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "complete": done, "commit": _git_commit(), "loadavg": [load0, loadavg()],
               "machine": machine_info(args.threads),
               "command": " ".join(["benchmarks/job_cost.py", *(argv if argv is not None else sys.argv[1:])]),
               "case": str(case.spec.path), "threads": args.threads, "repeats": len(ours),
               "summary": summarise(ours, refs), "ours": [{k: v for k, v in r.items() if k != "modules"} for r in ours],
               "reference": refs, "sharing": sharing}
        _write_json(args.json, rep)
        return rep

    for i in range(args.repeats):
        ours.append(run_ours(case.bids_dir, args.work, i, args.threads))
        sys.stderr.write(f"ours #{i}: {ours[-1]['process_wall_s']:.2f} s, {ours[-1]['peak_rss_mib']:.0f} MiB\n")
        if args.reference:
            refs.append(run_reference(case, i, ns, args.work))
            sys.stderr.write(f"reference #{i}: {refs[-1]['process_wall_s']:.2f} s, "
                             f"{refs[-1]['peak_rss_mib']:.0f} MiB\n")
        report(False)
    if args.sharing:
        cohort = sharing_cohort(case.image, args.work)
        for n in (1, 4):
            sharing.append(run_sharing(cohort, args.work, n, args.sharing_threads))
            sys.stderr.write(f"sharing x{n}: {sharing[-1]['wall_s']:.1f} s {sharing[-1]['per_process']}\n")
            report(False)
    sys.stdout.write(format_markdown(report(True)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
