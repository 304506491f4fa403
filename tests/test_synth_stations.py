"""Phantom extensions for spinal alignment and whole-spine stations: slips and wedged bodies
with their true endplates (``spineps.synth.truth``), one anatomy on any grid, and a
phantom cut into stations (``spineps.synth.stations``)."""

from __future__ import annotations

import numpy as np
import pytest

from spineps.synth.anatomy import PhantomSpec, make_phantom, phantom_layout
from spineps.synth.stations import StationCut, cut_stations, even_cuts
from spineps.synth.truth import alignment_truth

LUMBAR = dict(seed=4, fov="lumbar", spacing=(1.5, 1.5, 3.0))


def _world_points(ph, value: int) -> np.ndarray:
    idx = np.argwhere(ph.instance.data == value)
    return idx @ ph.instance.affine[:3, :3].T + ph.instance.affine[:3, 3]


def test_a_slip_moves_the_spine_above_it_and_nothing_else() -> None:
    plain = make_phantom(PhantomSpec(**LUMBAR))
    slipped = make_phantom(PhantomSpec(**LUMBAR, slips=(("L4", 7.0),)))
    # below the slip (L5, sacrum) nothing moved; L3 moved anteriorly
    for v in (24, 26):
        assert np.allclose(_world_points(plain, v).mean(0), _world_points(slipped, v).mean(0), atol=0.3)
    move = _world_points(slipped, 22).mean(0) - _world_points(plain, 22).mean(0)
    assert 5.0 < np.linalg.norm(move) < 9.0 and move[1] > 3.0  # anterior (+A) in this lordotic region
    truth = alignment_truth(slipped.meta)
    mm, pct = truth["slip"]["L4/L5"]
    assert 5.0 < mm < 7.5 and 12.0 < pct < 25.0
    assert abs(alignment_truth(plain.meta)["slip"]["L4/L5"][0]) < 1.5


def test_a_wedge_tilts_the_endplates_of_one_body() -> None:
    ph = make_phantom(PhantomSpec(**LUMBAR, wedges=(("L1", 14.0),)))
    truth = alignment_truth(ph.meta)
    assert truth["wedge"]["L1"] == pytest.approx(14.0, abs=0.5)
    assert abs(truth["wedge"]["L2"]) < 0.5
    # the anterior wall is shorter than the posterior one (mid-sagittal corners)
    ep = ph.meta["endplates_world"]["L1"]
    ant = np.linalg.norm(np.subtract(ep["superior"]["anterior"], ep["inferior"]["anterior"]))
    post = np.linalg.norm(np.subtract(ep["superior"]["posterior"], ep["inferior"]["posterior"]))
    assert post - ant > 6.0
    with pytest.raises(ValueError):
        make_phantom(PhantomSpec(**LUMBAR, wedges=(("X9", 3.0),)))


def test_the_truth_of_the_sagittal_curve_matches_the_generator() -> None:
    ph = make_phantom(PhantomSpec(seed=3, fov="whole", spacing=(3.0, 3.0, 4.0)))
    truth = alignment_truth(ph.meta)
    curve = ph.meta["curve"]
    assert truth["lordosis_L1_S1"] == pytest.approx(curve["lumbar_lordosis_deg"], abs=0.2)
    assert truth["lordosis_C2_C7"] > 10.0 and truth["kyphosis_T4_T12"] > 10.0
    assert truth["cobb"] < 1.0  # no scoliosis


def test_stations_show_one_anatomy() -> None:
    spec = PhantomSpec(seed=2, fov="thoracolumbar", spacing=(2.0, 2.0, 4.0))
    cuts = even_cuts(spec, 2, overlap_mm=50.0, spacings=[None, (1.5, 1.5, 3.0)])
    assert cuts[0].bottom_mm < cuts[1].top_mm  # overlap
    top, bottom = cut_stations(spec, cuts)
    common = set(top.levels) & set(bottom.levels)
    assert common and set(top.levels) | set(bottom.levels) >= set(make_phantom(spec).levels) - {26} - {17}
    lo, hi = cuts[1].top_mm - 2, cuts[0].bottom_mm + 2
    for v in common:  # the same vertebra: its voxels in the overlap lie at the same world height
        z_top, z_bot = (_world_points(st.phantom, v)[:, 2] for st in (top, bottom))
        z_top, z_bot = (z[(z < lo) & (z > hi)] for z in (z_top, z_bot))
        if len(z_top) > 50 and len(z_bot) > 50:
            assert abs(np.median(z_top) - np.median(z_bot)) < 3.0
    assert phantom_layout(spec)["fov_world_box"] == make_phantom(spec).meta["fov_world_box"]


def test_a_station_shift_is_in_its_header_only() -> None:
    spec = PhantomSpec(seed=2, fov="lumbar", spacing=(2.0, 2.0, 4.0))
    lo, hi = phantom_layout(spec)["fov_world_box"]
    still, moved = cut_stations(spec, [StationCut(hi[2], lo[2]), StationCut(hi[2], lo[2], shift_mm=(0.0, 4.0, -6.0))])
    assert np.array_equal(still.instance.data, moved.instance.data)
    assert np.allclose(moved.instance.affine[:3, 3] - still.instance.affine[:3, 3], [0.0, 4.0, -6.0])
