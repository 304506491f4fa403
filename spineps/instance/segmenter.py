"""``UNetInstanceSegmenter``: the instance phase on a semantic mask (follows
``spineps.models.protocols.InstanceSegmenter``).

Chain (``segment``): semantic mask -> model orientation and spacing (exact reorientation,
nearest-neighbour resampling) -> vertebral-body centres -> cutouts -> batched forward of
the instance U-Net -> consensus merging -> back onto the semantic mask's exact grid: an
anonymous vertebra mask (1..N top to bottom, world superior first), restricted to
vertebra-part voxels. What follows (consistency, discs and endplates, level names) is
chained by ``spineps.pipeline``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from spineps.errors import ModelError
from spineps.geometry.volume import Volume
from spineps.labels import INSTANCE_PARTS
from spineps.models.device import resolve_device, to_memory_format
from spineps.models.folder import ModelConfig, folder_checksum, read_model_config
from spineps.models.protocols import VertebraPrediction

if TYPE_CHECKING:  # pragma: no cover
    from spineps.models.onnx_engine import OrtForward

__all__ = ["UNetInstanceSegmenter", "ModelGridResult", "find_weights"]

log = logging.getLogger(__name__)

#: cutouts at least this large run in channels_last_3d memory format on CPU
CHANNELS_LAST_MIN_VOXELS = 2_000_000


@dataclass
class ModelGridResult:
    """The merged instances on the model grid, with what led to them."""

    instance: np.ndarray
    centres: list[tuple[int, int, int]]
    groups: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def find_weights(folder: Path) -> Path:
    """The single ``*weights*.ckpt`` of an instance model folder (searched recursively)."""
    folder = Path(folder)
    found = sorted(p for p in folder.rglob("*weights*.ckpt") if p.is_file())
    if len(found) != 1:
        raise ModelError(f"instance model folder must hold exactly one '*weights*.ckpt' file, found {len(found)}"
                         + (f" ({', '.join(p.name for p in found)})" if found else ""), folder)
    return found[0]


class UNetInstanceSegmenter:
    """The instance phase with a SPINEPS instance model folder."""

    name = "spineps-instance-unet"

    def __init__(self, config: ModelConfig, weights: Path, *, device: str = "auto", nprocs: Optional[int] = None,
                 batch_size: Optional[int] = None, channels_last: Optional[bool] = None, precision: str = "fp32",
                 engine: str = "torch"):
        import torch

        from spineps.instance.checkpoint import load_instance_checkpoint

        self.config = config
        self.weights = Path(weights)
        self.device = resolve_device(device)
        self.nprocs = nprocs
        if nprocs is not None and self.device == "cpu":
            torch.set_num_threads(max(1, int(nprocs)))
        loaded = load_instance_checkpoint(self.weights, device=self.device)
        self.network = loaded.network
        self.in_channels = loaded.in_channels
        self.dim = loaded.dim
        self.meta = loaded.meta
        if max(config.mapping.values(), default=0) >= self.in_channels:
            raise ModelError(f"the config's mapping uses value {max(config.mapping.values())} but the network has "
                             f"{self.in_channels} input channels", config.path)
        from spineps.models.precision import resolve_precision

        self.precision = resolve_precision(precision, self.device)  # "fp16" on CUDA, "fp32"/"bf16" on CPU
        self.half = self.precision == "fp16"
        # channels_last_3d on CPU pays off for large cutouts (released 248x304x64: ~32 s instead of
        # ~50 s per forward) but not for small ones (bundled 64x80x16: 1.16 s vs 0.86 s, one
        # thread); see benchmarks/instance_speed.py
        if channels_last is None:
            channels_last = self.device == "cpu" and (self.precision == "bf16" or int(np.prod(config.cutout_size))
                                                      >= CHANNELS_LAST_MIN_VOXELS)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.network = to_memory_format(self.network, torch.channels_last_3d)
        self.batch_size = int(batch_size) if batch_size else (8 if self.device.startswith("cuda") else 2)
        self._checksum: Optional[str] = None
        self._ort: Optional[OrtForward] = None
        self.engine = self._set_engine(engine)

    def _set_engine(self, engine: str) -> str:
        """``torch`` or ``onnxruntime`` (spineps.models.onnx_engine) for the cutout forward passes."""
        import torch

        from spineps.models.onnx_engine import install_or_fall_back, wants_onnxruntime

        if engine == "auto":
            # measured (benchmarks/instance_speed.py): ONNX Runtime is slower than torch for this U-Net
            # (group norm becomes reshape + instance norm: 0.154 vs 0.066 s per cutout, batch 2)
            engine = "torch"
        if not wants_onnxruntime(engine, self.device, self.precision, self.config.path):
            return "torch"
        if self.channels_last:  # the session takes plain contiguous float32 input
            self.network = to_memory_format(self.network, torch.contiguous_format)
            self.channels_last = False
        shape = (self.in_channels, *[int(v) for v in self.config.cutout_size])
        self._ort = install_or_fall_back(self.network, shape, self.nprocs or torch.get_num_threads(),
                                         name=self.config.log_name, asked=engine, folder=self.config.path)
        return "torch" if self._ort is None else "onnxruntime"

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: Path, *, device: str = "auto", nprocs: Optional[int] = None,
                    batch_size: Optional[int] = None, precision: str = "fp32",
                    engine: str = "torch") -> "UNetInstanceSegmenter":
        folder = Path(folder)
        config = read_model_config(folder)
        if "SEG" not in config.modality:
            raise ModelError(f"not an instance model: modality is {list(config.modality)}, expected SEG", folder)
        if config.modeltype != "unet":
            raise ModelError(f"not an instance model: modeltype is {config.modeltype!r}, expected 'unet'", folder)
        if not config.fixed_spacing:
            log.info("instance model %s has a spacing range; inputs are clamped into it", folder)
        return cls(config, find_weights(folder), device=device, nprocs=nprocs, batch_size=batch_size,
                   precision=precision, engine=engine)

    def provenance(self) -> dict[str, Any]:
        if self._checksum is None:
            self._checksum = folder_checksum(self.config.path)
        return {
            "name": self.name,
            "folder": str(self.config.path),
            "log_name": self.config.log_name,
            "weights": self.weights.name,
            "checksum": f"sha256:{self._checksum}",
            "network": {"dim": self.dim, "in_channels": self.in_channels},
            "orientation": list(self.config.orientation),
            "spacing": [list(self.config.spacing_min), list(self.config.spacing_max)],
            "cutout_size": list(self.config.cutout_size),
            "device": self.device,
            "threads": self.nprocs,
            "half_precision": self.half,
            "precision": self.precision,
            "engine": self.engine if self._ort is None else dict(self._ort.describe()),
            "channels_last": self.channels_last,
            "epoch": self.meta.get("epoch"),
        }

    def memory_footprint(self) -> dict[str, Any]:
        """What this network needs beyond the arrays, for ``spineps.resources.InstanceFootprint``."""
        return {"orientation": list(self.config.orientation), "spacing_min": list(self.config.spacing_min),
                "spacing_max": list(self.config.spacing_max), "cutout": list(self.config.cutout_size),
                "in_channels": int(self.in_channels), "dim": int(self.dim), "batch": int(self.batch_size),
                "precision": self.precision, "engine": self.engine, "channels_last": bool(self.channels_last),
                "device": str(self.device).split(":")[0]}

    # -- the network on cutouts -----------------------------------------------------
    def forward_cutouts(self, mapped: np.ndarray, boxes: Sequence) -> list[np.ndarray]:
        """Class maps (uint8, cutout size) for each box of the mapped volume, in batches."""
        import torch
        import torch.nn.functional as F

        from spineps.instance.cutouts import extract_cutout

        out: list[np.ndarray] = []
        dev = torch.device(self.device)
        with torch.inference_mode():
            for i in range(0, len(boxes), self.batch_size):
                chunk = boxes[i:i + self.batch_size]
                idx = torch.from_numpy(np.stack([extract_cutout(mapped, b) for b in chunk]).astype(np.int64))
                x = F.one_hot(idx.to(dev), num_classes=self.in_channels).permute(0, 4, 1, 2, 3).float()
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                else:
                    x = x.contiguous()
                if self.half:
                    with torch.autocast(device_type="cuda", dtype=torch.float16):
                        logits = self.network(x)
                elif self.precision == "bf16":
                    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                        logits = self.network(x).float()
                else:
                    logits = self.network(x)
                cls = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
                out.extend(list(cls))
        return out

    def predict_model_grid(self, semantic: np.ndarray, spacing: Sequence[float]) -> ModelGridResult:
        """Centres, cutouts, forward and merge on an array already in model orientation
        and spacing. Returns the anonymous instances (1..N top to bottom)."""
        from spineps.instance.cutouts import body_centres, cutout_boxes, map_semantic
        from spineps.instance.merge import fill_unassigned, merge_cutout_predictions

        cfg = self.config
        axis = _vertical_axis(cfg.orientation)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        centres = body_centres(semantic, spacing=spacing, axis=axis, corpus_size_cleaning=cfg.corpus_size_cleaning)
        timings["instance_centres"] = time.perf_counter() - t0
        if not centres:
            return ModelGridResult(np.zeros(semantic.shape, np.uint16), [], [], ["no vertebral body found"], timings)
        mapped = map_semantic(semantic, cfg.mapping)
        boxes = cutout_boxes(centres, cfg.cutout_size, semantic.shape)
        t0 = time.perf_counter()
        preds = self.forward_cutouts(mapped, boxes)
        timings["instance_forward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        valid = np.isin(semantic, np.asarray(INSTANCE_PARTS))
        merged = merge_cutout_predictions(preds, boxes, semantic.shape, axis=axis, valid=valid,
                                          min_voxels=cfg.vert_size_threshold)
        merged.instance = fill_unassigned(merged.instance, valid, max_dist=2.0)
        timings["instance_merge"] = time.perf_counter() - t0
        if cfg.orientation[axis] == "S":  # larger index = more superior: renumber so 1 is the top
            n = len(merged.groups)
            inst = merged.instance
            merged.instance = np.where(inst > 0, n + 1 - inst.astype(np.int32), 0).astype(np.uint16)
        log.info("instance phase: %d body centres -> %d vertebrae (%.1f s forward)", len(centres),
                 len(merged.groups), timings["instance_forward"])
        return ModelGridResult(merged.instance, centres, merged.groups, merged.warnings, timings)

    # -- on the semantic mask's grid ------------------------------------------------
    def _predict(self, semantic: Volume) -> tuple[Volume, ModelGridResult]:
        from spineps.geometry.orientation import from_orientation, to_orientation
        from spineps.geometry.resampling import back_to_grid, to_spacing
        from spineps.instance.merge import fill_unassigned

        sem = semantic.with_data(np.asarray(semantic.data).astype(np.int32, copy=False))
        oriented, reo = to_orientation(sem, self.config.orientation)
        target = self.config.target_spacing(oriented.spacing)
        model_grid = to_spacing(oriented, target, order=0)
        res = self.predict_model_grid(np.asarray(model_grid.data), model_grid.spacing)
        back = back_to_grid(model_grid.with_data(res.instance), oriented, order=0)
        inst = from_orientation(back, reo)
        data = np.asarray(inst.data).astype(np.uint16)
        parts = np.isin(np.asarray(semantic.data), np.asarray(INSTANCE_PARTS))
        data[~parts] = 0
        # vertebra-part voxels of the finer input grid that the coarser model grid missed
        # (thin processes, borders) take the nearest instance within two model voxels
        data = fill_unassigned(data, parts, max_dist=2.0 * max(model_grid.spacing), sampling=semantic.spacing)
        return semantic.with_data(data), res

    def segment(self, semantic: Volume) -> VertebraPrediction:
        """The anonymous vertebra mask (1..N, world superior first) on ``semantic``'s grid."""
        t0 = time.perf_counter()
        vert, res = self._predict(semantic)  # on the whole grid: the model grid stays aligned with it
        timings = dict(res.timings)
        timings["instance_network_total"] = time.perf_counter() - t0
        return VertebraPrediction(vertebrae=vert, warnings=list(res.warnings), timings=timings)

    def predict_vertebrae(self, semantic: Volume) -> Volume:
        """Only the vertebra mask of :meth:`segment`."""
        return self.segment(semantic).vertebrae


def _vertical_axis(codes: Sequence[str]) -> int:
    for i, c in enumerate(codes):
        if c in ("S", "I"):
            return i
    raise ModelError(f"model orientation {tuple(codes)} has no S/I axis")
