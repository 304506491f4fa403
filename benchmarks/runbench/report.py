"""The report of a benchmark run: medians over the runs, the machine, the table printed
and stored in the JSON, the markdown summary for the README, the atomic JSON write."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from runbench.cases import REPO
from runbench.probe import PHASES

def _median(xs: Sequence[Optional[float]]) -> Optional[float]:
    vals = [x for x in xs if x is not None]
    return round(float(statistics.median(vals)), 3) if vals else None

def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sec: dict[str, Any] = {k: _median([r["seconds"][k] for r in runs]) for k in runs[0]["seconds"]}
    phases = {p: {"s": _median([r["phases"][p]["s"] for r in runs]),
                  "peak_mib": _median([r["phases"][p]["peak_mib"] for r in runs])} for p in PHASES}
    scan = sec["scan"] or 0.0
    return {
        "runs": len(runs),
        "failed_runs": sum(1 for r in runs if r.get("failed")),
        "failure": next((r["failed"] for r in runs if r.get("failed")), None),
        "seconds": sec,
        "seconds_all_runs": {"scan": [r["seconds"]["scan"] for r in runs],
                             "process_wall": [r["process_wall_s"] for r in runs]},
        "process_wall_s": _median([r["process_wall_s"] for r in runs]),
        "peak_rss_mib": _median([r["peak_rss_mib"] for r in runs]),
        "non_network_fraction": round(sec["non_network"] / scan, 4) if scan else None,
        "scans_per_hour": round(3600.0 / scan, 1) if scan else None,
        "phases": phases,
    }

def summarise_reference(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sec = {k: _median([r["seconds"][k] for r in runs]) for k in runs[0]["seconds"]}
    return {"runs": len(runs), "seconds": sec, "process_wall_s": _median([r["process_wall_s"] for r in runs]),
            "peak_rss_mib": _median([r["peak_rss_mib"] for r in runs]),
            "seconds_all_runs": {"scan": [r["seconds"]["scan"] for r in runs]},
            "version": runs[0].get("version"), "torch": runs[0].get("torch")}

def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(fh.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "cores_online": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "memory_gib": mem, "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": commit}

def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []

def format_table(report: dict[str, Any]) -> str:
    cases = report["cases"]
    names = list(cases)
    lines = []
    head = f"{'phase':<24}" + "".join(f"{n + ' s':>12}{'peak MiB':>10}" for n in names)
    lines.append(head)
    lines.append("-" * len(head))
    for p in PHASES:
        row = f"{p:<24}"
        for n in names:
            ph = cases[n]["ours"]["phases"][p]
            row += f"{_fmt(ph['s']):>12}{_fmt(ph['peak_mib'], 0):>10}"
        lines.append(row)
    lines.append("-" * len(head))

    def line(label: str, get: Callable[[dict], Any], nd: int = 2) -> None:
        row = f"{label:<24}"
        for n in names:
            try:
                v = get(cases[n])
            except (KeyError, TypeError):
                v = None
            row += f"{_fmt(v, nd):>22}"
        lines.append(row)

    line("scan total s", lambda c: c["ours"]["seconds"]["scan"])
    line("  FAILED runs", lambda c: c["ours"]["failed_runs"] or None, 0)
    line("  network forward s", lambda c: c["ours"]["seconds"]["forward_total"])
    line("  non-network fraction", lambda c: c["ours"]["non_network_fraction"], 3)
    line("model load s", lambda c: c["ours"]["seconds"]["model_load"])
    line("process wall s", lambda c: c["ours"]["process_wall_s"])
    line("peak RSS MiB (process)", lambda c: c["ours"]["peak_rss_mib"], 0)
    line("scans per hour", lambda c: c["ours"]["scans_per_hour"], 0)
    if any("reference" in cases[n] for n in names):
        lines.append("-" * len(head))
        line("reference scan s", lambda c: c["reference"]["seconds"]["scan"])
        line("  reference N4 s", lambda c: c["reference"]["seconds"]["n4"])
        line("  reference forward s", lambda c: c["reference"]["seconds"]["forward_total"])
        line("reference process wall s", lambda c: c["reference"]["process_wall_s"])
        line("reference peak RSS MiB", lambda c: c["reference"]["peak_rss_mib"], 0)
        line("speed-up (scan)", lambda c: c["comparison"]["speedup_scan"])
        line("speed-up (process)", lambda c: c["comparison"]["speedup_process"])
        line("peak RSS ratio ours/ref", lambda c: c["comparison"]["peak_rss_ratio"], 3)
        line("semantic voxel agreement", lambda c: c["agreement"]["semantic_voxel_agreement"], 4)
        line("semantic mean Dice", lambda c: c["agreement"]["semantic_mean_dice"], 4)
        line("vertebra matched Dice", lambda c: c["agreement"]["vertebra_dice_matched"]["mean"], 4)
    if any("truth" in cases[n] for n in names):
        lines.append("-" * len(head))
        line("Dice vs phantom truth", lambda c: c["truth"]["ours"]["mean"], 3)
        line("ref Dice vs truth", lambda c: c["truth"]["reference"]["mean"], 3)
    return "\n".join(lines)

def format_markdown(report: dict[str, Any]) -> str:
    """A short markdown summary of a result JSON (for the README): one row per case."""
    rows = ["| case | shape | scan s (median) | network s | non-network | N4 s | peak RSS MiB | reference scan s | "
            "reference peak MiB | speed-up | RSS ratio | semantic Dice vs ref | vertebra Dice vs ref |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, c in report["cases"].items():
        if "ours" not in c:
            rows.append(f"| {name} | skipped: {c.get('skipped', '')} |" + " |" * 11)
            continue
        o = c["ours"]
        ref, cmp_, agr = c.get("reference", {}), c.get("comparison", {}), c.get("agreement", {})
        vm = (agr.get("vertebra_dice_matched") or {}).get("mean")
        rows.append(" | ".join([
            f"| {name}", "x".join(str(s) for s in c["shape"]), _fmt(o["seconds"]["scan"], 1),
            _fmt(o["seconds"]["forward_total"], 1), _fmt(o["non_network_fraction"], 3),
            _fmt(o["phases"]["preprocess_n4"]["s"], 1), _fmt(o["peak_rss_mib"], 0),
            _fmt(ref.get("seconds", {}).get("scan"), 1), _fmt(ref.get("peak_rss_mib"), 0),
            _fmt(cmp_.get("speedup_scan"), 2), _fmt(cmp_.get("peak_rss_ratio"), 2),
            _fmt(agr.get("semantic_mean_dice"), 3), _fmt(vm, 3)]) + " |")
    return "\n".join(rows)

def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)

def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
