"""TEST-ONLY segmenters. They follow the protocols of ``spineps.pipeline`` so that the
participant loop, the CLI and the group level can be tested end to end in seconds, without
network weights. They know nothing about anatomy and are never shipped or used as a
default: tests plug them in by monkeypatching ``spineps.models.registry.load_segmenters``.

- :class:`BandSemanticSegmenter`: voxels brighter than a percentile form the "spine"; it is
  cut into bands along the world S-I axis, alternately vertebral body (49) and disc (100),
  and its most posterior quarter is spinal canal (61).
- :class:`ComponentInstanceSegmenter`: connected components of the body voxels become the
  anonymous vertebrae 1..N, numbered top to bottom (at most 24). Everything after the
  instance phase -- consistency, discs and endplates, level names, measurements -- is the
  real code of ``spineps.pipeline``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Optional

import cc3d
import numpy as np

from spineps.geometry.volume import Volume
from spineps.labels import BODY, CANAL, DISC
from spineps.models.protocols import VertebraPrediction

__all__ = ["BandSemanticSegmenter", "ComponentInstanceSegmenter", "make_test_segmenters"]


def _checksum(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _axis_towards(affine: np.ndarray, world_axis: int) -> int:
    """The array axis whose direction is closest to world axis 0 (x, L-R), 1 (y, P-A) or 2 (z, I-S)."""
    return int(np.argmax(np.abs(np.asarray(affine)[world_axis, :3])))


def _world_coord(vol: Volume, world_axis: int) -> np.ndarray:
    """World coordinate (mm) along ``world_axis`` of each index of the array axis that points there."""
    ax = _axis_towards(vol.affine, world_axis)
    idx = np.arange(vol.shape[ax], dtype=float)
    return vol.affine[world_axis, ax] * idx + vol.affine[world_axis, 3]


@dataclass
class BandSemanticSegmenter:
    name: str = "test-bands"
    percentile: float = 40.0
    n_bands: int = 8
    delay_s: float = 0.0  # lets subprocess tests kill a run in the middle of a scan
    modality: tuple[str, ...] = ("T2w",)  # the scan suffixes it is "for", like a model's inference_config.json

    def segment(self, image: Volume) -> Volume:
        if self.delay_s:
            time.sleep(self.delay_s)
        data = np.asarray(image.data, dtype=np.float32)
        fg = data > np.percentile(data, self.percentile)
        z_ax = _axis_towards(image.affine, 2)
        z = _world_coord(image, 2)
        lo, hi = float(z.min()), float(z.max())
        band = np.minimum(((z - lo) / max(hi - lo, 1e-6) * self.n_bands).astype(int), self.n_bands - 1)
        shape = [1, 1, 1]
        shape[z_ax] = -1
        per_slice = np.where(band % 2 == 0, BODY, DISC).astype(np.uint8).reshape(shape)
        out = np.where(fg, per_slice, 0).astype(np.uint8)
        y_ax = _axis_towards(image.affine, 1)
        y = _world_coord(image, 1)
        posterior = y <= np.quantile(y, 0.25)
        yshape = [1, 1, 1]
        yshape[y_ax] = -1
        out[np.broadcast_to(posterior.reshape(yshape), out.shape) & fg] = CANAL
        return image.with_data(out)

    def provenance(self) -> dict[str, Any]:
        params = f"{self.name}:{self.percentile}:{self.n_bands}"
        return {"name": self.name, "version": "test", "checksum": _checksum(params),
                "note": "test-only segmenter from tests/segmenters.py"}


@dataclass
class ComponentInstanceSegmenter:
    name: str = "test-components"

    def segment(self, semantic: Volume) -> VertebraPrediction:
        t0 = time.perf_counter()
        sem = np.asarray(semantic.data)
        z_ax = _axis_towards(semantic.affine, 2)
        sign = np.sign(semantic.affine[2, z_ax])
        lab = cc3d.connected_components((sem == BODY).astype(np.uint8), connectivity=6)
        n = int(lab.max())
        inst = np.zeros(sem.shape, dtype=np.uint16)
        if n:
            idx = np.indices(sem.shape)[z_ax]
            sums = np.bincount(lab.ravel(), weights=idx.ravel(), minlength=n + 1)
            counts = np.bincount(lab.ravel(), minlength=n + 1)
            # world height (larger = more superior) of each component's centre; the top one is 1
            height = [(float(sign * sums[i] / counts[i]), i) for i in range(1, n + 1)]
            for k, (_h, comp) in enumerate(sorted(height, reverse=True)[:24], start=1):
                inst[lab == comp] = k
        return VertebraPrediction(vertebrae=semantic.with_data(inst),
                                  timings={"test_instance": time.perf_counter() - t0})

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "version": "test", "checksum": _checksum(self.name),
                "note": "test-only segmenter from tests/segmenters.py"}


def make_test_segmenters(settings: Any = None, delay_s: float = 0.0,
                    with_instance: bool = True) -> tuple[BandSemanticSegmenter, Optional[ComponentInstanceSegmenter]]:
    """A drop-in for ``spineps.models.registry.load_segmenters`` in tests."""
    return BandSemanticSegmenter(delay_s=delay_s), (ComponentInstanceSegmenter() if with_instance else None)
