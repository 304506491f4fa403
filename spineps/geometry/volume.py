"""``Volume``: a 3D array together with the voxel-to-world affine it lives on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

__all__ = ["Volume", "int3", "float3", "str3"]


def int3(values: Iterable[Any]) -> tuple[int, int, int]:
    """Three values as a 3-tuple of ints (``ValueError`` unless there are exactly three)."""
    a, b, c = (int(v) for v in values)
    return a, b, c


def float3(values: Iterable[Any]) -> tuple[float, float, float]:
    """Three values as a 3-tuple of floats (``ValueError`` unless there are exactly three)."""
    a, b, c = (float(v) for v in values)
    return a, b, c


def str3(values: Iterable[Any]) -> tuple[str, str, str]:
    """Three values as a 3-tuple of strings (``ValueError`` unless there are exactly three)."""
    a, b, c = (str(v) for v in values)
    return a, b, c


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D array on a grid. ``affine`` maps voxel indices to RAS+ world millimetres
    (the NIfTI convention). Instances are treated as immutable: transforms return new ones.
    """

    data: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Volume needs a 3D array, got shape {self.data.shape}")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise ValueError(f"Volume needs a 4x4 affine, got {aff.shape}")
        object.__setattr__(self, "affine", aff)

    @property
    def shape(self) -> tuple[int, int, int]:
        return int3(self.data.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return float3(np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Direction each array axis points to, e.g. ('P', 'I', 'R')."""
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))

    @property
    def voxel_volume(self) -> float:
        """mm^3 of one voxel."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def with_data(self, data: np.ndarray) -> "Volume":
        """The same grid carrying other data (shape must match)."""
        if tuple(data.shape) != self.shape:
            raise ValueError(f"shape {data.shape} does not match grid {self.shape}")
        return Volume(data, self.affine.copy())

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def __repr__(self) -> str:
        return (f"Volume(shape={self.shape}, dtype={self.data.dtype}, axcodes={''.join(self.axcodes)}, "
                f"spacing={tuple(round(s, 3) for s in self.spacing)})")
