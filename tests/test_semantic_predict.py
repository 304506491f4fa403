"""Semantic inference: the mask always lies on the exact input grid (oblique and non-PIR
inputs), the model-grid round trip, device handling."""

from __future__ import annotations


import numpy as np
import pytest

from spineps.errors import UsageError
from spineps.geometry.volume import Volume
from spineps.models.device import resolve_device
from spineps.semantic.predict import NnUNetSemanticSegmenter
from spineps.training.semantic import build_random_model_folder

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> NnUNetSemanticSegmenter:
    torch.set_num_threads(1)
    folder = build_random_model_folder(tmp_path_factory.mktemp("m") / "tiny", folds=1,
                                       spacing_pir=(2.0, 2.0, 3.0), patch_rip=(8, 16, 16), features=(2, 4, 4))
    return NnUNetSemanticSegmenter.from_folder(folder, device="cpu", nprocs=1, n4=False)


def _rot(ax: str, deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[ax]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def _image(shape, affine, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 400).astype(np.float32)
    data[shape[0] // 3: 2 * shape[0] // 3] += 600
    return Volume(data, affine)


@pytest.mark.parametrize("case", ["oblique", "ras_axial_like", "lps_sagittal", "pir_exact"])
def test_mask_is_on_the_exact_input_grid(seg, case):
    if case == "oblique":
        lin = _rot("x", 17) @ _rot("z", 9) @ np.diag([3.3, 0.9, 0.9])
        aff = np.eye(4)
        aff[:3, :3] = lin
        aff[:3, 3] = [-12.5, 40.2, -7.0]
        shape = (9, 40, 36)
    elif case == "ras_axial_like":
        aff = np.diag([0.8, 0.8, 2.5, 1.0])
        aff[:3, 3] = [-20, -30, 10]
        shape = (30, 26, 14)
    elif case == "lps_sagittal":
        aff = np.array([[0, 0, -2.0, 5], [-1.1, 0, 0, 3], [0, -1.1, 0, 8], [0, 0, 0, 1]])
        shape = (24, 40, 10)
    else:
        aff = np.array([[0, 0, 3.0, 0], [-2.0, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])
        shape = (20, 30, 8)
    img = _image(shape, aff)
    mask = seg.segment(img)
    assert mask.shape == img.shape
    assert np.array_equal(mask.affine, img.affine)
    assert mask.data.dtype == np.uint8
    assert set(np.unique(mask.data)) <= {0, *seg.config.labels.values()}
    for key in ("preprocess", "resample", "inference", "cleanup", "back_to_grid", "total"):
        assert key in seg.timings


def test_model_grid_is_model_orientation_and_spacing(seg):
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    model_img = seg.to_model_grid(_image((30, 26, 14), aff))
    assert model_img.axcodes == ("P", "I", "R")
    np.testing.assert_allclose(model_img.spacing, (2.0, 2.0, 3.0), atol=1e-6)


def test_model_grid_indices_follow_the_lut(seg):
    """The network's argmax indices reach the mask only through the config's labels."""
    aff = np.array([[0, 0, 3.0, 0], [-2.0, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])
    img = _image((20, 30, 8), aff)
    idx = seg.predict_indices(img)
    assert idx.shape == img.shape and idx.max() < seg.loaded.num_outputs


def test_constant_image_gives_an_empty_mask(seg):
    img = Volume(np.full((10, 12, 6), 7.0, np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    assert not seg.segment(img).data.any()


def test_device_resolution(seg):
    """One device resolution for the CLI and both segmenters (``spineps.models.device``)."""
    assert resolve_device("cpu") == "cpu" and seg.device.type == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):
            with pytest.raises(UsageError, match="CUDA"):
                resolve_device(device)
        with pytest.raises(UsageError, match="CUDA"):
            NnUNetSemanticSegmenter(seg.loaded, device="cuda", nprocs=1, n4=False)
    for bad in ("nonsense-device", "cuda:x"):
        with pytest.raises(UsageError):
            resolve_device(bad)


def test_n4_timing_is_measured(seg):
    seg_n4 = NnUNetSemanticSegmenter(seg.loaded, device="cpu", nprocs=1, n4=True)
    img = _image((20, 30, 8), np.diag([2.0, 2.0, 3.0, 1.0]))
    seg_n4.segment(img)
    assert seg_n4.timings["n4"] > 0
    assert seg_n4.provenance()["n4"] is True
