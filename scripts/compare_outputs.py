#!/usr/bin/env python
"""Behaviour check for refactorings: run the app on fixed inputs and compare what it wrote.

``run`` executes a fixed set of command lines of one source tree (``--root``, default: this
checkout) in fresh processes and writes ``manifest.json``: a content hash of every mask's voxel
array (with its shape, dtype and affine), of every TSV, and of every JSON with the fields that
change from run to run removed (timings, time stamps, run ids, host names, process ids, the
temporary folders). ``compare`` reads two manifests and prints every difference (exit 1 when
there is one).

The command lines (all with the models bundled in ``--root``):

- ``spineps demo DEMO --subjects 3`` (lumbar, thoracolumbar and whole-spine phantoms), the
  participant level on it (default options, and once ``--precision fp32 --no-n4`` on sub-01, the
  ONNX Runtime path), and the group level;
- the participant and group levels on a BIDS copy (symbolic links) of real scans in
  ``../shared/data/real``: 2 VB2, 2 VB3, 1 IVD, the SCT lumbar and cervical T2w scans;
- ``spineps instance`` on the demo's reference masks, on the demo participant outputs, on manual
  VB2 / VB3 body masks (once with ``--top-vertebra T12``), and on an IVD disc-only mask (which
  must fail: no vertebral body), each followed by the group level.

Usage::

    python scripts/compare_outputs.py run /tmp/before [--root /path/to/old/tree]
    python scripts/compare_outputs.py run /tmp/after
    python scripts/compare_outputs.py compare /tmp/before/manifest.json /tmp/after/manifest.json
    python scripts/compare_outputs.py manifest /tmp/before --root /path/to/old/tree   # re-hash only

The input data never enters the repository: real scans are linked from ``--real`` (default
``../shared/data/real`` beside the checkout). Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "data" / "real"

#: (folder, source file name, subject label) of the real scans used
REAL_SCANS = (
    ("VB2", "sub-vb202_T2w.nii.gz", "vb202"),
    ("VB2", "sub-vb204_T2w.nii.gz", "vb204"),
    ("VB3", "sub-vb301_MR.nii.gz", "vb301"),
    ("VB3", "sub-vb302_MR.nii.gz", "vb302"),
    ("IVD", "sub-ivd11_T2w.nii.gz", "ivd11"),
    ("SCT", "sub-sctlumbar_T2w.nii.gz", "sctlumbar"),
    ("SCT", "sub-sctcervical_T2w.nii.gz", "sctcervical"),
)
#: (name of the masks folder, [(real folder, subject)]) for ``spineps instance`` on manual masks
REAL_MASK_SETS = (
    ("masks-vb", [("VB2", "vb202"), ("VB2", "vb205"), ("VB3", "vb301"), ("VB3", "vb303"), ("VB3", "vb304")]),
    ("masks-ivd", [("IVD", "ivd20")]),
)

#: JSON keys whose values change from run to run (compared case-insensitively)
VOLATILE_KEYS = {"timings", "seconds", "runid", "run_id", "settingsfile", "host", "hostname", "pid",
                 "generatedat", "created", "timestamp", "log_file"}
_RUN_ID = re.compile(r"(participant|group|run)_\d{8}T\d{9}Z_pid\d+")
#: what changes in the group report from run to run (its time stamp and the id made from it)
_REPORT_VOLATILE = re.compile(r'"(generated|report_id)":"[^"]*"')
#: what changes on a per-scan page (spineps.group.scan_page.VOLATILE_RE, restated: this script
#: compares two source trees and imports neither)
_PAGE_VOLATILE = re.compile(r"<(span|div) data-volatile='[a-z]+'>.*?</\1>", re.S)


# ----------------------------------------------------------------------------------------- running
def _spineps(root: Path, args: list[str], log: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONHASHSEED="0")
    env.pop("SPINEPS_SEMANTIC_MODEL", None)
    env.pop("SPINEPS_INSTANCE_MODEL", None)
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ spineps {' '.join(args)}\n")
        fh.flush()
        rc = subprocess.call([sys.executable, str(root / "run.py"), *args], env=env, stdout=fh, stderr=fh,
                             cwd=str(root))
    print(f"  rc={rc} {time.perf_counter() - t0:6.1f} s  spineps {' '.join(args)}", flush=True)
    return rc


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _real_bids(real: Path, dest: Path) -> None:
    """A BIDS dataset of symbolic links to the real scans (``acq-sag`` names them sagittal)."""
    _write_json(dest / "dataset_description.json", {"Name": "real scans (links)", "BIDSVersion": "1.9.0"})
    for folder, name, sub in REAL_SCANS:
        target = dest / f"sub-{sub}" / "anat" / f"sub-{sub}_acq-sag_T2w.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(real / folder / name)


def _real_masks(real: Path, dest: Path, scans: list[tuple[str, str]]) -> None:
    for folder, sub in scans:
        target = dest / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-spine_dseg.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(real / folder / f"sub-{sub}_desc-spine_dseg.nii.gz")


def run_all(out: Path, root: Path, real: Path) -> dict[str, int]:
    """Every command line; returns ``{label: exit code}``."""
    out.mkdir(parents=True, exist_ok=False)
    log = out / "commands.log"
    rcs: dict[str, int] = {}
    demo = out / "demo"
    deriv = demo / "derivatives" / "spineps"
    rcs["demo"] = _spineps(root, ["demo", str(demo), "--subjects", "3"], log)
    rcs["demo participant"] = _spineps(root, [str(demo), str(deriv), "participant"], log)
    rcs["demo group"] = _spineps(root, [str(demo), str(deriv), "group"], log)
    fp32 = out / "demo-fp32"
    rcs["demo participant fp32"] = _spineps(root, [str(demo), str(fp32), "participant", "--participant-label", "01",
                                                   "--precision", "fp32", "--no-n4"], log)
    ref = demo / "derivatives" / "reference"
    rcs["instance on reference"] = _spineps(root, ["instance", str(ref), str(out / "inst-reference")], log)
    rcs["instance on reference group"] = _spineps(root, [str(ref), str(out / "inst-reference"), "group"], log)
    rcs["instance on outputs"] = _spineps(root, ["instance", str(deriv), str(out / "inst-outputs")], log)
    if real.is_dir():
        bids = out / "real"
        _real_bids(real, bids)
        rderiv = out / "real-out"
        rcs["real participant"] = _spineps(root, [str(bids), str(rderiv), "participant"], log)
        rcs["real group"] = _spineps(root, [str(bids), str(rderiv), "group"], log)
        for name, scans in REAL_MASK_SETS:
            masks = out / name
            _real_masks(real, masks, scans)
            rcs[f"instance {name}"] = _spineps(root, ["instance", str(masks), str(out / f"inst-{name}")], log)
            rcs[f"instance {name} group"] = _spineps(root, [str(masks), str(out / f"inst-{name}"), "group"], log)
        rcs["instance masks-vb T12"] = _spineps(root, ["instance", str(out / "masks-vb"), str(out / "inst-T12"),
                                                       "--participant-label", "vb202", "vb301",
                                                       "--top-vertebra", "T12"], log)
    else:
        print(f"  real scans not found in {real}: only the demo was run", flush=True)
    return rcs


# ---------------------------------------------------------------------------------------- manifest
def _scrub(obj: Any, subs: list[tuple[str, str]]) -> Any:
    if isinstance(obj, dict):
        return {k: _scrub(v, subs) for k, v in obj.items() if str(k).lower() not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_scrub(v, subs) for v in obj]
    if isinstance(obj, str):
        return _scrub_text(obj, subs)
    return obj


def _scrub_text(text: str, subs: list[tuple[str, str]]) -> str:
    for old, new in subs:
        text = text.replace(old, new)
    return _RUN_ID.sub(r"\1_<RUN>", text)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _nifti_entry(path: Path) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    img: Any = nib.load(str(path))  # an image class of nibabel's choosing
    data = np.ascontiguousarray(np.asanyarray(img.dataobj))
    affine = np.ascontiguousarray(img.affine, dtype=np.float64)
    h = hashlib.sha256()
    h.update(f"{data.dtype.str}{data.shape}".encode())
    h.update(affine.tobytes())
    h.update(data.tobytes())
    return {"kind": "nifti", "sha256": h.hexdigest(), "shape": list(data.shape), "dtype": data.dtype.str,
            "voxels": int(data.size), "nonzero": int(np.count_nonzero(data)),
            "values": int(len(np.unique(data))) if data.dtype.kind in "iu" else None}


def file_entry(path: Path, subs: list[tuple[str, str]]) -> dict[str, Any]:
    name = path.name
    if name.endswith((".nii", ".nii.gz")):
        return _nifti_entry(path)
    if name.endswith(".json"):
        obj = _scrub(json.loads(path.read_text(encoding="utf-8")), subs)
        text = json.dumps(obj)  # key order counts
        return {"kind": "json", "sha256": _sha(text.encode()), "content": obj}
    if name.endswith(".tsv"):
        text = _scrub_text(path.read_text(encoding="utf-8"), subs)
        return {"kind": "tsv", "sha256": _sha(text.encode()), "rows": text.count("\n"), "content": text}
    if name.endswith(".html"):
        text = _REPORT_VOLATILE.sub(r'"\1":"<VOLATILE>"', _scrub_text(path.read_text(encoding="utf-8"), subs))
        text = _PAGE_VOLATILE.sub("", text)
        return {"kind": "html", "sha256": _sha(text.encode())}
    if name.endswith(".png"):
        return {"kind": "png", "sha256": _sha(path.read_bytes())}
    text = _scrub_text(path.read_text(encoding="utf-8", errors="replace"), subs)
    return {"kind": "text", "sha256": _sha(text.encode()), "content": text}


def manifest(out: Path, root: Path, rcs: dict[str, int]) -> dict[str, Any]:
    subs = [(str(out.resolve()), "<OUT>"), (str(root.resolve()), "<ROOT>")]
    files: dict[str, Any] = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_symlink() or not path.is_file() or rel == "commands.log" or rel == "manifest.json":
            continue
        parts = rel.split("/")
        if "logs" in parts and not rel.endswith("_settings.json"):
            continue  # logs hold times and process ids; the settings files are compared
        rel = _RUN_ID.sub(r"\1_<RUN>", rel)
        files[rel] = file_entry(path, subs)
    return {"exit_codes": rcs, "files": files}


# ----------------------------------------------------------------------------------------- compare
#: kinds that must be identical; the others (the PNG figures) are listed but only reported
STRICT_KINDS = ("nifti", "tsv", "json", "text", "html")


def _json_diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k not in a else 'before'}")
            else:
                _json_diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _json_diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {json.dumps(a)[:200]} -> {json.dumps(b)[:200]}")


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str], dict[str, int]]:
    """``(differences, notes, counts)``: strict differences, differences of figures/report, sizes."""
    diffs: list[str] = []
    notes: list[str] = []
    if before["exit_codes"] != after["exit_codes"]:
        diffs.append(f"exit codes: {before['exit_codes']} -> {after['exit_codes']}")
    fa, fb = before["files"], after["files"]
    for rel in sorted(set(fa) | set(fb)):
        if rel not in fa or rel not in fb:
            diffs.append(f"{rel}: only in {'after' if rel not in fa else 'before'}")
            continue
        a, b = fa[rel], fb[rel]
        if a["sha256"] == b["sha256"]:
            continue
        target = diffs if a["kind"] in STRICT_KINDS else notes
        if a["kind"] == "json":
            sub: list[str] = []
            _json_diff(a["content"], b["content"], "", sub)
            target.extend(f"{rel}: {d}" for d in sub[:20])
            if not sub:
                target.append(f"{rel}: the same values, keys in another order")
        elif a["kind"] in ("tsv", "text"):
            la, lb = a["content"].splitlines(), b["content"].splitlines()
            changed = [f"{rel}: line {i + 1}: {x!r} -> {y!r}" for i, (x, y) in enumerate(zip(la, lb)) if x != y]
            if len(la) != len(lb):
                changed.append(f"{rel}: {len(la)} -> {len(lb)} lines")
            target.extend(changed[:20])
        else:
            extra = ""
            if a["kind"] == "nifti":
                extra = f" (shape {a['shape']} -> {b['shape']}, nonzero {a['nonzero']} -> {b['nonzero']})"
            target.append(f"{rel}: {a['kind']} content differs{extra}")
    kinds: dict[str, int] = {}
    for e in fa.values():
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    counts = {"files": len(fa), **{f"{k}_files": n for k, n in sorted(kinds.items())},
              "nifti_voxels": sum(e["voxels"] for e in fa.values() if e["kind"] == "nifti"),
              "commands": len(before["exit_codes"])}
    return diffs, notes, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the command lines and write OUT/manifest.json")
    r.add_argument("out", type=Path, help="a folder that does not exist yet")
    r.add_argument("--root", type=Path, default=REPO, help="source tree to run (default: this checkout)")
    r.add_argument("--real", type=Path, default=DEFAULT_REAL, help="the real scans (default: %(default)s)")
    m = sub.add_parser("manifest", help="(re)write OUT/manifest.json of an earlier run's folder")
    m.add_argument("out", type=Path)
    m.add_argument("--root", type=Path, default=REPO, help="the source tree that was run (default: this checkout)")
    c = sub.add_parser("compare", help="compare two manifests")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        out = args.out.resolve()
        t0 = time.perf_counter()
        rcs = run_all(out, args.root.resolve(), args.real.resolve())
        man = manifest(out, args.root.resolve(), rcs)
        _write_json(out / "manifest.json", man)
        print(f"{len(man['files'])} files in {out / 'manifest.json'} ({time.perf_counter() - t0:.0f} s)")
        return 0
    if args.cmd == "manifest":
        out = args.out.resolve()
        rcs = json.loads((out / "manifest.json").read_text())["exit_codes"]
        man = manifest(out, args.root.resolve(), rcs)
        _write_json(out / "manifest.json", man)
        print(f"{len(man['files'])} files in {out / 'manifest.json'}")
        return 0
    diffs, notes, counts = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    for line in diffs:
        print("DIFF", line)
    for line in notes:
        print("note", line)
    print("compared: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("identical" if not diffs else f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
