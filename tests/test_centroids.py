"""The vertebral-body centroids the pipeline computes once per scan
(``postprocess.vertebrae.vertebra_centroids``): body centre of mass per vertebra (whole
vertebra where it has no body voxel), renamed to the level values, shifted back from the
spine's box to the full grid, and written as voxel and world coordinates
(``pipeline.centroids_json``), against scipy's per-label centre of mass."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from spineps.geometry.volume import Volume
from spineps.labels import BODY
from spineps.pipeline import Postprocessed, centroids_json
from spineps.postprocess.vertebrae import vertebra_centroids, vertebra_frames


def _layout() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    inst = np.zeros((30, 40, 12), np.uint16)
    sem = np.zeros(inst.shape, np.uint8)
    for k in range(4):  # anonymous vertebrae 1..4, top to bottom
        block = (slice(2 + 7 * k, 8 + 7 * k), slice(3, 30), slice(2, 10))
        inst[block] = k + 1
        sem[block] = 41
        body = rng.random(inst[block].shape) < 0.5
        if k != 2:  # vertebra 3 has no body voxel: its whole-vertebra centre is used
            sem[block][body] = BODY
    inst[0, 0, 0] = 120  # a disc value: not a vertebra
    return sem, inst


def test_centroids_match_scipy_on_a_random_layout() -> None:
    sem, inst = _layout()
    affine = np.array([[0.0, 0.0, 3.0, -10.0], [-1.0, 0.0, 0.0, 50.0], [0.0, -1.0, 0.0, 20.0], [0, 0, 0, 1]])
    cen = vertebra_centroids(Volume(sem, affine), Volume(inst, affine))
    assert cen.ids == (1, 2, 3, 4)
    assert list(cen.n_body > 0) == [True, True, False, True]
    names = {1: 18, 2: 19, 3: 20, 4: 28}  # T11, T12, L1 and a T13
    offset = (5, 0, 2)  # the spine's box started there in the full grid
    full_affine = affine.copy()
    full_affine[:3, 3] -= affine[:3, :3] @ np.asarray(offset, float)
    named = cen.renamed(names).shifted(offset)
    full = Volume(np.zeros((40, 40, 14), np.uint16), full_affine)
    post = Postprocessed(full, full, named, None, {})
    got = centroids_json(post)
    assert sorted(got) == [18, 19, 20, 28]
    for k, v in names.items():
        own = (inst == k) & (sem == BODY) if k != 3 else inst == k
        ref = np.asarray(ndimage.center_of_mass(own)) + offset
        assert np.allclose(got[v]["voxel"], ref, atol=1e-3)
        assert np.allclose(got[v]["world"], full_affine[:3, :3] @ ref + full_affine[:3, 3], atol=1e-3)
        # world positions do not depend on the grid they were computed on
        box_world = affine[:3, :3] @ (ref - offset) + affine[:3, 3]
        assert np.allclose(got[v]["world"], box_world, atol=1e-3)
    assert len(vertebra_centroids(Volume(sem, affine), Volume(np.zeros_like(inst), affine))) == 0
    assert cen.renamed({1: 18, 2: 0}).ids == (18,)  # an unnamed vertebra is dropped


def test_frames_from_given_centroids_equal_computed_ones() -> None:
    sem, inst = _layout()
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    s, i = Volume(sem, affine), Volume(inst, affine)
    given = vertebra_frames(s, i, centroids=vertebra_centroids(s, i))
    computed = vertebra_frames(s, i)
    assert list(given) == list(computed) == [1, 2, 3, 4]
    for v in given:
        assert np.array_equal(given[v].centroid, computed[v].centroid)
        assert np.array_equal(given[v].superior, computed[v].superior)
        assert np.array_equal(given[v].anterior, computed[v].anterior)
