"""Vertebra helpers shared by the post-processing, the level naming and the measurements.

- ``check_same_grid``: semantic and instance masks must share a grid (``InputError``).
- ``vertebra_ids``: the anonymous vertebra ids of an instance array (1..99 but the sacrum).
- ``label_centroids``: voxel centroids and counts of many labels in one ``bincount`` pass.
- ``VertebraCentroids`` / ``vertebra_centroids``: each vertebra's body centroid (the whole
  vertebra where it has no body voxel), computed once per scan by ``spineps.pipeline`` and
  passed to every later stage; ``renamed`` / ``shifted`` follow the level names and the way
  back from the spine's box to the full grid.
- ``world_superior_order``: ids sorted top to bottom by the world height of their centroids.
- ``VertebraFrame`` / ``vertebra_frames``: a local anatomical frame per vertebra (body centre,
  superior axis along the spine, anterior axis).
- ``body_mask_of``: a vertebra's body voxels with its own endplates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from spineps.errors import InputError
from spineps.geometry.volume import Volume
from spineps.labels import BODY, ENDPLATE_INF, ENDPLATE_SUP, SACRUM

__all__ = [
    "check_same_grid",
    "vertebra_ids",
    "label_centroids",
    "VertebraCentroids",
    "vertebra_centroids",
    "world_superior_order",
    "VertebraFrame",
    "vertebra_frames",
    "body_mask_of",
    "to_world",
]


def check_same_grid(semantic: Volume, instance: Volume) -> None:
    """``InputError`` unless the two masks share shape and affine."""
    if not semantic.same_grid(instance):
        raise InputError(f"semantic mask {semantic!r} and instance mask {instance!r} are not on the same grid")


def vertebra_ids(instance: np.ndarray) -> list[int]:
    """Sorted vertebra ids of an anonymous instance array (1..99 except the sacrum 26)."""
    vals = np.unique(instance)
    return [int(v) for v in vals if 0 < v < 100 and v != SACRUM]


def to_world(affine: np.ndarray, vox: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices -> (N, 3) world millimetres."""
    return vox @ affine[:3, :3].T + affine[:3, 3]


def label_centroids(labels: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-index centroids and voxel counts of ``ids`` in ``labels`` (NaN where absent);
    one pass over the non-zero voxels (much faster than ``ndimage.center_of_mass``)."""
    nz = np.nonzero(labels)
    lab = labels[nz].astype(np.int64)
    size = max(int(lab.max(initial=0)), max(ids, default=0)) + 1
    count = np.bincount(lab, minlength=size).astype(float)
    sums = np.stack([np.bincount(lab, weights=c, minlength=size) for c in nz], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cent = sums / count[:, None]
    idx = np.asarray(ids, dtype=np.int64)
    return cent[idx], count[idx]


@dataclass(frozen=True, eq=False)
class VertebraCentroids:
    """Centroids of vertebra instances on one grid, in voxel indices: ``body[k]`` is the
    centre of mass of vertebra ``ids[k]``'s body voxels (49) -- of the whole vertebra where it
    has none -- and ``whole[k]`` that of all its voxels; ``n_body[k]`` counts its body voxels."""

    ids: tuple[int, ...]
    body: np.ndarray  # (N, 3)
    whole: np.ndarray  # (N, 3)
    n_body: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, ids: Sequence[int]) -> "VertebraCentroids":
        """The rows of ``ids`` (each must be present), in that order."""
        pos = {v: k for k, v in enumerate(self.ids)}
        try:
            rows = [pos[int(v)] for v in ids]
        except KeyError as exc:
            raise ValueError(f"no centroid for vertebra {exc.args[0]} (have {list(self.ids)})") from None
        return VertebraCentroids(tuple(int(v) for v in ids), self.body[rows], self.whole[rows], self.n_body[rows])

    def renamed(self, mapping: Mapping[int, int]) -> "VertebraCentroids":
        """Ids replaced by ``mapping[id]`` (level values); ids that map to 0 or are absent are
        dropped (their voxels lost their name)."""
        keep = [k for k, v in enumerate(self.ids) if mapping.get(v)]
        return VertebraCentroids(tuple(int(mapping[self.ids[k]]) for k in keep), self.body[keep], self.whole[keep],
                                 self.n_body[keep])

    def shifted(self, offset: Sequence[int]) -> "VertebraCentroids":
        """The same centroids in the voxel indices of a grid whose index ``offset`` is index 0
        of this one (the way back from a crop: ``Crop.offset``)."""
        off = np.asarray(offset, dtype=float)
        return VertebraCentroids(self.ids, self.body + off, self.whole + off, self.n_body)


def vertebra_centroids(semantic: Volume, instance: Volume, ids: Optional[Sequence[int]] = None
                       ) -> VertebraCentroids:
    """Body and whole-vertebra centroids of the anonymous vertebrae ``ids`` (default: all)."""
    sem = np.asarray(semantic.data)
    inst = np.asarray(instance.data)
    ids = vertebra_ids(inst) if ids is None else [int(v) for v in ids]
    if not ids:
        empty = np.zeros((0, 3))
        return VertebraCentroids((), empty, empty.copy(), np.zeros(0))
    vert = np.where((inst > 0) & (inst < 100) & (inst != SACRUM), inst, 0)
    com_all, _ = label_centroids(vert, ids)
    com_body, n_body = label_centroids(np.where(sem == BODY, vert, 0), ids)
    body = np.asarray([cb if nb > 0 else ca for cb, ca, nb in zip(com_body, com_all, n_body)])
    return VertebraCentroids(tuple(ids), body, np.asarray(com_all), np.asarray(n_body))


def world_superior_order(instance: Volume, ids: list[int], semantic: Optional[np.ndarray] = None) -> list[int]:
    """``ids`` sorted top to bottom by the world S coordinate of their (body) centroid."""
    inst = np.asarray(instance.data)
    if not ids:
        return []
    coms, _ = label_centroids(inst, ids)
    if semantic is not None:
        com_body, n_body = label_centroids(np.where(semantic == BODY, inst, 0), ids)
        coms = np.where((n_body > 0)[:, None], com_body, coms)
    world_z = np.asarray(coms, float) @ instance.affine[2, :3] + instance.affine[2, 3]
    order = np.argsort(-world_z, kind="stable")
    return [ids[i] for i in order]


@dataclass(frozen=True)
class VertebraFrame:
    """Local anatomical frame of one vertebra, in world (RAS) millimetres."""

    id: int
    centroid: np.ndarray  # body centroid (whole vertebra when it has no body voxel)
    superior: np.ndarray  # unit vector along the spine, towards the head
    anterior: np.ndarray  # unit vector, perpendicular to ``superior``
    n_body: int  # body voxels (49 and, when given, its endplates)

    @property
    def right(self) -> np.ndarray:
        return np.cross(self.anterior, self.superior)


def _superior_axis(c_world: np.ndarray, i: int) -> np.ndarray:
    """Central difference of the neighbouring body centres (world superior when alone)."""
    up_world = np.array([0.0, 0.0, 1.0])
    n = len(c_world)
    if n == 1:
        return up_world
    u = c_world[max(i - 1, 0)] - c_world[min(i + 1, n - 1)]
    norm = np.linalg.norm(u)
    return u / norm if norm > 1e-6 else up_world


def vertebra_frames(semantic: Volume, instance: Volume, ids: Optional[list[int]] = None,
                    centroids: Optional[VertebraCentroids] = None) -> dict[int, VertebraFrame]:
    """Frames of the anonymous vertebrae ``ids`` (default: all 1..N), ordered top to bottom;
    ``centroids`` (of ``vertebra_centroids`` on these masks) saves computing them again."""
    if ids is None:
        ids = list(centroids.ids) if centroids is not None else vertebra_ids(np.asarray(instance.data))
    if not ids:
        return {}
    cen = vertebra_centroids(semantic, instance, ids) if centroids is None else centroids.select(ids)
    c_world = to_world(semantic.affine, cen.body)
    a_world = to_world(semantic.affine, cen.whole)
    frames: dict[int, VertebraFrame] = {}
    for i, v in enumerate(ids):
        u = _superior_axis(c_world, i)
        # anterior: from the whole-vertebra centroid to the body centroid (the body is
        # anterior to the arch), else world anterior; made perpendicular to u
        a = c_world[i] - a_world[i] if cen.n_body[i] > 0 else np.zeros(3)
        a = a - (a @ u) * u
        if np.linalg.norm(a) < 1.0:  # no posterior elements to tell: world anterior
            a = np.array([0.0, 1.0, 0.0]) - u[1] * u
        a = a / max(np.linalg.norm(a), 1e-9)
        frames[v] = VertebraFrame(v, c_world[i], u, a, int(cen.n_body[i]))
    return frames


def body_mask_of(sem: np.ndarray, inst: np.ndarray, v: int) -> np.ndarray:
    """Body voxels of anonymous vertebra ``v``: its 49 voxels plus its own endplates
    (52 valued ``200 + v - 1``, 53 valued ``200 + v``) when the masks carry them."""
    return ((inst == v) & (sem == BODY)) | ((sem == ENDPLATE_SUP) & (inst == 200 + v - 1)) | (
        (sem == ENDPLATE_INF) & (inst == 200 + v))
