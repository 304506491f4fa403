"""Implausible anatomy (``spineps.labeling.levels.implausible_anatomy``): structures that do not
look like a spine (random blobs, as a semantic model makes of pure noise) get no confident
name and raise the ``implausible_anatomy`` and ``naming_uncertain`` QC flags; the phantoms'
spines (whole, cut, curved, slipped) raise neither."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from spineps.geometry.volume import Volume
from spineps.labeling.levels import IMPLAUSIBLE_CONFIDENCE
from spineps.labels import BODY, SACRUM, VERTEBRA_ORDER
from spineps.measure.scan import measure_scan
from spineps.pipeline import postprocess
from spineps.synth.anatomy import PhantomSpec, make_phantom

SAGITTAL = np.array([[0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def _anonymous(instance: Volume) -> Volume:
    inst = np.asarray(instance.data)
    vals = [v for v in VERTEBRA_ORDER if v != SACRUM and (inst == v).any()]
    out = np.zeros(inst.shape, np.uint16)
    for k, v in enumerate(vals, start=1):
        out[inst == v] = k
    return instance.with_data(out)


def _blobs(seed: int, n_max: int = 24) -> tuple[Volume, Volume]:
    """Smoothed noise over a threshold as 'vertebral bodies', numbered from the top."""
    rng = np.random.default_rng(seed)
    shape = (200, 300, 20)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), (6, 6, 1.5))
    sem = np.where(noise > np.percentile(noise, 97), BODY, 0).astype(np.uint8)
    lab, n = ndimage.label(sem > 0)
    heights = ndimage.center_of_mass(sem > 0, lab, range(1, n + 1))
    inst = np.zeros(shape, np.uint16)
    for k, i in enumerate(np.argsort([-c[1] for c in heights])[:n_max], start=1):
        inst[lab == i + 1] = k
    sem[inst == 0] = 0
    return Volume(sem, SAGITTAL), Volume(inst, SAGITTAL)


@pytest.mark.parametrize("seed,n_max", [(0, 24), (1, 24), (2, 3), (3, 2)])
def test_noise_blobs_get_no_confident_name_and_a_qc_flag(seed: int, n_max: int) -> None:
    sem, inst = _blobs(seed, n_max)
    post = postprocess(sem, inst)
    assert post.naming["implausible"], post.naming["levels"]
    assert post.naming["confidence"] <= IMPLAUSIBLE_CONFIDENCE
    m = measure_scan(post.semantic, post.instance, post.naming)
    assert "implausible_anatomy" in m.qc.flags and "naming_uncertain" in m.qc.flags


@pytest.mark.parametrize("kw", [dict(seed=1, fov="lumbar"), dict(seed=2, fov="whole", spacing=(2.0, 2.0, 3.5)),
                                dict(seed=3, fov="cervical"), dict(seed=5, fov="lumbar", scoliosis=15.0,
                                                                   slips=(("L4", 7.0),)),
                                dict(seed=7, fov="lumbar", crop={"I": 150.0}), dict(seed=6, fov="thoracic")])
def test_spines_are_plausible(kw) -> None:
    ph = make_phantom(PhantomSpec(**kw))
    post = postprocess(ph.semantic, _anonymous(ph.instance))
    assert post.naming["implausible"] == []
    m = measure_scan(post.semantic, post.instance, post.naming)
    assert "implausible_anatomy" not in m.qc.flags
