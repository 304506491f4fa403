"""QC indicators and the per-scan figure."""

from __future__ import annotations


import numpy as np
import pytest

from spineps.labels import DISC
from spineps.measure.qc import REFERENCE_RANGES_ML, assess
from spineps.bids.derivatives import BIDSIGNORE_LINES
from spineps.measure.scan import measure_scan
from tests.measure_phantoms import make_column


@pytest.fixture(scope="module")
def small():
    return make_column(levels=(19, 20, 21, 22, 23), spacing=(1.2, 1.2, 3.0))


def test_clean_column_has_no_flags(small) -> None:
    m = measure_scan(small.semantic, small.instance, {"rule": "sacrum", "confidence": 0.95, "levels": ["T12"]})
    assert m.qc.levels == ["T12", "L1", "L2", "L3", "L4"]
    assert m.qc.n_vertebrae == 5
    assert m.qc.flags == [] and m.qc.gaps == [] and m.qc.missing_discs == []
    assert m.qc.inconsistent_fraction == 0.0
    assert m.qc.naming_rule == "sacrum" and m.qc.naming_confidence == 0.95


def test_gap_and_missing_disc(small) -> None:
    inst = np.asarray(small.instance.data).copy()
    sem = np.asarray(small.semantic.data).copy()
    gone = np.isin(inst, (21, 121, 221))  # L2 with its disc and endplates
    inst[gone] = 0
    sem[gone] = 0
    inst[inst == 119] = 0  # the T12/L1 disc loses its instance: semantic-only voxels
    m = measure_scan(small.semantic.with_data(sem), small.instance.with_data(inst), {"rule": "sacrum"})
    assert m.qc.gaps == ["L1-L3: L2 missing"]
    assert "T12/L1" in m.qc.missing_discs
    assert m.qc.semantic_only_mm3 > 0 and m.qc.inconsistent_fraction > 0.01
    assert {"gap", "missing_disc", "inconsistent"} <= set(m.qc.flags)


def test_class_mismatch_counts(small) -> None:
    sem = np.asarray(small.semantic.data).copy()
    inst = np.asarray(small.instance.data)
    sem[(inst == 21) & (sem == 49)] = DISC  # a body painted as disc
    m = measure_scan(small.semantic.with_data(sem), small.instance, {})
    assert m.qc.class_mismatch_mm3 > 1000
    assert "inconsistent" in m.qc.flags


def test_t13_and_l6_are_not_gaps(small) -> None:
    from spineps.measure.qc import _gaps

    assert _gaps([18, 19, 28, 20, 21]) == []
    assert _gaps([23, 24, 25, 26]) == []
    assert _gaps([19, 21]) == ["T12-L2: L1 missing"]


def test_size_flags_use_region_ranges(small) -> None:
    lo, hi = REFERENCE_RANGES_ML[("body", "lumbar")]
    vols = {("L1", "body"): (lo / 2) * 1000.0, ("L2", "body"): (lo + hi) / 2 * 1000.0,
            ("L3/L4", "disc"): 60_000.0}
    qc = assess(small.semantic, small.instance, {"confidence": 0.2}, vols, truncated=[])
    assert len(qc.size_flags) == 2
    assert qc.size_flags[0].startswith("L1 body") and "small" in qc.size_flags[0]
    assert "large" in qc.size_flags[1]
    assert {"size", "naming_uncertain"} <= set(qc.flags)
    # structures cut by the field of view are not judged
    qc2 = assess(small.semantic, small.instance, {}, vols, truncated=["L1 body", "L3/L4 disc"])
    assert qc2.size_flags == []


def test_semantic_only_scan(small) -> None:
    m = measure_scan(small.semantic, None, {})
    assert m.qc.flags == ["no_instances"]
    assert all(v.level == "all" for v in m.values)
    assert {"*_morphometry.tsv", "*_morphometry.json", "group_*"} <= set(BIDSIGNORE_LINES)


def test_figure_shows_the_masks(small, tmp_path) -> None:
    import matplotlib.image as mpimg

    from spineps.geometry.volume import Volume
    from spineps.measure.figures import render_panels, write_figure

    rng = np.random.default_rng(0)
    img = Volume((np.asarray(small.semantic.data) > 0) * 200.0 + rng.normal(50, 10, small.semantic.shape),
                 small.semantic.affine)
    # (its cost is measured in benchmarks/run_benchmark.py's "figures" phase, not asserted here)
    out = write_figure(small.semantic, small.instance, tmp_path / "sub-01_desc-spine_dseg.png", image=img,
                       title="sub-01")
    png = mpimg.imread(out)
    assert png.ndim == 3 and png.shape[0] >= 500 and png.shape[1] >= 300
    # the body colour of the semantic registry (#f032e6, magenta) is blended into the sagittal panel
    rgb = png[..., :3]
    assert np.any((rgb[..., 0] > rgb[..., 1] + 0.15) & (rgb[..., 2] > rgb[..., 1] + 0.1))
    panels = render_panels(small.semantic, small.instance, img)
    assert [t[0] for t in panels["sagittal"]["text"]] == ["T12", "L1", "L2", "L3", "L4"]
    sag = panels["sagittal"]["labels"]
    assert set(np.unique(sag)) >= {49, 100, 61}
    cor = panels["coronal"]["labels"]
    assert set(np.unique(cor)) >= {19, 20, 21, 22, 23}
    # superior is up: the top rows hold the top vertebra, the bottom rows the bottom one
    rows = {v: np.argwhere(cor == v)[:, 0].mean() for v in (19, 23)}
    assert rows[19] < rows[23]
    assert not list(tmp_path.glob(".spineps-tmp-*"))


def test_figure_without_image(small, tmp_path) -> None:
    from spineps.measure.figures import write_figure

    out = write_figure(small.semantic, small.instance, tmp_path / "x.png")
    assert out.stat().st_size > 10_000


def test_level_order_against_space(small) -> None:
    inst = np.asarray(small.instance.data).copy()
    swap = {20: 22, 22: 20}  # L1 and L3 exchanged: labels no longer run top to bottom
    out = inst.copy()
    for a, b in swap.items():
        out[inst == a] = b
    m = measure_scan(small.semantic, small.instance.with_data(out), {})
    assert "order" in m.qc.flags and m.qc.order_errors
    # the axes still follow the neighbours in space: the heights stay right
    assert abs(m.get("L2", "body", "height_middle_mm") - 24.0) <= 1.0
    clean = measure_scan(small.semantic, small.instance, {})
    assert clean.qc.order_errors == []
