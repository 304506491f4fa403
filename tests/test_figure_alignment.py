"""The spinal alignment on the per-scan QC figure (``spineps.measure.figures``): the
endplate lines of the kyphosis / lordosis curves on the sagittal panel and of the Cobb angle
on the coronal one, their angles beside them, and every measure's value or ``n/a (reason)``
in the block under the panels, all from the ``Alignment`` that the measurements hold
(``measure_alignment``), on the truth masks of ``spineps.synth`` phantoms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from spineps.labels import BODY, DISC, ENDPLATE, ENDPLATE_INF, ENDPLATE_SUP, SACRUM, vertebra_value
from spineps.measure.alignment import CURVES, Alignment, measure_alignment
from spineps.measure.figures import ALIGNMENT_COLORS, alignment_overlay, render_panels, write_figure
from spineps.measure.morphometry import measure_morphometry
from spineps.synth.anatomy import PhantomSpec, make_phantom

BONE_OR_DISC = {BODY, ENDPLATE_SUP, ENDPLATE_INF, ENDPLATE, DISC, SACRUM}


def _measured(spec: PhantomSpec):
    ph = make_phantom(spec)
    sem = ph.semantic_split()
    al = measure_alignment(ph.instance, measure_morphometry(sem, ph.instance))
    return ph, sem, al


@pytest.fixture(scope="module")
def lumbar():
    return _measured(PhantomSpec(seed=3, fov="lumbar", spacing=(1.3, 1.3, 3.0), oblique_deg=4.0, scoliosis=9.0))


@pytest.fixture(scope="module")
def cervical():
    return _measured(PhantomSpec(seed=4, fov="cervical", spacing=(1.3, 1.3, 3.0)))


def _label(level: str, measure: str) -> str:
    return f"{measure.replace('_deg', '')} {level.replace('-', '–')}"


def _check_notes(al: Alignment, notes: list[str]) -> int:
    """Every curve and the Cobb angle have one note: the measured value (one decimal) with the
    endplates used, or n/a with the reason that the Alignment recorded. Returns the number measured."""
    measured = 0
    for rng, measure, *_ in CURVES:
        x = al.get(rng, "spine", measure)
        key = f"{rng} spine {measure}"
        mine = [n for n in notes if n.startswith(_label(rng, measure) + " ")]
        assert len(mine) == 1, (rng, notes)
        if math.isfinite(x):
            assert mine[0] == f"{_label(rng, measure)} {x:.1f}° ({al.used[key]})"
            measured += 1
        else:
            assert mine[0] == f"{_label(rng, measure)} n/a ({al.not_measured[key]})"
    cobb = al.get("all", "spine", "cobb_deg")
    (note,) = [n for n in notes if n.startswith("Cobb ")]
    if math.isfinite(cobb):
        ends = f"{al.cobb['upper_end_vertebra']}–{al.cobb['lower_end_vertebra']}"
        assert note.startswith(f"Cobb {ends} {cobb:.1f}° (apex {al.cobb['apex']}, convex {al.cobb['convexity']}; ")
        measured += 1
    else:
        assert note == f"Cobb n/a ({al.not_measured['all spine cobb_deg']})"
    return measured


def test_overlay_is_the_measured_alignment(lumbar) -> None:
    _, _, al = lumbar
    lines, texts = alignment_overlay(al)
    notes = [t.text for t in texts if t.panel == "notes"]
    assert _check_notes(al, notes) == 3  # L1-L5, L1-S1 and the Cobb angle; T4-T12, C2-C7 out of view
    assert any(n.startswith("kyphosis T4–T12 n/a (T4 not in the field of view") for n in notes)
    sag_tags = {t.text for t in texts if t.panel == "sagittal"}
    for rng in ("L1-L5", "L1-S1"):
        assert f"lordosis {rng.replace('-', '–')} {al.get(rng, 'spine', 'lordosis_deg'):.1f}°" in sag_tags
    (cor_tag,) = [t.text for t in texts if t.panel == "coronal"]
    assert cor_tag.startswith(f"Cobb {al.cobb['upper_end_vertebra']}–{al.cobb['lower_end_vertebra']} ")
    # the lines are the endplates the angles were measured between: corner to corner on the sagittal panel
    want = {(f"{rng} spine {m}", f"{n} {s}") for rng, m, up, lo, _ in CURVES if rng in ("L1-L5", "L1-S1")
            for n, s in (up, lo)}
    got = {(ln.measure, ln.endplate) for ln in lines if ln.panel == "sagittal"}
    assert got == want
    for ln in lines:
        name, side = ln.endplate.split()
        plane = al.planes[vertebra_value(name)].plane(side)
        assert plane is not None
        if ln.panel == "sagittal":
            assert np.allclose(ln.start, plane.posterior_corner) and np.allclose(ln.end, plane.anterior_corner)
            assert ln.color == ALIGNMENT_COLORS[ln.measure.split()[0]]
        else:
            assert ln.measure == "all spine cobb_deg" and np.allclose(ln.centre, plane.centre)
            # across the spine, in the endplate's plane
            d = np.asarray(ln.end) - np.asarray(ln.start)
            assert abs(d @ plane.normal) < 1e-6 and abs(d[0]) > 0.9 * np.linalg.norm(d)
    assert {ln.endplate for ln in lines if ln.panel == "coronal"} == {
        f"{al.cobb['upper_end_vertebra']} superior", f"{al.cobb['lower_end_vertebra']} inferior"}


def test_lines_fall_on_the_spine_in_the_panels(lumbar) -> None:
    ph, sem, al = lumbar
    panels = render_panels(sem, ph.instance, None, alignment=al)
    sag, cor = panels["sagittal"], panels["coronal"]
    assert len(sag["lines"]) == 4 and len(cor["lines"]) == 2
    for panel, name in ((sag, "sagittal"), (cor, "coronal")):
        lab = np.asarray(panel["labels"])
        for ln in panel["lines"]:
            (r0, c0), (r1, c1) = ln["rc"]
            for t in np.linspace(0.15, 0.85, 8):
                r, c = int(round(r0 + t * (r1 - r0))), int(round(c0 + t * (c1 - c0)))
                assert 0 <= r < lab.shape[0] and 0 <= c < lab.shape[1], (name, ln["endplate"])
                v = int(lab[r, c])
                if name == "sagittal":
                    assert v in BONE_OR_DISC, (ln["endplate"], t, v)
                else:  # the end vertebra, its endplate or a disc next to it
                    assert v == vertebra_value(ln["endplate"].split()[0]) or 100 <= v < 300, (ln["endplate"], v)
            # the panel coordinates are those of the centroid labels (mm), the pixels those of the labels
            (h0, z0), _ = ln["hz"]
            hh0, dh, zz0, step, _axis = panel["grid"]
            assert (zz0 - z0) / step == pytest.approx(r0) and (h0 - hh0) / dh == pytest.approx(c0)
    # the lordosis lines lie at their vertebrae: L1 superior above L1's label, S1 below L5's
    z_of = {name: z for name, _h, z in sag["text"]}
    (l1,) = {ln["hz"][0][1] for ln in sag["lines"] if ln["endplate"] == "L1 superior"}
    assert z_of["L1"] < l1 < z_of["T12"]
    (s1,) = [ln["hz"][0][1] for ln in sag["lines"] if ln["endplate"] == "S1 superior"]
    assert s1 < z_of["L5"]
    assert [t[0] for t in sag["tags"]] == [f"lordosis {r} {al.get(r.replace('–', '-'), 'spine', 'lordosis_deg'):.1f}°"
                                          for r in ("L1–L5", "L1–S1")]
    assert [n for n, _ in panels["notes"]] == [t.text for t in alignment_overlay(al)[1] if t.panel == "notes"]


def test_figure_with_alignment_is_written(lumbar, tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    ph, sem, al = lumbar
    plain = write_figure(sem, ph.instance, tmp_path / "plain.png")
    out = write_figure(sem, ph.instance, tmp_path / "sub-01_desc-spine_dseg.png", alignment=al, title="sub-01")
    a, b = mpimg.imread(plain), mpimg.imread(out)
    assert a.shape[0] == 700 and b.shape[0] > a.shape[0] and a.shape[1] == b.shape[1]  # the block under the panels
    rgb = b[: a.shape[0], : b.shape[1] // 2, :3]  # the sagittal panel
    for rng in ("L1-L5", "L1-S1"):  # its lines (and tags) in their colours
        want = np.array([int(ALIGNMENT_COLORS[rng][i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(rgb - want).max(axis=2) < 0.02).sum() > 30, rng
    assert not list(tmp_path.glob(".spineps-tmp-*"))


def test_cervical_field_of_view_gives_na_text(cervical, tmp_path: Path) -> None:
    ph, sem, al = cervical
    lines, texts = alignment_overlay(al)
    notes = [t.text for t in texts if t.panel == "notes"]
    assert _check_notes(al, notes) == 1  # only C2-C7
    assert "lordosis L1–S1 n/a (L1 not in the field of view; no sacrum in the mask)" in notes
    assert any(n.startswith("Cobb n/a (") for n in notes)
    assert {ln.measure for ln in lines} == {"C2-C7 spine lordosis_deg"}
    out = write_figure(sem, ph.instance, tmp_path / "c.png", alignment=al)
    assert out.stat().st_size > 10_000


def test_nothing_measurable_is_listed_not_raised(lumbar, tmp_path: Path) -> None:
    ph, sem, _ = lumbar
    empty = Alignment()  # no values, no planes (e.g. a mask without bodies)
    lines, texts = alignment_overlay(empty)
    assert lines == [] and [t.text for t in texts] == [
        "lordosis C2–C7 n/a (not measured)", "kyphosis T4–T12 n/a (not measured)",
        "lordosis L1–L5 n/a (not measured)", "lordosis L1–S1 n/a (not measured)", "Cobb n/a (not measured)"]
    assert write_figure(sem, ph.instance, tmp_path / "e.png", alignment=empty).stat().st_size > 10_000


def test_participant_passes_the_measured_alignment(lumbar, tmp_path: Path) -> None:
    """The participant pipeline draws the Alignment its measurements hold (the figure gets the
    block of alignment notes), without measuring again."""
    import matplotlib.image as mpimg

    from spineps.bids.derivatives import FIGURE
    from spineps.bids.discovery import Scan
    from spineps.measure.scan import measure_scan
    from spineps.participant import _write_measurements_and_figure
    from spineps.pipeline import ScanResult

    ph, sem, _ = lumbar
    raw = tmp_path / "raw"
    scan = Scan(raw / "sub-01" / "anat" / "sub-01_T2w.nii.gz", raw, {"sub": "01"}, "T2w", ".nii.gz")
    m = measure_scan(sem, ph.instance, {})
    res = ScanResult(sem, ph.instance, {}, {}, {}, [], {}, measurements=m)
    out = tmp_path / "out"
    sem_path = out / "sub-01" / "anat" / "sub-01_desc-spine_dseg.nii.gz"
    sem_path.parent.mkdir(parents=True)
    _write_measurements_and_figure(out, scan, res, None, sem_path)
    png = mpimg.imread(FIGURE.path(out, scan))
    assert png.shape[0] > 700
    # a station of a session: the session's level-range values are listed too
    m.session = {"Stations": ["a", "b"]}
    lines, texts = alignment_overlay(m.alignment, [v for v in m.values if v.structure == "spine"])
    assert texts[-1].text.startswith("session (stations together, as in the morphometry TSV): lordosis C2–C7 n/a")
