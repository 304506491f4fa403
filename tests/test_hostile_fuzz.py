"""Fuzzing the NIfTI reader (hypothesis): whatever bytes a header holds, and wherever a
file is cut, ``load_volume`` either returns a valid 3D volume or raises ``InputError`` /
``ResourceError`` naming the file: never another exception, never a hang or a huge
allocation. And the write/read path round-trips labels exactly on any valid grid."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spineps.errors import InputError, ResourceError
from spineps.geometry import Volume
from spineps.geometry.io import load_volume, read_header, save_volume
from tests.bids_factory import phantom_data, sagittal_affine, write_nifti

SHAPE = (6, 7, 5)
HEADER_BYTES = 348


@pytest.fixture(scope="module")
def valid_nii(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_nifti(tmp_path_factory.mktemp("fuzz") / "scan.nii", phantom_data(SHAPE), sagittal_affine(SHAPE))
    return path.read_bytes()


def _check(path: Path, kind: str = "image") -> None:
    try:
        vol = load_volume(path, kind=kind, max_voxels=10_000_000)
    except (InputError, ResourceError) as exc:
        assert exc.path == path and "\n" not in str(exc), str(exc)
        return
    assert vol.data.ndim == 3 and np.all(np.isfinite(vol.affine))
    assert all(s >= 2 for s in vol.data.shape)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, HEADER_BYTES - 1), st.integers(0, 255)), min_size=1, max_size=12),
       kind=st.sampled_from(["image", "label"]))
@example(edits=[(119, 96)], kind="label")  # scl_slope ~3.7e19: integral labels beyond uint64 (found by this test)
def test_random_header_bytes_never_crash(valid_nii: bytes, tmp_path: Path, edits, kind) -> None:
    raw = bytearray(valid_nii)
    for pos, value in edits:
        raw[pos] = value
    path = tmp_path / "fuzzed.nii"
    path.write_bytes(bytes(raw))
    _check(path, kind)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([(40, "<i2", 8), (70, "<i2", 1), (72, "<i2", 1), (76, "<f4", 8), (108, "<f4", 1),
                              (112, "<f4", 2), (252, "<i2", 2), (256, "<f4", 6), (280, "<f4", 12)]),
       values=st.lists(st.one_of(st.integers(-40000, 40000).map(float),
                                 st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf, 1e30, -1e-30])),
                       min_size=12, max_size=12))
def test_typed_header_fields_never_crash(valid_nii: bytes, tmp_path: Path, field, values) -> None:
    """dim, datatype, bitpix, pixdim, vox_offset, scaling, q/sform codes, quaternion, srows:
    each overwritten with extreme values of its own type."""
    offset, dtype, count = field
    arr = np.asarray(values[:count], dtype=np.float64)
    if dtype == "<i2":
        arr = np.nan_to_num(arr, nan=0, posinf=32767, neginf=-32768).clip(-32768, 32767)
    raw = bytearray(valid_nii)
    blob = arr.astype(dtype).tobytes()
    raw[offset:offset + len(blob)] = blob
    path = tmp_path / "typed.nii"
    path.write_bytes(bytes(raw))
    _check(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 1.0))
def test_truncated_gzip_anywhere(valid_nii: bytes, tmp_path: Path, cut: float) -> None:
    gz = gzip.compress(valid_nii)
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gz[: int(len(gz) * cut)])
    _check(path)


@st.composite
def grids(draw) -> tuple[tuple[int, int, int], np.ndarray]:
    """A valid grid: any rotation, flips, spacing 0.2-6 mm, origin within +-500 mm."""
    q = np.asarray([draw(st.floats(-1.0, 1.0)) for _ in range(4)])
    if np.linalg.norm(q) < 1e-3:
        q = np.asarray([1.0, 0.0, 0.0, 0.0])
    w, x, y, z = q / np.linalg.norm(q)
    rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                    [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                    [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    flips = np.diag([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    spacing = np.diag([draw(st.floats(0.2, 6.0)) for _ in range(3)])
    aff = np.eye(4)
    aff[:3, :3] = rot @ flips @ spacing
    aff[:3, 3] = [draw(st.floats(-500.0, 500.0)) for _ in range(3)]
    shape = tuple(draw(st.integers(2, 9)) for _ in range(3))
    return shape, aff


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grid=grids(), seed=st.integers(0, 2 ** 16), ext=st.sampled_from([".nii", ".nii.gz"]),
       top=st.sampled_from([1, 49, 255, 300, 65535]))
def test_labels_round_trip_on_any_valid_grid(tmp_path: Path, grid, seed: int, ext: str, top: int) -> None:
    shape, aff = grid
    data = np.random.default_rng(seed).integers(0, top + 1, size=shape)
    path = save_volume(Volume(data, aff), tmp_path / f"lab{ext}")
    back = load_volume(path, kind="label")
    assert back.data.dtype.kind in "iu" and np.array_equal(back.data, data)
    # NIfTI stores the affine as float32: equal to float32 precision, and the grid is the same
    np.testing.assert_allclose(back.affine, aff, rtol=1e-6, atol=1e-4)
    assert read_header(path).spatial_shape == shape


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, HEADER_BYTES - 1), st.integers(0, 255)), min_size=1, max_size=12))
def test_discovery_survives_random_headers(valid_nii: bytes, tmp_path: Path, edits) -> None:
    """Discovery reads every candidate's header: a fuzzed one is kept or skipped with a
    reason (a failed scan when unreadable), never an exception that stops the run."""
    from spineps.bids.discovery import _select

    raw = bytearray(valid_nii)
    for pos, value in edits:
        raw[pos] = value
    path = tmp_path / "sub-01" / "anat" / "sub-01_acq-sag_T2w.nii"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(raw))
    scans, skipped, unusable = _select([path], tmp_path, True)
    assert len(scans) + len(skipped) == 1
    assert all(p == path and why for p, why in skipped)
    assert set(unusable) <= set(skipped)
