"""A whole-spine phantom cut into stations, as a whole-spine protocol acquires it: two or
three sagittal fields of view along the spine, overlapping, abutting or with a gap, each
on its own grid (spacing, orientation) and optionally with the patient moved between them.

- :class:`StationCut`: one station's world S-I range (RAS z, mm), grid and patient shift.
- :func:`even_cuts`: ``n`` stations covering a spec's field of view with a given overlap
  (a negative overlap is a gap; 0 abuts).
- :func:`cut_stations`: the phantom rasterised on each station's grid (the same anatomy:
  ``make_phantom(spec, grid=...)``) with the reference masks and, on demand, the T2w image.
- :func:`write_station_dataset`: a BIDS dataset of such sessions (``chunk-1..n``, one
  session per subject) with the reference masks in ``derivatives/reference`` (what the
  station tests and ``benchmarks/naming_alignment.py`` run on).

A shift ``(dx, dy, dz)`` mimics a patient who moved between stations: the station's header
says the anatomy is ``shift`` mm away from where it is, so the affines alone misplace it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from spineps.fsutil import write_json_atomic
from spineps.geometry.io import save_volume
from spineps.geometry.volume import Volume
from spineps.synth.anatomy import Phantom, PhantomSpec, build_grid, make_phantom, phantom_layout

__all__ = ["StationCut", "Station", "even_cuts", "cut_stations", "write_station_dataset"]


@dataclass(frozen=True)
class StationCut:
    """One station: world S coordinates (RAS z, mm) of its top and bottom borders, its grid
    (``None``: the spec's spacing / orientation) and the patient shift (mm) in its header."""

    top_mm: float
    bottom_mm: float
    spacing: Optional[tuple[float, float, float]] = None
    orientation: Optional[tuple[str, str, str]] = None
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Station:
    """A station's phantom (on the true grid) and the affine its header gives."""

    cut: StationCut
    phantom: Phantom
    affine: np.ndarray = field(repr=False)

    def _reported(self, vol: Volume) -> Volume:
        return Volume(np.asarray(vol.data), self.affine.copy())

    @property
    def semantic(self) -> Volume:
        """Reference semantic mask (endplates split 52/53), on the station's reported grid."""
        return self._reported(self.phantom.semantic_split())

    @property
    def instance(self) -> Volume:
        return self._reported(self.phantom.instance)

    @property
    def levels(self) -> list[int]:
        """Vertebra values with voxels in this station (sacrum 26 included), top to bottom."""
        return list(self.phantom.levels)

    def image(self, seed: int = 0) -> Volume:
        """The station's T2w image (rendered on the true grid, reported grid in the header)."""
        from spineps.synth.render import render_t2w

        return self._reported(render_t2w(self.phantom, seed=seed, stations=1))


def even_cuts(spec: PhantomSpec, n: int = 3, overlap_mm: float = 40.0,
              spacings: Optional[Sequence[Optional[tuple[float, float, float]]]] = None,
              shifts: Optional[Sequence[tuple[float, float, float]]] = None) -> list[StationCut]:
    """``n`` stations of equal length covering ``spec``'s field of view from the top, each
    pair of neighbours overlapping by ``overlap_mm`` (0: abutting; negative: a gap)."""
    lo, hi = (np.asarray(b, float) for b in phantom_layout(spec)["fov_world_box"])
    total = float(hi[2] - lo[2])
    length = (total + (n - 1) * overlap_mm) / n
    cuts = []
    for k in range(n):
        top = float(hi[2]) - k * (length - overlap_mm)
        cuts.append(StationCut(top, top - length, None if spacings is None else spacings[k],
                               None, (0.0, 0.0, 0.0) if shifts is None else tuple(shifts[k])))  # type: ignore[arg-type]
    return cuts


def cut_stations(spec: PhantomSpec, cuts: Sequence[StationCut]) -> list[Station]:
    """The phantom of ``spec`` on each station's grid (its x/y extent is the spec's field of
    view, its z extent the cut's)."""
    lo, hi = (np.asarray(b, float) for b in phantom_layout(spec)["fov_world_box"])
    out = []
    for cut in cuts:
        c_lo, c_hi = lo.copy(), hi.copy()
        c_lo[2], c_hi[2] = min(cut.top_mm, cut.bottom_mm), max(cut.top_mm, cut.bottom_mm)
        spacing = tuple(cut.spacing or spec.spacing)
        affine, shape = build_grid(c_lo, c_hi, spacing, tuple(cut.orientation or spec.orientation))
        ph = make_phantom(spec, grid=(affine, shape))
        reported = affine.copy()
        reported[:3, 3] += np.asarray(cut.shift_mm, float)
        out.append(Station(cut, ph, reported))
    return out


def write_station_dataset(out_dir: Union[str, Path], sessions: Sequence[tuple[PhantomSpec, Sequence[StationCut]]],
                          *, images: bool = True, seed: int = 0) -> Path:
    """A BIDS dataset with one subject per ``(spec, cuts)``: ``sub-NN/ses-1/anat/
    sub-NN_ses-1_acq-sag_chunk-K_T2w.nii.gz`` (K = 1 at the top; ``images=False`` writes the
    reference masks only) and ``derivatives/reference/...chunk-K_desc-{spine,vertebrae}_dseg``."""
    from spineps.synth.demo import scan_sidecar, write_dataset_files

    out = Path(out_dir)
    ref = write_dataset_files(out, name="SPINEPS synthetic whole-spine stations",
                              description=f"write_station_dataset({len(sessions)} sessions)")
    for i, (spec, cuts) in enumerate(sessions, start=1):
        sub = f"sub-{i:02d}"
        for k, st in enumerate(cut_stations(spec, cuts), start=1):
            stem = f"{sub}_ses-1_acq-sag_chunk-{k}"
            if images:
                img = st.image(seed=seed + 31 * i + k)
                img = img.with_data(np.clip(np.rint(img.data), 0, 32767).astype(np.int16))
                save_volume(img, out / sub / "ses-1" / "anat" / f"{stem}_T2w.nii.gz", dtype=np.int16)
                write_json_atomic(out / sub / "ses-1" / "anat" / f"{stem}_T2w.json",
                                  scan_sidecar(tuple(st.cut.spacing or spec.spacing),
                                               tuple(st.cut.orientation or spec.orientation), 1.5))
            save_volume(st.semantic, ref / sub / "ses-1" / "anat" / f"{stem}_desc-spine_dseg.nii.gz", dtype=np.uint8)
            save_volume(st.instance, ref / sub / "ses-1" / "anat" / f"{stem}_desc-vertebrae_dseg.nii.gz",
                        dtype=np.uint16)
    return out
