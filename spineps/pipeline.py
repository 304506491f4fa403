"""The one place where the stages chain: ``segment_scan`` (image -> masks) and
``segment_from_semantic`` (an existing semantic mask -> instances; the instance phase needs
no image).

The stages are objects that follow two small protocols, so the CLI, the tests and the
benchmarks can plug in any model that follows the model-folder contract:

- ``SemanticSegmenter.segment(image) -> Volume``: the semantic mask (community label
  values) on the exact grid of ``image`` (pre-processing, inference, clean-up and the way
  back onto the input grid happen inside).
- ``InstanceSegmenter.segment(semantic) -> InstanceOutput``: vertebra instances with level
  names, discs (100+X) and endplates (200+X), and the post-processed semantic mask, all on
  the grid of ``semantic``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from spineps.geometry.volume import Volume
from spineps.labels import BODY, VERTEBRA_VALUES

__all__ = [
    "SemanticSegmenter",
    "InstanceSegmenter",
    "InstanceOutput",
    "ScanResult",
    "segment_scan",
    "segment_from_semantic",
    "body_centroids",
]

log = logging.getLogger(__name__)


@runtime_checkable
class SemanticSegmenter(Protocol):
    name: str

    def segment(self, image: Volume) -> Volume: ...

    def provenance(self) -> dict[str, Any]: ...


@dataclass
class InstanceOutput:
    """What the instance phase hands back, on the semantic mask's grid."""

    semantic: Volume  # post-processed semantic mask (endplates split, consistent with instances)
    instance: Volume  # vertebrae 1..28, discs 100+X, endplates 200+X
    naming: dict[str, Any] = field(default_factory=dict)  # e.g. {"rule": "sacrum", "levels": ["T12", ...]}
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@runtime_checkable
class InstanceSegmenter(Protocol):
    name: str

    def segment(self, semantic: Volume) -> InstanceOutput: ...

    def provenance(self) -> dict[str, Any]: ...


@dataclass
class ScanResult:
    semantic: Volume
    instance: Optional[Volume]
    centroids: dict[int, dict[str, list[float]]]  # vertebra value -> {"voxel": [...], "world": [...]}
    naming: dict[str, Any]
    timings: dict[str, float]
    warnings: list[str]
    provenance: dict[str, Any]


def body_centroids(semantic: Volume, instance: Volume) -> dict[int, dict[str, list[float]]]:
    """Centre of mass of each vertebra's body voxels (falls back to the whole vertebra where
    it has no body voxel), in voxel indices and RAS world millimetres (one bincount pass per
    mask, ``postprocess.discs.label_centroids``)."""
    from spineps.postprocess.discs import label_centroids

    inst = np.asarray(instance.data)
    ids = sorted(int(v) for v in np.unique(inst) if int(v) in VERTEBRA_VALUES)
    if not ids:
        return {}
    whole, _ = label_centroids(inst, ids)
    body, n_body = label_centroids(np.where(np.asarray(semantic.data) == BODY, inst, 0), ids)
    out: dict[int, dict[str, list[float]]] = {}
    for k, v in enumerate(ids):
        vox = body[k] if n_body[k] > 0 else whole[k]
        world = instance.affine[:3, :3] @ vox + instance.affine[:3, 3]
        out[v] = {"voxel": [round(float(x), 3) for x in vox], "world": [round(float(x), 3) for x in world]}
    return out


def segment_from_semantic(semantic: Volume, instance_model: InstanceSegmenter) -> ScanResult:
    """Instance phase + post-processing + level naming on an existing semantic mask."""
    t0 = time.perf_counter()
    out = instance_model.segment(semantic)
    timings = {"instance_total": time.perf_counter() - t0, **out.timings}
    return ScanResult(
        semantic=out.semantic,
        instance=out.instance,
        centroids=body_centroids(out.semantic, out.instance),
        naming=out.naming,
        timings=timings,
        warnings=list(out.warnings),
        provenance={"instance_model": instance_model.provenance()},
    )


def segment_scan(image: Volume, semantic_model: SemanticSegmenter,
                 instance_model: Optional[InstanceSegmenter]) -> ScanResult:
    """Semantic phase, then (when an instance model is given) the instance phase."""
    t0 = time.perf_counter()
    log.info("semantic phase (%s) on %s", semantic_model.name, image)
    semantic = semantic_model.segment(image)
    if not semantic.same_grid(image):
        raise RuntimeError(f"semantic model {semantic_model.name} returned a mask off the input grid")
    t_sem = time.perf_counter() - t0
    prov = {"semantic_model": semantic_model.provenance()}
    if instance_model is None:
        return ScanResult(semantic, None, {}, {}, {"semantic_total": t_sem}, [], prov)
    log.info("instance phase (%s)", instance_model.name)
    result = segment_from_semantic(semantic, instance_model)
    result.timings = {"semantic_total": t_sem, **result.timings}
    result.provenance = {**prov, **result.provenance}
    return result
