"""What a model must offer to take part in a run: the two phases as small protocols.

- ``SemanticSegmenter.segment(image) -> Volume``: the semantic mask (community label values)
  on the exact grid of ``image`` (pre-processing, inference, clean-up and the way back onto
  the input grid happen inside).
- ``InstanceSegmenter.segment(semantic) -> VertebraPrediction``: the vertebra instances of a
  semantic mask and nothing more: anonymous vertebrae ``1..N`` numbered top to bottom (world
  superior first) on the mask's grid. Post-processing, discs, endplates and level names are
  later stages of ``spineps.pipeline``.

A semantic segmenter may also say which scans it is for (``modality``: BIDS suffixes such as
``("T2w",)``, from its ``inference_config.json``); a participant run refuses others.

``spineps.semantic.predict.NnUNetSemanticSegmenter`` and
``spineps.instance.segmenter.UNetInstanceSegmenter`` implement them for the released model
folders; the tests plug in others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from spineps.geometry.volume import Volume

__all__ = ["SemanticSegmenter", "InstanceSegmenter", "VertebraPrediction"]


@runtime_checkable
class SemanticSegmenter(Protocol):
    name: str

    def segment(self, image: Volume) -> Volume: ...

    def provenance(self) -> dict[str, Any]: ...


@dataclass
class VertebraPrediction:
    """The instance phase's answer, on the semantic mask's grid."""

    vertebrae: Volume  # anonymous vertebrae 1..N, top to bottom, on vertebra-part voxels (41..49) only
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class InstanceSegmenter(Protocol):
    name: str

    def segment(self, semantic: Volume) -> VertebraPrediction: ...

    def provenance(self) -> dict[str, Any]: ...
