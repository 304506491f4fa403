"""Build small, real BIDS datasets on disk for tests.

Every image is a tiny NIfTI written with nibabel (default 24x40x8 voxels) whose affine
really is sagittal (through-plane axis along L-R, thick slices), axial (through-plane
along S-I) or coronal, so code that decides orientation from headers sees the real thing.

Typical use::

    from tests.bids_factory import BidsFactory, Img

    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")                                  # sub-01/anat/sub-01_acq-sag_T2w.nii.gz
    ds.add("02", ses="1", acq="sag", run=1, chunk=2)         # runs and chunks
    ds.add("02", ses="1", acq="ax", plane="axial")           # an axial T2w
    ds.add("02", ses="1", suffix="T1w", acq="sag")           # a T1w
    ds.add("03", plane="sagittal", sidecar={"EchoTime": 0.1})  # sagittal by its affine only
    ds.write_json("T2w.json", {"RepetitionTime": 3.0})       # an inherited top-level sidecar
    root = ds.root                                            # dataset_description.json etc. exist

``standard_dataset(root)`` builds the mixed dataset the discovery tests use, and
``sagittal_affine`` / ``axial_affine`` / ``coronal_affine`` give the affines alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import nibabel as nib
import numpy as np

__all__ = [
    "DEFAULT_SHAPE",
    "affine_from_axcodes",
    "sagittal_affine",
    "axial_affine",
    "coronal_affine",
    "plane_affine",
    "phantom_data",
    "write_nifti",
    "BidsFactory",
    "StandardDataset",
    "standard_dataset",
    "minimal_dataset",
]

#: (in-plane 1, in-plane 2, slices): 24 x 40 voxels in plane, 8 thick slices
DEFAULT_SHAPE: tuple[int, int, int] = (24, 40, 8)

_CODE_VECTORS = {
    "R": (1, 0, 0), "L": (-1, 0, 0),
    "A": (0, 1, 0), "P": (0, -1, 0),
    "S": (0, 0, 1), "I": (0, 0, -1),
}


def affine_from_axcodes(axcodes: Sequence[str], spacing: Sequence[float],
                        shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """A voxel-to-RAS affine whose array axes point to ``axcodes`` (e.g. ``"PIR"``) with
    ``spacing`` mm; the volume centre is placed at the world origin when ``shape`` is given."""
    codes = tuple(axcodes)
    if len(codes) != 3 or any(c not in _CODE_VECTORS for c in codes) \
            or sorted("RLAPSI".index(c) // 2 for c in codes) != [0, 1, 2]:
        raise ValueError(f"axcodes must name three different world axes, got {axcodes!r}")
    aff = np.eye(4)
    for i, (code, sp) in enumerate(zip(codes, spacing)):
        aff[:3, i] = np.asarray(_CODE_VECTORS[code], dtype=float) * float(sp)
    if shape is not None:
        centre = (np.asarray(shape[:3], dtype=float) - 1) / 2
        aff[:3, 3] = -aff[:3, :3] @ centre
    return aff


def sagittal_affine(shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = (1.0, 1.0, 4.0),
                    axcodes: str = "PIR") -> np.ndarray:
    """Sagittal stack: the third array axis (the thick slices) runs along L-R."""
    return affine_from_axcodes(axcodes, spacing, shape)


def axial_affine(shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = (1.0, 1.0, 4.0),
                 axcodes: str = "RAS") -> np.ndarray:
    """Axial stack: the third array axis (the thick slices) runs along S-I."""
    return affine_from_axcodes(axcodes, spacing, shape)


def coronal_affine(shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = (1.0, 1.0, 4.0),
                   axcodes: str = "RIA") -> np.ndarray:
    """Coronal stack: the third array axis (the thick slices) runs along A-P."""
    return affine_from_axcodes(axcodes, spacing, shape)


def plane_affine(plane: str, shape: Sequence[int] = DEFAULT_SHAPE,
                 spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """``plane`` in {"sagittal", "axial", "coronal", "iso-sagittal", "iso-axial"}; the
    ``iso-`` planes are 1 mm isotropic with the slice (third) axis along L-R or S-I."""
    if plane == "sagittal":
        return sagittal_affine(shape, spacing or (1.0, 1.0, 4.0))
    if plane == "axial":
        return axial_affine(shape, spacing or (1.0, 1.0, 4.0))
    if plane == "coronal":
        return coronal_affine(shape, spacing or (1.0, 1.0, 4.0))
    if plane == "iso-sagittal":
        return sagittal_affine(shape, spacing or (1.0, 1.0, 1.0))
    if plane == "iso-axial":
        return axial_affine(shape, spacing or (1.0, 1.0, 1.0))
    raise ValueError(f"unknown plane {plane!r}")


def phantom_data(shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0, dtype: Any = np.int16) -> np.ndarray:
    """Small deterministic image content: a smooth gradient plus noise (never all zero)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, int(n)) for n in shape], indexing="ij")
    data = 200 * sum(grids) + rng.normal(0, 5, size=tuple(int(n) for n in shape))
    return np.clip(data, 0, None).astype(dtype)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``data`` with ``affine`` (sform and qform set, code 1 = scanner)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float))
    img.set_sform(np.asarray(affine, dtype=float), code=1)
    img.set_qform(np.asarray(affine, dtype=float), code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


@dataclass
class BidsFactory:
    """A BIDS dataset under construction at ``root`` (created with a valid
    ``dataset_description.json``, ``README`` and ``participants.tsv`` unless told not to)."""

    root: Path
    name: str = "spineps test dataset"
    description: bool = True
    files: list[Path] = field(default_factory=list)
    _subjects: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.description:
            self.write_json("dataset_description.json",
                            {"Name": self.name, "BIDSVersion": "1.10.0", "DatasetType": "raw",
                             "License": "CC0", "Authors": ["spineps tests"]})
            (self.root / "README").write_text("A tiny synthetic dataset written by tests/bids_factory.py.\n")

    # ------------------------------------------------------------------ files
    def write_json(self, relpath: str, obj: dict) -> Path:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n")
        return path

    def add(self, sub: str, ses: Optional[str] = None, *, acq: Optional[str] = None,
            run: Optional[int] = None, chunk: Optional[int] = None, rec: Optional[str] = None,
            suffix: str = "T2w", datatype: str = "anat", plane: str = "sagittal",
            shape: Sequence[int] = DEFAULT_SHAPE, spacing: Optional[Sequence[float]] = None,
            affine: Optional[np.ndarray] = None, data: Optional[np.ndarray] = None,
            sidecar: Optional[dict] = None, extension: str = ".nii.gz", seed: int = 0) -> Path:
        """Add one image; returns its absolute path. Entities are written in BIDS order.

        ``plane`` picks the affine (see :func:`plane_affine`) unless ``affine`` is given;
        ``sidecar`` writes a JSON beside it (``{}`` writes an empty one, ``None`` none)."""
        ents = [("sub", sub), ("ses", ses), ("acq", acq), ("rec", rec),
                ("run", None if run is None else str(run)), ("chunk", None if chunk is None else str(chunk))]
        stem = "_".join(f"{k}-{v}" for k, v in ents if v is not None) + f"_{suffix}"
        folder = self.root / f"sub-{sub}"
        if ses is not None:
            folder = folder / f"ses-{ses}"
        folder = folder / datatype
        path = folder / f"{stem}{extension}"
        if data is None:
            data = phantom_data(shape, seed=seed)
        if affine is None:
            affine = plane_affine(plane, data.shape[:3], spacing)
        write_nifti(path, data, affine)
        if sidecar is not None:
            (folder / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        self.files.append(path)
        if sub not in self._subjects:
            self._subjects.add(sub)
            self._write_participants()
        return path

    def add_raw_file(self, relpath: str, content: bytes = b"not an image") -> Path:
        """Any file at ``relpath`` (e.g. a corrupt ``.nii.gz``)."""
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        self.files.append(path)
        return path

    def _write_participants(self) -> None:
        if not self.description:
            return
        rows = "".join(f"sub-{s}\n" for s in sorted(self._subjects))
        (self.root / "participants.tsv").write_text("participant_id\n" + rows)

    def relpaths(self) -> list[str]:
        """Every file of the dataset, relative to the root, POSIX, sorted."""
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())


@dataclass
class StandardDataset:
    """What :func:`standard_dataset` wrote: the factory, the relative paths of the scans
    discovery must keep (sorted), and the skipped ones with a word their reason contains."""

    factory: BidsFactory
    expected: list[str]
    skipped: dict[str, str]

    @property
    def root(self) -> Path:
        return self.factory.root


def standard_dataset(root: Path) -> StandardDataset:
    """Two subjects, sessions, runs and chunks, and the awkward cases:

    - sub-01 (no sessions): ``acq-sag`` T2w, an axial ``acq-ax`` T2w, a T1w, and a
      ``acq-sag`` file whose affine is axial (``run-2``, skipped);
    - sub-02 ses-1: two runs of ``acq-sag`` T2w, each in two chunks;
    - sub-02 ses-2: a T2w without ``acq`` that is sagittal by its affine (kept), an
      isotropic T2w without ``acq`` whose sidecar says transverse (skipped);
    - an inherited top-level ``acq-sag_T2w.json`` sidecar and one per-file sidecar.
    """
    f = BidsFactory(Path(root))
    f.write_json("acq-sag_T2w.json", {"RepetitionTime": 3.5, "EchoTime": 0.1})
    f.add("01", acq="sag", sidecar={"EchoTime": 0.09, "ImageOrientationText": "Sag"})
    f.add("01", acq="ax", plane="axial")
    f.add("01", acq="sag", suffix="T1w")
    f.add("01", acq="sag", run=2, plane="axial")
    for run in (1, 2):
        for chunk in (1, 2):
            f.add("02", "1", acq="sag", run=run, chunk=chunk, seed=10 * run + chunk)
    f.add("02", "2", plane="sagittal")
    f.add("02", "2", rec="iso", plane="iso-sagittal", sidecar={
        "ImageOrientationPatientDICOM": [1, 0, 0, 0, 1, 0]})  # row x col = slice normal along S-I
    expected = [
        "sub-01/anat/sub-01_acq-sag_T2w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_acq-sag_run-1_chunk-1_T2w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_acq-sag_run-1_chunk-2_T2w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_acq-sag_run-2_chunk-1_T2w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_acq-sag_run-2_chunk-2_T2w.nii.gz",
        "sub-02/ses-2/anat/sub-02_ses-2_T2w.nii.gz",
    ]
    skipped = {
        "sub-01/anat/sub-01_acq-ax_T2w.nii.gz": "axial",
        "sub-01/anat/sub-01_acq-sag_run-2_T2w.nii.gz": "axial",
        "sub-02/ses-2/anat/sub-02_ses-2_rec-iso_T2w.nii.gz": "axial",
    }
    return StandardDataset(f, expected, skipped)


def minimal_dataset(root: Path, subjects: Sequence[str] = ("01",), sessions: Sequence[Optional[str]] = (None,),
                    shape: Sequence[int] = DEFAULT_SHAPE, data: Optional[np.ndarray] = None,
                    affine: Optional[np.ndarray] = None) -> BidsFactory:
    """One ``acq-sag`` T2w per subject and session (e.g. for end-to-end CLI tests); ``data``
    and ``affine`` replace the default phantom and sagittal affine for every scan."""
    f = BidsFactory(Path(root))
    for i, sub in enumerate(subjects):
        for ses in sessions:
            f.add(sub, ses, acq="sag", shape=shape, data=data, affine=affine, seed=i)
    return f
