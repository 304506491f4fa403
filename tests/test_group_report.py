"""The group level: tables, robust outliers and the self-contained HTML report (rendered in
headless Chromium when it is installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from spineps.errors import NoInputError, NoMatchError
from spineps.group.outliers import OUTLIER_Z, robust_outliers
from spineps.group.report import GROUP_JSON, GROUP_TSV, LEVELS_TSV, REPORT_HTML, build_group
from tests.group_cohort import make_cohort, make_templates

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def templates():
    return make_templates(8, spacing=(1.5, 1.5, 3.0))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, templates):
    out = tmp_path_factory.mktemp("cohort") / "derivatives"
    stems = make_cohort(out, 40, templates=templates)
    summary = build_group(out)
    return out, stems, summary


def _tsv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]


def test_robust_outliers_math() -> None:
    rng = np.random.default_rng(1)
    vals = list(rng.normal(25, 1, 50))
    pairs = [(f"s{i}", v) for i, v in enumerate(vals)] + [("bad", 40.0), ("nan", float("nan"))]
    stats, outs = robust_outliers({("L1", "body", "h"): pairs})
    st = stats[("L1", "body", "h")]
    assert st.n == 51 and abs(st.median - 25) < 0.5
    assert [o.scan for o in outs] == ["bad"] and outs[0].z > OUTLIER_Z
    # too few scans: nothing judged; identical values: the relative floor keeps z finite
    _, few = robust_outliers({"k": [("a", 1.0), ("b", 1.0), ("c", 9.0)]})
    assert few == []
    _, same = robust_outliers({"k": [(f"s{i}", 10.0) for i in range(9)] + [("x", 10.2)]})
    assert same == []


def test_group_tables(cohort) -> None:
    out, stems, summary = cohort
    assert summary.n_scans == 40 and summary.failed == {}
    rows = _tsv(out / GROUP_TSV)
    head = (out / GROUP_TSV).read_text().splitlines()[0].split("\t")
    assert head[:4] == ["bids_name", "naming_rule", "levels", "n_vertebrae"]
    assert [r["bids_name"] for r in rows] == sorted(stems)
    assert list(json.loads((out / GROUP_JSON).read_text())) == head
    assert all(float(r["vol_VB"]) > 0 for r in rows)
    assert {"qc_flags", "n_outliers", "L2_body_height_middle_mm", "L1-L2_disc_height_middle_mm",
            "L2_canal_csa_mm2", "vol_L2", "vol_disc_L1"} <= set(head)
    # the alignment measures: named for what they are, with their definitions and references
    assert {"lordosis_L1_S1_deg", "kyphosis_T4_T12_deg", "cobb_max_deg", "cobb_upper_end_vertebra",
            "L2_body_wedge_angle_deg", "L3-L4_disc_height_index", "L3-L4_segment_slip_mm"} <= set(head)
    cobb = [float(r["cobb_max_deg"]) for r in rows if r["cobb_max_deg"] != "n/a"]
    assert cobb and all(0 <= x < 10 for x in cobb)
    assert all(r["cobb_upper_end_vertebra"] in r["levels"].split(",") for r in rows if r["cobb_max_deg"] != "n/a")
    # the fields of view end at L4 (no L5, no sacrum) and start at T12: no lordosis, no kyphosis
    assert all(r["lordosis_L1_S1_deg"] == r["kyphosis_T4_T12_deg"] == "n/a" for r in rows if "L5" not in r["levels"])
    cols = json.loads((out / GROUP_JSON).read_text())
    assert cols["lordosis_L1_S1_deg"]["Units"] == "degrees" and cols["lordosis_L1_S1_deg"]["Reference"]
    by = {r["bids_name"]: r for r in rows}
    gap = [r for r in rows if "gap" in r["qc_flags"]]
    assert gap and all("L2 missing" in r["qc_gaps"] for r in gap)
    assert any("missing_disc" in r["qc_flags"] and "inconsistent" in r["qc_flags"] for r in rows)
    collapsed = [r for r in rows
                 if r["L3_body_height_middle_mm"] != "n/a" and float(r["L3_body_height_middle_mm"]) < 18]
    assert collapsed and all("outlier" in r["qc_flags"] and "L3 body" in r["outliers"] for r in collapsed)
    clean = [r for r in rows if r["qc_flags"] == "none"]
    assert clean and by[clean[0]["bids_name"]]["n_outliers"] == "0"
    # long format: one row per scan x level x structure x measure, with z and outlier columns
    long_rows = _tsv(out / LEVELS_TSV)
    assert list(long_rows[0]) == ["bids_name", "level", "structure", "measure", "value", "robust_z", "outlier"]
    assert {r["bids_name"] for r in long_rows} == set(stems)
    flagged = [r for r in long_rows if r["outlier"] == "1"]
    assert any(r["level"] == "L3" and r["structure"] == "body" for r in flagged)
    # few false alarms: the cohort's repeated synthetic scans differ only by rasterisation
    assert len(flagged) < 0.03 * len(long_rows), (len(flagged), len(long_rows))
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert {"group_*", "*_morphometry.tsv", "*_morphometry.json", "*.png", "*.html"} <= set(ignore)


def test_measures_from_masks_match_participant_tables(tmp_path, templates) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_cohort(a, 3, templates=templates[:3], figure=False)
    make_cohort(b, 3, templates=templates[:3], measurements=False, figure=False)
    ga, gb = build_group(a), build_group(b)
    assert [r.source for r in gb.scans] == ["masks"] * 3
    for ra, rb in zip(ga.scans, gb.scans):
        va = {k[:3]: k[3] for k in ra.values}
        vb = {k[:3]: k[3] for k in rb.values}
        assert va.keys() == vb.keys()
        for k in va:
            if np.isnan(va[k]):
                assert np.isnan(vb[k]), k
                continue
            # volumes are voxel counts: equal; the other measures may move by sampling noise because
            # the NIfTI header stores the affine in float32 (half a voxel step at most, 6 % for areas)
            tol = 1e-3 * abs(va[k]) if k[2] == "volume_mm3" else (0.06 * abs(va[k]) if k[2] == "csa_mm2" else 1.5)
            assert abs(va[k] - vb[k]) <= tol, (k, va[k], vb[k])


def test_single_scan_and_errors(tmp_path, templates) -> None:
    with pytest.raises(NoInputError):
        build_group(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoMatchError):
        build_group(tmp_path / "empty")
    out = tmp_path / "one"
    make_cohort(out, 1, templates=templates[:1], figure=False)
    s = build_group(out)
    assert s.n_scans == 1 and s.n_outliers == 0
    html = (out / REPORT_HTML).read_text()
    assert "sub-0001_acq-sag" in html
    with pytest.raises(NoMatchError):
        build_group(out, participant_labels=["9999"])


def test_unreadable_scan_is_left_out(tmp_path, templates) -> None:
    out = tmp_path / "d"
    stems = make_cohort(out, 2, templates=templates[:2], measurements=False, figure=False)
    bad = next(out.rglob(f"{stems[1]}_desc-spine_dseg.nii.gz"))
    bad.write_bytes(b"not a nifti")
    s = build_group(out)
    assert [r.bids_name for r in s.scans] == [stems[0]] and list(s.failed) == [stems[1]]


def test_report_is_self_contained(cohort) -> None:
    out, stems, summary = cohort
    html = (out / REPORT_HTML).read_text(encoding="utf-8")
    assert "<link" not in html and not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html
    # no network calls in the script: the only URL is the SVG namespace
    urls = set(re.findall(r"https?://[^\s\"'<>]+", html))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    data = json.loads(blob)
    assert len(data["scans"]) == 40
    figs = [s["fig"] for s in data["scans"]]
    assert all(f and (out / f).is_file() for f in figs)  # relative paths to the participant PNGs
    assert len(html.encode()) < 400_000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install -y chromium): the report is not rendered")


def _run_chromium(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    browser = _chromium()
    profile = tempfile.mkdtemp(prefix="spineps-chromium-")
    try:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", "--virtual-time-budget=8000", *args],
            capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _console_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln and ("Uncaught" in ln or "Error" in ln)]


def test_report_renders_in_headless_chromium(cohort, tmp_path) -> None:
    out, stems, _ = cohort
    url = (out / REPORT_HTML).resolve().as_uri()
    res = _run_chromium(["--dump-dom", url])
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert re.search(r'<body[^>]*data-ready="1"', dom), "the report script did not finish"
    assert re.search(r'<body[^>]*data-errors="0"', dom), "JavaScript errors on the page"
    assert not _console_errors(res.stderr), _console_errors(res.stderr)
    body = re.search(r'<tbody id="scan-body">(.*?)</tbody>', dom, re.S).group(1)
    assert len(re.findall(r"<tr data-scan=", body)) == 40  # one page (50 rows) holds the cohort
    assert 'id="dist-svg"' in dom and len(re.findall(r"<circle", dom)) >= 40
    assert len(re.findall(r'<img loading="lazy"', dom)) == 40
    # a scan page through its hash: figure, rating control
    res = _run_chromium(["--dump-dom", url + "#scan=" + stems[3]])
    dom = res.stdout
    assert re.search(r'<body[^>]*data-errors="0"', dom)
    assert re.search(r'<section id="scan-view"(?! hidden)', dom) and f'id="scan-title">{stems[3]}<' in dom
    assert 'name="rating" value="pass"' in dom and 'name="rating" value="artifact"' in dom
    # screenshot: kept under tmp_path; copied to docs/report.png with SPINEPS_UPDATE_REPORT_SCREENSHOT=1
    shot = tmp_path / "report.png"
    res = _run_chromium(["--hide-scrollbars", "--window-size=1280,1500", f"--screenshot={shot}", url])
    assert res.returncode == 0 and shot.is_file() and shot.stat().st_size > 50_000
    if os.environ.get("SPINEPS_UPDATE_REPORT_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "report.png")
