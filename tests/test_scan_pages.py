"""Per-scan pages (``spineps.group.scan_page``): one self-contained page per scan, linked from
the group report's table, with the figure, level names and naming evidence, QC flags and their
triggers, per-level measurements, model provenance and timings; rendered in headless Chromium
(when installed) without console errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spineps import loading
from spineps.cli.main import main
from spineps.group.report import REPORT_HTML, build_group
from spineps.group.scan_page import SCAN_PAGES_DIR, VOLATILE_RE
from tests.bids_factory import BidsFactory
from tests.group_cohort import make_cohort, make_templates
from tests.segmenters import make_test_segmenters
from tests.test_group_report import _console_errors, _run_chromium


def _blob(out: Path) -> dict:
    html = (out / REPORT_HTML).read_text(encoding="utf-8")
    return json.loads(re.search(r'id="report-data">(.*?)</script>', html, re.S).group(1).replace("<\\/", "</"))


def _self_contained(html: str) -> None:
    assert "<link" not in html and not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html) and "@import" not in html
    assert not re.findall(r"https?://[^\s\"'<>]+", html)


@pytest.fixture(scope="module")
def run_outputs(tmp_path_factory) -> Path:
    """A real participant run (test-only segmenters) of two scans, then the group level."""
    root = tmp_path_factory.mktemp("pages")
    ds = BidsFactory(root / "bids")
    ds.add("01", acq="sag")
    ds.add("02", "a", acq="sag", seed=2)
    out = root / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))
    try:
        assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0
        assert main([str(ds.root), str(out), "group"]) == 0
    finally:
        mp.undo()
    return out


def test_every_scan_has_a_linked_self_contained_page(run_outputs: Path) -> None:
    out = run_outputs
    scans = _blob(out)["scans"]
    assert sorted(s["pg"] for s in scans) == sorted(f"{SCAN_PAGES_DIR}/{s['n']}.html" for s in scans)
    sem, ins = make_test_segmenters()
    for s in scans:
        html = (out / s["pg"]).read_text(encoding="utf-8")
        _self_contained(html)
        assert f"<h1 id='scan-title'>{s['n']}</h1>" in html
        assert "src='data:image/png;base64," in html  # the figure travels with the page
        for section in ("Overlay figure", "Level names and naming evidence", "QC flags", "Per-level measurements",
                        "Models and timings"):
            assert f"<h2>{section}</h2>" in html
        for model in (sem, ins):
            prov = model.provenance()
            assert f"<td>{prov['name']}</td>" in html and prov["checksum"] in html
        assert "<td>semantic_total</td>" in html and "Rule used: <b>" in html and "confidence <b>" in html
        assert "What each cue alone suggests" in html and "<td>height_middle_mm</td>" not in html  # measures: columns
        assert "<th>height_middle_mm</th>" in html or "<th>volume_mm3</th>" in html
        assert f"href='../{REPORT_HTML}#scan={s['n']}'" in html
        # tools comparing two runs strip what differs between them: the run id and the timings
        stable = VOLATILE_RE.sub("", html)
        assert "RunId=" in html and "RunId=" not in stable and "semantic_total" not in stable
        assert "level_rule=auto" in stable and "Models and timings" in stable


def test_qc_flags_name_their_triggers(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    stems = make_cohort(out, 12, templates=make_templates(4, spacing=(1.5, 1.5, 3.0)))
    summary = build_group(out)
    gap = next(r for r in summary.scans if "gap" in (r.qc.get("flags") or []))
    html = (out / gap.page).read_text(encoding="utf-8")
    row = re.search(r"<tr><td><span class='flag'>gap</span></td><td>[^<]*</td><td>([^<]*)</td></tr>", html)
    assert row and row.group(1).strip(), "the gap flag names the missing level"
    assert len(list((out / SCAN_PAGES_DIR).glob("*.html"))) == len(stems)


def test_scan_page_renders_in_headless_chromium(run_outputs: Path) -> None:
    out = run_outputs
    scan = _blob(out)["scans"][0]
    res = _run_chromium(["--dump-dom", (out / scan["pg"]).resolve().as_uri()])
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert re.search(r'<body[^>]*data-ready="1"', dom) and re.search(r'<body[^>]*data-errors="0"', dom)
    width = re.search(r'data-figure-width="(\d+)"', dom)
    assert width and int(width.group(1)) > 100, "the embedded figure did not decode"
    assert not _console_errors(res.stderr), _console_errors(res.stderr)
    # the report's table links to it
    res = _run_chromium(["--dump-dom", (out / REPORT_HTML).resolve().as_uri()])
    assert f'<a class="pg" title="the scan\'s own page (self-contained)" href="{scan["pg"]}">page</a>' in res.stdout
    res = _run_chromium(["--dump-dom", (out / REPORT_HTML).resolve().as_uri() + "#scan=" + scan["n"]])
    assert f'id="scan-page-link" href="{scan["pg"]}"' in res.stdout
    assert re.search(r'<body[^>]*data-errors="0"', res.stdout)
