"""``pipeline.body_centroids``: body centre of mass per vertebra (whole vertebra where it has
no body voxel), voxel and world coordinates, against scipy's per-label centre of mass."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from spineps.geometry.volume import Volume
from spineps.labels import BODY
from spineps.pipeline import body_centroids


def test_centroids_match_scipy_on_a_random_layout() -> None:
    rng = np.random.default_rng(0)
    inst = np.zeros((30, 40, 12), np.uint16)
    sem = np.zeros(inst.shape, np.uint8)
    for k, v in enumerate((18, 19, 20, 28)):  # T11, T12, L1 and a T13
        block = (slice(2 + 7 * k, 8 + 7 * k), slice(3, 30), slice(2, 10))
        inst[block] = v
        sem[block] = 41
        body = rng.random(inst[block].shape) < 0.5
        if v != 20:  # L1 has no body voxel: its whole-vertebra centre is used
            sem[block][body] = BODY
    inst[0, 0, 0] = 120  # a disc value: not a vertebra
    affine = np.array([[0.0, 0.0, 3.0, -10.0], [-1.0, 0.0, 0.0, 50.0], [0.0, -1.0, 0.0, 20.0], [0, 0, 0, 1]])
    got = body_centroids(Volume(sem, affine), Volume(inst, affine))
    assert sorted(got) == [18, 19, 20, 28]
    for v, c in got.items():
        ref = ndimage.center_of_mass((inst == v) & (sem == BODY)) if v != 20 else ndimage.center_of_mass(inst == v)
        assert np.allclose(c["voxel"], ref, atol=1e-3)
        assert np.allclose(c["world"], affine[:3, :3] @ np.asarray(ref) + affine[:3, 3], atol=1e-3)
    assert body_centroids(Volume(sem, affine), Volume(np.zeros_like(inst), affine)) == {}
