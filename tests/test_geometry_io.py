"""NIfTI loading/saving: round trips and every hostile input (files written here, in tmp_path)."""

from __future__ import annotations

import gzip
import logging
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spineps.errors import InputError, OutputError
from spineps.fsutil import TEMP_PREFIX
from spineps.geometry import Volume
from spineps.geometry.io import HeaderInfo, load_volume, read_header, save_volume, smallest_int_dtype


def oblique_affine(spacing=(0.7, 0.8, 3.3), angle_deg=12.0, origin=(-40.0, 25.0, 7.5)) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def write_nifti(path: Path, data: np.ndarray, affine=None, *, qcode=1, scode=1, qform=None,
                cls=nib.Nifti1Image) -> Path:
    """Write a NIfTI with nibabel directly (bypassing save_volume); ``qform`` (default: the
    affine) lets the qform differ from the sform; ``qcode=0`` leaves the qform unset."""
    aff = oblique_affine() if affine is None else affine
    img = cls(data, aff)
    if qcode > 0:
        img.set_qform(aff if qform is None else qform, code=qcode)
    else:
        img.set_qform(None, code=0)
    img.set_sform(aff, code=scode)
    nib.save(img, str(path))
    return path


def patch_bytes(path: Path, offset: int, value: bytes) -> None:
    """Overwrite raw header bytes of an uncompressed .nii (nibabel would fix them on save)."""
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(value)] = value
    path.write_bytes(bytes(raw))


def expect_input_error(path: Path, fragment: str, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        load_volume(path, **kw)
    msg = str(info.value)
    assert path.name in msg, msg
    assert "\n" not in msg, msg
    assert fragment.lower() in msg.lower(), msg
    assert info.value.path == path
    return info.value


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_nibabel_written_inputs_load(tmp_path, ext, dtype):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 200, size=(7, 6, 5)).astype(dtype)
    path = write_nifti(tmp_path / f"in{ext}", data)
    img = load_volume(path)
    assert img.data.dtype == np.float32 and img.shape == (7, 6, 5)
    np.testing.assert_array_equal(img.data, data.astype(np.float32))
    np.testing.assert_allclose(img.affine, oblique_affine(), atol=1e-5)
    lab = load_volume(path, kind="label")
    assert lab.data.dtype.kind in "iu"
    np.testing.assert_array_equal(lab.data, data.astype(np.int64))
    if np.dtype(dtype).kind in "iu":
        assert lab.data.dtype == dtype  # stored integer type kept


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_save_load_identity(tmp_path, ext, dtype):
    rng = np.random.default_rng(2)
    raw = rng.normal(0, 50, size=(6, 5, 4))
    data = (np.round(raw) if np.dtype(dtype).kind in "iu" else raw)
    if dtype == np.uint8:
        data = np.abs(data)
    vol = Volume(data.astype(dtype), oblique_affine())
    out = save_volume(vol, tmp_path / f"out{ext}")
    assert out == tmp_path / f"out{ext}" and out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    kind = "label" if np.dtype(dtype).kind in "iu" else "image"
    back = load_volume(out, kind=kind)
    np.testing.assert_array_equal(back.data, vol.data.astype(back.data.dtype))
    if kind == "image":
        np.testing.assert_array_equal(back.data, vol.data.astype(np.float32))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    # raw header: no scaling, both transforms set
    opener = gzip.open if ext == ".nii.gz" else open
    with opener(out, "rb") as fh:
        hdr = nib.Nifti1Header.from_fileobj(fh)
    assert float(hdr["scl_slope"]) == 1.0 and float(hdr["scl_inter"]) == 0.0
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 2
    np.testing.assert_allclose(hdr.get_qform(), vol.affine, atol=1e-5)
    np.testing.assert_allclose(hdr.get_sform(), vol.affine, atol=1e-5)
    assert hdr.get_xyzt_units()[0] == "mm"


def test_labels_stored_in_smallest_type(tmp_path):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    cases = [(np.array([0, 200]), np.uint8), (np.array([0, 300]), np.uint16), (np.array([-1, 100]), np.int8),
             (np.array([-200, 3]), np.int16), (np.array([0, 70000]), np.uint32)]
    for values, expected in cases:
        data = np.zeros((3, 3, 3), dtype=np.int64)
        data[0, 0, 0], data[1, 1, 1] = values
        assert smallest_int_dtype(data) == expected
        path = save_volume(Volume(data, aff), tmp_path / "lab.nii.gz")
        assert read_header(path).dtype == expected
        np.testing.assert_array_equal(load_volume(path, kind="label").data, data)
    path = save_volume(Volume(np.ones((3, 3, 3), bool), aff), tmp_path / "mask.nii")
    assert read_header(path).dtype == np.uint8
    # explicit dtype wins, and must fit
    path = save_volume(Volume(np.ones((3, 3, 3), np.uint8), aff), tmp_path / "i16.nii.gz", dtype=np.int16)
    assert read_header(path).dtype == np.int16
    with pytest.raises(OutputError):
        save_volume(Volume(np.full((3, 3, 3), 300), aff), tmp_path / "x.nii.gz", dtype=np.uint8)
    with pytest.raises(OutputError):
        save_volume(Volume(np.ones((3, 3, 3)), aff), tmp_path / "x.mgz")


def test_save_copies_codes_from_like(tmp_path):
    path = write_nifti(tmp_path / "src.nii.gz", np.zeros((4, 4, 4), np.int16), qcode=1, scode=4)
    like = read_header(path)
    assert (like.qform_code, like.sform_code) == (1, 4)
    out = save_volume(Volume(np.ones((4, 4, 4), np.uint8), like.affine), tmp_path / "o.nii.gz", like=like)
    with gzip.open(out, "rb") as fh:
        hdr = nib.Nifti1Header.from_fileobj(fh)
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 4)


def test_read_header_reads_no_data(tmp_path):
    path = write_nifti(tmp_path / "h.nii.gz", np.zeros((9, 8, 7, 1), np.int16))
    info = read_header(path)
    assert isinstance(info, HeaderInfo)
    assert info.shape == (9, 8, 7, 1) and info.ndim == 4 and info.spatial_shape == (9, 8, 7)
    assert info.dtype == np.int16 and info.n_voxels == 504
    np.testing.assert_allclose(info.spacing, (0.7, 0.8, 3.3), atol=1e-5)
    np.testing.assert_allclose(info.zooms[:3], (0.7, 0.8, 3.3), atol=1e-5)
    vol = load_volume(path)  # singleton 4th axis squeezed
    assert vol.shape == (9, 8, 7)


def test_nifti2_and_all_orientations_load(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    aff = np.array([[0, 0, -2.0, 10], [-1.0, 0, 0, 5], [0, 0.5, 0, -3], [0, 0, 0, 1]])
    path = write_nifti(tmp_path / "n2.nii", data, aff, cls=nib.Nifti2Image)
    vol = load_volume(path, kind="label")
    np.testing.assert_array_equal(vol.data, data)
    assert vol.axcodes == ("P", "S", "L")


# ----------------------------------------------------------------------------- hostile inputs

def test_missing_and_unreadable(tmp_path):
    expect_input_error(tmp_path / "nope.nii.gz", "does not exist")
    d = tmp_path / "dir.nii.gz"
    d.mkdir()
    expect_input_error(d, "not a regular file")
    txt = tmp_path / "scan.txt"
    txt.write_text("hello")
    expect_input_error(txt, "not a NIfTI")


def test_truncated_and_corrupt_gzip(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
    raw = good.read_bytes()
    half = tmp_path / "half.nii.gz"
    half.write_bytes(raw[: len(raw) // 2])
    expect_input_error(half, "truncated")
    tiny = tmp_path / "tiny.nii.gz"
    tiny.write_bytes(raw[:40])
    expect_input_error(tiny, "header")
    bad = bytearray(raw)
    for i in range(200, 260):
        bad[i] ^= 0xFF
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(bytes(bad))
    err = expect_input_error(corrupt, "corrupt")
    assert err.exit_code == 65
    notgz = tmp_path / "plain.nii.gz"
    notgz.write_bytes(b"not gzip at all" * 40)
    expect_input_error(notgz, "gzip")
    plain = write_nifti(tmp_path / "plain.nii", np.zeros((20, 20, 20), np.float32))
    short = tmp_path / "short.nii"
    short.write_bytes(plain.read_bytes()[:1000])
    expect_input_error(short, "truncated")


def test_broken_header(tmp_path):
    junk = tmp_path / "junk.nii"
    junk.write_bytes(np.random.default_rng(0).bytes(600))
    expect_input_error(junk, "header")

    path = tmp_path / "dim0.nii"
    write_nifti(path, np.zeros((4, 4, 4), np.int16))
    patch_bytes(path, 40, np.int16(9).tobytes())  # dim[0] = 9: impossible
    expect_input_error(path, "header")


def test_nan_and_inf_voxels(tmp_path):
    for bad in (np.nan, np.inf, -np.inf):
        data = np.ones((4, 4, 4), np.float32)
        data[1, 2, 3] = bad
        path = write_nifti(tmp_path / f"bad{bad}.nii.gz", data)
        expect_input_error(path, "NaN or infinite")
        expect_input_error(path, "NaN or infinite", kind="label")


def test_non_integral_labels(tmp_path):
    path = write_nifti(tmp_path / "frac.nii.gz", np.full((3, 3, 3), 1.5, np.float32))
    expect_input_error(path, "non-integral", kind="label")
    load_volume(path)  # fine as an image
    path = write_nifti(tmp_path / "intf.nii.gz", np.full((3, 3, 3), 7.0, np.float32))
    lab = load_volume(path, kind="label")
    assert lab.data.dtype == np.uint8 and int(lab.data.max()) == 7
    # integer storage with intensity scaling: the scaled values decide
    for slope, ok in ((2.0, True), (0.5, False)):
        path = write_nifti(tmp_path / f"scaled{slope}.nii", np.full((3, 3, 3), 3, np.int16))
        patch_bytes(path, 112, np.array([slope, 0.0], "<f4").tobytes())  # scl_slope, scl_inter
        assert read_header(path).scaled
        if ok:
            lab = load_volume(path, kind="label")
            assert lab.data.dtype.kind in "iu" and np.all(lab.data == 6)
        else:
            expect_input_error(path, "non-integral", kind="label")
        np.testing.assert_allclose(load_volume(path).data, 3 * slope)


@pytest.mark.parametrize("value", [0.0, -1.0, np.nan, np.inf])
def test_bad_spacing(tmp_path, value):
    for scode in (0, 2):  # qform only (pixdim makes the affine) and with an sform
        path = write_nifti(tmp_path / f"sp{scode}.nii", np.zeros((4, 4, 4), np.int16), qcode=1, scode=scode)
        patch_bytes(path, 84, np.float32(value).tobytes())  # pixdim[2]; nibabel "fixes" 0/-1 silently on load
        expect_input_error(path, "spacing")


def write_with_sform(path: Path, sform: np.ndarray) -> Path:
    """A .nii whose sform (code 2, qform unset) is written raw: nibabel refuses to encode a
    singular one itself."""
    write_nifti(path, np.zeros((4, 4, 4), np.int16), np.eye(4), qcode=0, scode=2)
    patch_bytes(path, 280, np.asarray(sform[:3], dtype="<f4").tobytes())  # srow_x, srow_y, srow_z
    return path


def test_singular_and_sheared_affines(tmp_path):
    expect_input_error(write_with_sform(tmp_path / "zero.nii", np.diag([1.0, 0.0, 1.0, 1.0])), "zero-length")
    singular = np.eye(4)
    singular[:3, :3] = [[1, 1, 0], [0, 0, 0], [0, 0, 1]]  # two equal columns
    expect_input_error(write_with_sform(tmp_path / "sing.nii", singular), "singular")
    shear = np.eye(4)
    shear[0, 1] = 0.1  # ~5.7 degrees of shear
    expect_input_error(write_with_sform(tmp_path / "shear.nii", shear), "sheared")
    tiny = np.eye(4)
    tiny[0, 1] = 1e-5  # below the tolerance: accepted
    load_volume(write_with_sform(tmp_path / "ok.nii", tiny))
    nan_aff = np.eye(4)
    nan_aff[0, 3] = np.nan
    expect_input_error(write_with_sform(tmp_path / "nanaff.nii", nan_aff), "NaN")


def test_dimensionality(tmp_path):
    expect_input_error(write_nifti(tmp_path / "real4d.nii.gz", np.zeros((4, 4, 4, 3), np.int16)), "4D")
    expect_input_error(write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.int16)), "2D")
    expect_input_error(write_nifti(tmp_path / "slice.nii.gz", np.zeros((4, 4, 1), np.int16)), "degenerate")
    with pytest.raises(InputError, match="4D"):
        read_header(tmp_path / "real4d.nii.gz")
    assert read_header(tmp_path / "real4d.nii.gz", validate=False).shape == (4, 4, 4, 3)


def test_huge_dimensions_refused_before_allocating(tmp_path):
    hdr = nib.Nifti2Header()
    hdr.set_data_shape((100000, 100000, 100000))
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * 64)
    tracemalloc.start()
    try:
        expect_input_error(path, "too large")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000
    assert read_header(path).n_voxels == 10 ** 15
    small = write_nifti(tmp_path / "small.nii.gz", np.zeros((10, 10, 10), np.uint8))
    expect_input_error(small, "too large", max_voxels=999)
    assert load_volume(small, max_voxels=1000).shape == (10, 10, 10)


def test_qform_sform_disagreement_warns_and_uses_sform(tmp_path, caplog):
    q = np.diag([1.0, 1.0, 1.0, 1.0])
    s = np.diag([1.0, 1.0, 1.0, 1.0])
    s[:3, 3] = [0.0, 5.0, 0.0]

    path = write_nifti(tmp_path / "qs.nii.gz", np.zeros((4, 4, 4), np.int16), s, qform=q)
    with caplog.at_level(logging.WARNING, logger="spineps.geometry.io"):
        vol = load_volume(path)
    assert any("disagree" in r.getMessage() and "qs.nii.gz" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(vol.affine, s)
    caplog.clear()
    path = write_nifti(tmp_path / "agree.nii.gz", np.zeros((4, 4, 4), np.int16))
    with caplog.at_level(logging.WARNING, logger="spineps.geometry.io"):
        load_volume(path)
    assert not caplog.records

    path = write_nifti(tmp_path / "qonly.nii.gz", np.zeros((4, 4, 4), np.int16), s, qform=q, scode=0)
    np.testing.assert_allclose(load_volume(path).affine, q)


def test_complex_data_refused(tmp_path):
    path = write_nifti(tmp_path / "cplx.nii", np.zeros((3, 3, 3), np.complex64))
    expect_input_error(path, "data type")


def test_big_endian_file_loads_native(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5) - 30
    hdr = nib.Nifti1Header(endianness=">")
    hdr.set_data_dtype(np.int16)
    img = nib.Nifti1Image(data, oblique_affine(), header=hdr)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    path = tmp_path / "big.nii"
    nib.save(img, str(path))
    assert read_header(path).dtype.byteorder == ">"
    lab = load_volume(path, kind="label")
    assert lab.data.dtype == np.int16 and lab.data.dtype.isnative
    np.testing.assert_array_equal(lab.data, data)
    assert load_volume(path).data.dtype == np.float32


def test_no_qform_no_sform_warns(tmp_path, caplog):
    path = write_nifti(tmp_path / "noform.nii.gz", np.zeros((4, 4, 4), np.int16), qcode=0, scode=0)
    with caplog.at_level(logging.WARNING, logger="spineps.geometry.io"):
        vol = load_volume(path)
    assert any("neither qform nor sform" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 3.3), atol=1e-5)
