"""Post-processing: consistency rules (holes, zeroing, orphans, sacrum) and discs/endplates."""

from __future__ import annotations

import numpy as np
import pytest

from spineps.errors import InputError
from spineps.geometry.volume import Volume
from spineps.labels import VERTEBRA_ORDER
from spineps.postprocess.consistency import ConsistencyStats, consistency_problems, make_consistent
from spineps.postprocess.discs import assign_discs_and_endplates
from tests.test_levels_phantom import build_phantom

AFF = np.diag([2.0, 1.0, 1.0, 1.0])


def _vol(a: np.ndarray) -> Volume:
    return Volume(a, AFF)


def _two_vertebrae() -> tuple[np.ndarray, np.ndarray]:
    """Two stacked 6x6x6 body blocks (z up = superior): id 1 on top, id 2 below."""
    sem = np.zeros((10, 10, 20), np.uint8)
    inst = np.zeros_like(sem, dtype=np.int16)
    sem[2:8, 2:8, 11:17] = 49
    inst[2:8, 2:8, 11:17] = 1
    sem[2:8, 2:8, 2:8] = 49
    inst[2:8, 2:8, 2:8] = 2
    return sem, inst


def test_holes_filled_per_instance():
    sem, inst = _two_vertebrae()
    inst[4:6, 4:6, 13:15] = 0  # an enclosed hole in instance 1, vertebra body in the semantic mask
    st = ConsistencyStats()
    _, v2 = make_consistent(_vol(sem), _vol(inst), stats=st)
    assert st.filled == 8 and st.orphans_assigned == 0
    assert (v2.data[4:6, 4:6, 13:15] == 1).all()


def test_hole_that_is_background_in_semantic_stays_empty():
    sem, inst = _two_vertebrae()
    sem[4:6, 4:6, 13:15] = 0
    inst[4:6, 4:6, 13:15] = 0
    s2, v2 = make_consistent(_vol(sem), _vol(inst))
    assert (v2.data[4:6, 4:6, 13:15] == 0).all() and (s2.data[4:6, 4:6, 13:15] == 0).all()


def test_instance_voxels_outside_semantic_are_zeroed():
    sem, inst = _two_vertebrae()
    inst[2:8, 2:8, 17:19] = 1  # over background
    sem[0:2, 2:8, 11:17] = 61  # canal
    inst[0:2, 2:8, 11:17] = 1
    sem[2:8, 2:8, 9:10] = 100  # a disc the instance net covered
    inst[2:8, 2:8, 9:10] = 2
    st = ConsistencyStats()
    s2, v2 = make_consistent(_vol(sem), _vol(inst), stats=st)
    assert st.zeroed == 72 + 72 + 36
    assert not v2.data[s2.data == 0].any()
    assert not v2.data[np.isin(s2.data, (61, 100))].any()


def test_orphan_goes_to_neighbour_with_most_contact():
    sem, inst = _two_vertebrae()
    # an uncovered arcus component: 1 face voxel against vertebra 1, a 6x2 face against 2
    sem[8:10, 2:8, 6:11] = 41
    st = ConsistencyStats()
    _, v2 = make_consistent(_vol(sem), _vol(inst), stats=st)
    assert st.orphans_assigned == 60
    assert (v2.data[8:10, 2:8, 6:11] == 2).all()
    # mirror it: more contact with the upper vertebra
    sem, inst = _two_vertebrae()
    sem[8:10, 2:8, 7:12] = 41
    _, v2 = make_consistent(_vol(sem), _vol(inst))
    assert (v2.data[8:10, 2:8, 7:12] == 1).all()


def test_isolated_fragments_removed_and_missed_vertebra_becomes_instance():
    sem, inst = _two_vertebrae()
    sem[0, 0, 0] = 42  # a tiny loose fragment
    big = np.zeros((10, 10, 30), np.uint8)
    big[:, :, :20] = sem
    big_inst = np.zeros(big.shape, np.int16)
    big_inst[:, :, :20] = inst
    big[2:8, 2:8, 21:29] = 49  # a whole body above vertebra 1 that the instance phase missed
    st = ConsistencyStats()
    s2, v2 = make_consistent(_vol(big), _vol(big_inst), stats=st, min_new_instance_mm3=400.0)
    assert st.orphans_removed == 1 and s2.data[0, 0, 0] == 0
    assert st.new_instances == 1
    # renumbered top to bottom: the new top vertebra is 1, the old ones follow
    assert (v2.data[2:8, 2:8, 21:29] == 1).all()
    assert (v2.data[2:8, 2:8, 11:17] == 2).all() and (v2.data[2:8, 2:8, 2:8] == 3).all()
    assert consistency_problems(s2, v2) == []


def test_sacrum_and_fragments_touching_only_the_sacrum():
    sem, inst = _two_vertebrae()
    big = np.zeros((10, 10, 30), np.uint8)
    big[:, :, 10:] = sem
    bi = np.zeros(big.shape, np.int16)
    bi[:, :, 10:] = inst
    big[1:9, 1:9, 0:9] = 26
    bi[1:9, 1:9, 0:9] = 2  # the instance net called part of the sacrum vertebra 2
    big[9, 3:6, 0:5] = 41  # sacral arch predicted as arcus, touching only the sacrum
    s2, v2 = make_consistent(_vol(big), _vol(bi))
    assert (v2.data[big == 26] == 26).all()
    assert (s2.data[9, 3:6, 0:5] == 26).all() and (v2.data[9, 3:6, 0:5] == 26).all()
    assert consistency_problems(s2, v2) == []


def test_grid_mismatch_raises_and_too_many_vertebrae_end_in_the_sacrum():
    sem, inst = _two_vertebrae()
    with pytest.raises(InputError):
        make_consistent(_vol(sem), Volume(inst, np.eye(4)))
    sem = np.zeros((4, 4, 60), np.uint8)
    inst = np.zeros(sem.shape, np.int16)
    for k in range(27):  # 27 separate one-voxel-gap vertebrae, 26 distinct ids
        sem[:, :, 59 - 2 * k] = 49
        inst[:, :, 59 - 2 * k] = k + 1 if k + 1 != 26 else 27
    s2, v2 = make_consistent(_vol(sem), _vol(inst))  # no longer an error: the lowest become sacrum
    out = np.asarray(v2.data)
    assert sorted(int(v) for v in np.unique(out) if v) == list(range(1, 27))
    assert (np.asarray(s2.data)[out == 26] == 26).all()


def test_dropped_instance_renumbers_consecutively():
    sem, inst = _two_vertebrae()
    big = np.zeros((10, 10, 30), np.uint8)
    big[:, :, :20] = sem
    bi = np.zeros(big.shape, np.int16)
    bi[:, :, :20] = inst + (inst > 0)  # ids 2 and 3
    bi[2:8, 2:8, 22:26] = 1  # instance 1 lies on background only -> dropped
    st = ConsistencyStats()
    _, v2 = make_consistent(_vol(big), _vol(bi), stats=st)
    assert st.dropped_instances == [1]
    assert sorted(np.unique(v2.data).tolist()) == [0, 1, 2]


# ------------------------------------------------------------------------------ discs / endplates
def _pipeline(ph):
    s2, v2 = make_consistent(ph.semantic, ph.anonymous)
    return assign_discs_and_endplates(s2, v2)


def _anon_truth(ph) -> np.ndarray:
    """The phantom's named truth expressed in anonymous ids (k = position of the level)."""
    lut = np.zeros(300, np.int32)
    for k, v in enumerate(ph.levels, start=1):
        lut[v], lut[100 + v], lut[200 + v] = k, 100 + k, 200 + k
    above = VERTEBRA_ORDER[VERTEBRA_ORDER.index(ph.levels[0]) - 1]
    lut[100 + above], lut[200 + above] = 100, 200  # structures above the top vertebra: X = 0
    lut[26] = 26
    return lut[ph.truth.data]


@pytest.mark.parametrize("levels,curve", [(list(range(17, 25)), 0.0), (list(range(4, 11)), 12.0)])
def test_discs_endplates_on_phantom(levels, curve):
    ph = build_phantom(levels, sacrum=levels[-1] == 24, curve_mm=curve, noise=0.05, seed=3)
    s3, i3 = _pipeline(ph)
    want = _anon_truth(ph)
    disc = ph.semantic.data == 100
    ep = ph.semantic.data == 62
    assert (i3.data[disc] == want[disc]).all()  # 100 + the vertebra above
    assert (i3.data[ep] == want[ep]).all()  # 200 + X of the adjacent disc
    assert (s3.data[ep] == ph.split.data[ep]).all()  # superior 52 / inferior 53
    assert not (s3.data == 62).any()
    assert consistency_problems(s3, i3) == []
    # and every vertebra voxel kept its id
    vert = (ph.anonymous.data > 0)
    assert (i3.data[vert] == ph.anonymous.data[vert]).all()


def test_disc_above_top_vertebra_and_sacral_remnant():
    ph = build_phantom(list(range(19, 25)), seed=1)
    sem = ph.semantic.data.copy()
    anon = ph.anonymous.data.copy()
    # crop away the top vertebra (T12) but keep the T12/L1 disc: the top vertebra is now L1
    z_t12 = np.nonzero(ph.truth.data == 19)[2]
    sem[:, :, z_t12.min():] = 0
    anon[:, :, z_t12.min():] = 0
    anon[anon > 0] -= 1
    # a remnant S1/S2 disc deep inside the sacrum
    zs = np.nonzero(sem == 26)[2]
    zmid = (zs.min() + zs.max()) // 3
    sac_xy = sem[:, :, zmid] == 26
    sem[:, :, zmid][sac_xy] = 100
    s3, i3 = assign_discs_and_endplates(*make_consistent(ph.semantic.with_data(sem), ph.semantic.with_data(anon)))
    top_disc = ph.truth.data == 119
    assert (i3.data[top_disc] == 100).all()  # X = 0: no vertebra above in view
    assert (s3.data[:, :, zmid][sac_xy] == 26).all() and (i3.data[:, :, zmid][sac_xy] == 26).all()
    l5s1 = ph.truth.data == 124
    assert (i3.data[l5s1] == 105).all()  # L5 is anonymous 5 here
    assert consistency_problems(s3, i3) == []


def test_consistency_checker_finds_problems():
    sem, inst = _two_vertebrae()
    sem[0, 0, 0] = 100  # a disc with no instance
    inst[9, 9, 19] = 3  # an instance on background
    probs = consistency_problems(_vol(sem), _vol(inst))
    assert any("without instance" in p for p in probs) and any("background" in p for p in probs)


def test_surplus_instances_below_the_25th_become_sacrum():
    """27 stacked 'vertebrae' (a semantic model that took sacral segments for bodies): the
    lowest two become sacrum in both masks; the 25 above keep ids 1..25 top to bottom."""
    from spineps.geometry.volume import Volume
    from spineps.postprocess.consistency import ConsistencyStats, consistency_problems, make_consistent

    n = 27
    sem = np.zeros((6, n * 4, 6), np.uint8)
    inst = np.zeros(sem.shape, np.uint16)
    for k in range(n):  # array axis 1 runs superior -> inferior (affine below), 3 voxels body + 1 gap
        sem[1:5, 4 * k:4 * k + 3, 1:5] = 49
        inst[1:5, 4 * k:4 * k + 3, 1:5] = k + 1 if k + 1 < 26 else k + 2  # anonymous ids skip 26
    affine = np.array([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])
    affine[1, 2] = 1.0  # axis 2 -> A, axis 1 -> I (2 mm), axis 0 -> R
    st = ConsistencyStats()
    s2, v2 = make_consistent(Volume(sem, affine), Volume(inst, affine), stats=st)
    out, sout = np.asarray(v2.data), np.asarray(s2.data)
    assert st.surplus_to_sacrum == 2
    assert sorted(int(v) for v in np.unique(out) if v) == list(range(1, 27))
    for k in range(25):
        assert set(np.unique(out[1:5, 4 * k:4 * k + 3, 1:5])) == {k + 1}
    assert set(np.unique(out[1:5, 4 * 25:, 1:5])) <= {0, 26} and (out[1:5, 4 * 25:, 1:5] == 26).any()
    assert set(np.unique(sout[out == 26])) == {26}
    assert consistency_problems(s2, v2) == []
