"""The semantic phase with an nnU-Net v2 model folder.

``NnUNetSemanticSegmenter.segment(image)``:

1. pre-processing (``preprocess.preprocess_image``): intensity shift/cap, N4 in the non-zero
   bounding box (optional, on by default); in participant runs (``n4_helper``) N4 runs in a
   helper process (``spineps.semantic.n4_helper``: ITK never loads here), the run's first
   scan's while the models load (``prefetched_n4``);
2. reorientation to the model's ``model_expected_orientation`` and resampling to
   ``ModelConfig.target_spacing`` (cubic for the image);
3. nnU-Net sliding-window inference through ``nnUNetPredictor`` (initialised manually from
   the folder, see ``spineps.models.nnunet_folder``). nnU-Net expects SimpleITK axis order,
   so the model-orientation array (e.g. P, I, R) is handed over with its axes (and spacing)
   reversed (R, I, P), the way the reference implementation does it;
4. output indices mapped through the config's ``labels`` to community values;
5. clean-up on the model grid (``cleanup.clean_semantic``);
6. back onto the exact input grid (nearest neighbour through world coordinates).

Devices: ``device="auto"`` uses CUDA when present, else CPU. ``nprocs`` sets torch's
threads (and ONNX Runtime's): the threads of each step, ``Settings.threads``. Half precision
(autocast) is used by nnU-Net on CUDA only. Test-time mirroring:
``tta`` (the app's ``--tta``, off by default on every device) mirrors along the axes the model
allows and refuses, with a warning, for a model that allows none; without ``tta``,
``mirroring`` decides (None: ``inference_augmentation`` on GPU, off on CPU; True forces all
three axes, e.g. for ``benchmarks/tta_probabilities.py``). Opt-in CPU speed options (``benchmarks/inference_options.py``
measures them): ``channels_last`` (weights in ``torch.channels_last_3d``: identical labels, within
noise of the default speed on 2 cores) and ``cpu_bf16`` (bfloat16 autocast: several times faster
on CPUs with native bf16, labels differ in a few boundary voxels).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from spineps.errors import InputError, ModelError
from spineps.geometry.volume import Volume
from spineps.logging_setup import quiet_stdout
from spineps.models.device import resolve_device, to_memory_format
from spineps.models.folder import ModelConfig, folder_checksum
from spineps.semantic.cleanup import CleanupSettings, clean_semantic
from spineps.semantic.preprocess import N4Settings, preprocess_image

if TYPE_CHECKING:  # pragma: no cover
    from spineps.models.onnx_engine import OrtForward

__all__ = ["NnUNetSemanticSegmenter"]

log = logging.getLogger(__name__)


def _warn_if_nnunet_caps_threads() -> None:
    """nnU-Net's predictor runs its sliding window with at most ``nnUNet_def_n_proc`` torch
    threads (``predict_logits_from_preprocessed_data``); a small value set for training or
    pre-processing silently slows inference down (1 instead of 2 threads: 1.5x slower here)."""
    import torch

    with quiet_stdout(log):
        from nnunetv2.configuration import default_num_processes
    if default_num_processes < torch.get_num_threads():
        log.warning("nnUNet_def_n_proc=%d limits nnU-Net's inference to %d thread(s) (asked for %d); unset it "
                    "for full speed", default_num_processes, default_num_processes, torch.get_num_threads())


class NnUNetSemanticSegmenter:
    """Semantic segmenter over an nnU-Net v2 model folder (follows ``pipeline.SemanticSegmenter``)."""

    def __init__(self, loaded: Any, *, device: str = "auto", nprocs: Optional[int] = None, n4: bool = True,
                 mirroring: Optional[bool] = None, step_size: Optional[float] = None,
                 cleanup: CleanupSettings = CleanupSettings(), n4_settings: N4Settings = N4Settings(),
                 channels_last: Optional[bool] = None, cpu_bf16: bool = False, precision: Optional[str] = None,
                 engine: str = "torch", tta: Optional[bool] = None, probabilities: bool = False,
                 n4_helper: bool = False):
        import torch

        from spineps.models.precision import resolve_precision

        self.loaded = loaded
        self.config: ModelConfig = loaded.folder.config
        self.name: str = self.config.log_name
        self.folder: Path = loaded.folder.path
        self.device = torch.device(resolve_device(device))
        self.nprocs = nprocs
        if nprocs is not None:
            if nprocs < 1:
                raise ModelError(f"nprocs must be >= 1, got {nprocs}")
            torch.set_num_threads(int(nprocs))
        self.n4 = bool(n4)
        self.n4_settings = n4_settings
        #: N4 in a helper process (``spineps.semantic.n4_helper``: ITK stays out of this
        #: process); ``prefetched_n4``: helpers started before the model loaded (a run's first
        #: scan), used when one corrected exactly the image being segmented
        self.n4_helper = bool(n4_helper)
        self.prefetched_n4: list[Any] = []
        self.cleanup = cleanup
        self.mirroring, self.step_size = self._sliding_window(mirroring, step_size)
        self.tta_axes: Optional[tuple[int, ...]] = None  # --tta: the network axes mirrored
        if tta is not None:  # --tta: mirroring along the axes the model allows, or none
            self.mirroring = bool(tta) and self._tta_allowed(loaded)
        #: --save-probabilities: ``segment`` leaves (4D float16 on the image grid, label values)
        #: in ``last_probabilities``
        self.save_probabilities = bool(probabilities)
        self.last_probabilities: Optional[tuple[np.ndarray, list[int]]] = None
        self._model_probs: Optional[np.ndarray] = None
        self.predictor = self._predictor(loaded)
        # precision (spineps.models.precision): "bf16" on CPU = bfloat16 autocast + channels-last
        # weights (the fastest combination in benchmarks/inference_options.py)
        self.precision = resolve_precision(precision or ("bf16" if cpu_bf16 else "fp32"), self.device.type)
        if self.precision == "bf16" and channels_last is None:
            channels_last = True
        # channels_last_3d weights: the same results; nnU-Net copies each fold's parameters
        # into the network before predicting (copy_ keeps this layout)
        self.channels_last = False if channels_last is None else bool(channels_last)
        if self.channels_last and isinstance(self.predictor.network, torch.nn.Module):
            to_memory_format(self.predictor.network, torch.channels_last_3d)
        self.cpu_bf16 = False
        self._ort: Optional[OrtForward] = None
        if self.precision == "bf16":
            self.set_cpu_bf16(True)
        self.engine = self._set_engine(engine, loaded)
        _warn_if_nnunet_caps_threads()
        self._lut = self._label_lut(loaded.num_outputs)
        self._checksum: Optional[str] = None
        self.timings: dict[str, float] = {}

    def _sliding_window(self, mirroring: Optional[bool], step_size: Optional[float]) -> tuple[bool, float]:
        """Test-time mirroring (the config's choice on GPU, off on CPU unless asked for) and the
        tile step of nnU-Net's sliding window."""
        on_gpu = self.device.type == "cuda"
        mirror = bool(self.config.inference_augmentation and on_gpu) if mirroring is None else bool(mirroring)
        return mirror, float(self.config.default_step_size if step_size is None else step_size)

    def _tta_allowed(self, loaded: Any) -> bool:
        """Whether the model allows test-time mirroring, and along which axes (kept in
        ``self.tta_axes``): the ones its checkpoint names (``inference_allowed_mirroring_axes``),
        else all three when its ``inference_config.json`` has ``inference_augmentation``; never
        the left-right axis when the model has lateralised labels (left / right processes: a
        mirrored copy would swap them). Logged either way."""
        from spineps.labels import SEMANTIC_BY_VALUE

        axes = getattr(loaded, "mirror_axes", None)
        if axes is None and self.config.inference_augmentation:
            axes = (0, 1, 2)
        lateral = any(lab is not None and ("left" in lab.name or "right" in lab.name)
                      for lab in (SEMANTIC_BY_VALUE.get(int(v)) for v in self.config.labels.values()))
        if axes is not None and lateral:
            net_order = tuple(reversed(self.config.orientation))  # the network's arrays: model grid reversed
            lr = next((i for i, c in enumerate(net_order) if c in ("L", "R")), None)
            axes = tuple(a for a in axes if a != lr)
        if axes:
            self.tta_axes = tuple(int(a) for a in axes)
            log.info("test-time mirroring (--tta) along network axes %s%s", self.tta_axes,
                     " (not left-right: the model has left/right labels)" if lateral else "")
            return True
        log.warning("--tta: the semantic model %s allows no test-time mirroring (no "
                    "inference_allowed_mirroring_axes in its checkpoint, inference_augmentation false%s): run "
                    "without it", self.name, ", left-right excluded" if lateral and axes is not None else "")
        return False

    def _predictor(self, loaded: Any) -> Any:
        """nnU-Net's predictor, initialised by hand from the loaded folder (no trainer lookup)."""
        from spineps.models.nnunet_import import nnunet_predictor_class

        nnUNetPredictor = nnunet_predictor_class()
        mirror_axes = self.tta_axes if self.tta_axes is not None else getattr(loaded, "mirror_axes", None)
        if self.mirroring and mirror_axes is None:
            mirror_axes = (0, 1, 2)
        on_gpu = self.device.type == "cuda"
        with quiet_stdout(log):
            predictor = nnUNetPredictor(tile_step_size=self.step_size, use_gaussian=True,
                                        use_mirroring=self.mirroring, perform_everything_on_device=on_gpu,
                                        device=self.device, verbose=False, verbose_preprocessing=False,
                                        allow_tqdm=False)
            predictor.manual_initialization(loaded.network.to(self.device), loaded.plans_manager,
                                            loaded.configuration_manager, loaded.parameters,
                                            loaded.folder.dataset_json, loaded.trainer_name, mirror_axes)
        return predictor

    def _label_lut(self, n_outputs: int) -> np.ndarray:
        """Network output index -> community label value (uint8)."""
        lut = np.zeros(max(n_outputs, 1), np.uint8)
        for idx, value in self.config.labels.items():
            if not 0 <= value <= 255:
                raise ModelError(f"label value {value} does not fit the uint8 semantic mask",
                                 self.folder / "inference_config.json")
            lut[idx] = value
        return lut

    def _set_engine(self, engine: str, loaded: Any) -> str:
        """``torch`` or ``onnxruntime`` (spineps.models.onnx_engine): the latter replaces the
        network's forward by an ONNX Runtime session for nnU-Net's tile shape."""
        import torch

        from spineps.models.onnx_engine import install_or_fall_back, wants_onnxruntime

        net = self.predictor.network
        if not wants_onnxruntime(engine, self.device.type, self.precision, self.folder) or not isinstance(
                net, torch.nn.Module):
            return "torch"
        cm = loaded.configuration_manager
        patch = [int(v) for v in cm.patch_size]
        shape = (int(loaded.num_inputs), *patch)
        # the export traces a small input (twice the network's total stride per axis; the
        # session is then fixed to the tile shape): a full tile of the released model would cost
        # ~18 s of float32 forward pass and 4 GB at export
        total = np.prod(np.asarray(cm.pool_op_kernel_sizes, dtype=np.int64).reshape(-1, len(patch)), axis=0)
        trace = (shape[0], *[int(min(p, 2 * t)) for p, t in zip(patch, total)])
        self._ort = install_or_fall_back(net, shape, self.nprocs or torch.get_num_threads(), name=self.name,
                                         asked=engine, folder=self.folder, trace_shape=trace)
        return "torch" if self._ort is None else "onnxruntime"

    def set_cpu_bf16(self, enabled: bool = True) -> None:
        """Run the network's forward passes on CPU under bfloat16 autocast (float32 logits
        out): what ``precision="bf16"`` does (``--precision``; the default on CPUs with native
        bf16). Much faster on CPUs with native bf16 (AVX512-BF16 / AMX); the labels differ
        from float32 in a few boundary voxels (``benchmarks/``). No effect on CUDA (nnU-Net
        uses its own autocast there)."""
        import torch

        net = self.predictor.network
        if self.device.type != "cpu" or not isinstance(net, torch.nn.Module) or bool(enabled) == self.cpu_bf16:
            return
        if enabled:
            if self._ort is not None:  # bfloat16 runs in torch
                self._ort.uninstall()
                self._ort, self.engine = None, "torch"
            plain = net.forward

            def forward_bf16(x: Any) -> Any:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return plain(x).float()

            net.forward = forward_bf16  # the module keeps its state dict keys (nnU-Net reloads weights)
        else:
            del net.forward  # back to the class's forward
        self.cpu_bf16 = bool(enabled)
        self.precision = "bf16" if enabled else "fp32"

    def memory_footprint(self) -> dict[str, Any]:
        """What this network needs beyond the arrays, for ``spineps.resources.SemanticFootprint``:
        tile (nnU-Net's patch, in model orientation), first-stage features, outputs, folds and
        the resolved precision and engine."""
        kwargs = getattr(self.loaded.configuration_manager, "network_arch_init_kwargs", None) or {}
        features = kwargs.get("features_per_stage") or [32]
        return {"orientation": list(self.config.orientation), "spacing_min": list(self.config.spacing_min),
                "spacing_max": list(self.config.spacing_max),
                "tile": [int(v) for v in reversed(tuple(self.loaded.patch_size))],  # nnU-Net's axes are reversed
                "features": int(features[0]), "classes": int(self.loaded.num_outputs),
                "folds": len(self.loaded.folder.folds), "precision": self.precision, "engine": self.engine,
                "device": self.device.type}

    @property
    def modality(self) -> tuple[str, ...]:
        """The scan suffixes (BIDS) this model is for: the config's ``modality``, e.g. ``("T2w",)``."""
        return tuple(self.config.modality)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: Path, *, device: str = "auto", nprocs: Optional[int] = None, n4: bool = True,
                    folds: Optional[tuple[int, ...]] = None, mirroring: Optional[bool] = None,
                    step_size: Optional[float] = None, precision: str = "fp32",
                    engine: str = "torch", allow_unsafe: bool = False, tta: Optional[bool] = None,
                    probabilities: bool = False, n4_helper: bool = False) -> "NnUNetSemanticSegmenter":
        """Validate and load a model folder (``ModelError`` on any problem, before any scan).
        ``allow_unsafe``: unpickle a checkpoint the safe loader refuses (``--allow-unsafe-checkpoints``)."""
        from spineps.models.nnunet_folder import load_nnunet_folder

        loaded = load_nnunet_folder(Path(folder), folds, allow_unsafe=allow_unsafe)
        return cls(loaded, device=device, nprocs=nprocs, n4=n4, mirroring=mirroring, step_size=step_size,
                   precision=precision, engine=engine, tta=tta, probabilities=probabilities, n4_helper=n4_helper)

    # ------------------------------------------------------------------------------------------
    def predict_indices(self, model_image: Volume) -> np.ndarray:
        """Network output indices for an image already in model orientation and spacing
        (after pre-processing). Same shape as ``model_image``."""
        import torch

        arr = np.asarray(model_image.data, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise InputError("image holds non-finite values after pre-processing")
        if float(arr.max()) <= float(arr.min()):
            return np.zeros(arr.shape, np.uint8)
        sp = model_image.spacing
        data = np.ascontiguousarray(arr.transpose(2, 1, 0))[None]  # SimpleITK axis order
        props = {"spacing": [float(sp[2]), float(sp[1]), float(sp[0])]}
        with torch.inference_mode(), quiet_stdout(log):
            out = self.predictor.predict_single_npy_array(data, props, None, None, self.save_probabilities)
        if self.save_probabilities:
            seg, probs = out
            # (classes, x, y, z) on the model grid; float16 halves what is held until written
            self._model_probs = np.ascontiguousarray(np.asarray(probs).transpose(0, 3, 2, 1)).astype(np.float16)
        else:
            seg = out
        seg = np.asarray(seg)
        if seg.shape != data.shape[1:]:
            raise ModelError(f"nnU-Net returned shape {seg.shape} for input {data.shape[1:]}", self.folder)
        return np.ascontiguousarray(seg.transpose(2, 1, 0)).astype(np.uint8, copy=False)

    def to_model_grid(self, image: Volume) -> Volume:
        """Pre-processed image reoriented and resampled onto the model grid."""
        from spineps.geometry.orientation import to_orientation
        from spineps.geometry.resampling import to_spacing

        oriented, _ = to_orientation(image, self.config.orientation)
        target = self.config.target_spacing(oriented.spacing)
        return to_spacing(oriented, target, order=3)

    def segment_model_grid(self, model_image: Volume) -> Volume:
        """Semantic mask (community values, cleaned) on the model grid of ``model_image``."""
        t0 = time.perf_counter()
        idx = self.predict_indices(model_image)
        self.timings["inference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        values = self._lut[np.clip(idx, 0, self._lut.size - 1)]
        cleaned = clean_semantic(values, model_image.spacing, self.cleanup)
        self.timings["cleanup"] = time.perf_counter() - t0
        return model_image.with_data(cleaned.astype(np.uint8))

    def segment(self, image: Volume) -> Volume:
        """Semantic mask (uint8, community values) on exactly ``image``'s grid."""
        from spineps.geometry.resampling import back_to_grid

        self.timings = {}
        self.last_probabilities, self._model_probs = None, None
        t_all = time.perf_counter()
        if image.data.ndim != 3 or min(image.shape) < 1:
            raise InputError(f"need a non-empty 3D image, got shape {image.shape}")
        t0 = time.perf_counter()
        pre = preprocess_image(image, n4=self.n4, settings=self.n4_settings, timings=self.timings,
                               correct=self._n4_in_helper if self.n4_helper else None)
        self.timings["preprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model_img = self.to_model_grid(pre)
        del pre  # the full-resolution pre-processed copy is not needed during inference
        self.timings["resample"] = time.perf_counter() - t0
        log.info("semantic model %s: input %s -> model grid %s", self.name, image.shape, model_img.shape)
        mask_m = self.segment_model_grid(model_img)
        t0 = time.perf_counter()
        # smooth outlines rather than the model grid's blocks (real-scan Dice: benchmarks/)
        back = back_to_grid(mask_m, image, smooth_labels=True)
        self.timings["back_to_grid"] = time.perf_counter() - t0
        if self._model_probs is not None:
            t0 = time.perf_counter()
            self.last_probabilities = self._probabilities_on(mask_m, image)
            self.timings["probabilities"] = time.perf_counter() - t0
        self.timings["total"] = time.perf_counter() - t_all
        return Volume(np.ascontiguousarray(back.data, dtype=np.uint8), image.affine.copy())

    def _n4_in_helper(self, data: np.ndarray, spacing: Any, settings: N4Settings) -> np.ndarray:
        from spineps.semantic.n4_helper import n4_isolated
        from spineps.semantic.preprocess import itk_threads

        return n4_isolated(data, spacing, settings, threads=self.nprocs or itk_threads(),
                           prefetched=self.prefetched_n4)

    def _probabilities_on(self, model_grid: Volume, image: Volume) -> tuple[np.ndarray, list[int]]:
        """The network's class probabilities (softmax, before the clean-up of the mask) on
        ``image``'s grid by linear interpolation: (x, y, z, classes) float16, and the label
        value of each class (0: background)."""
        from spineps.geometry.resampling import back_to_grid

        probs = self._model_probs
        assert probs is not None
        self._model_probs = None
        out = np.empty((*image.shape, probs.shape[0]), np.float16)
        for c in range(probs.shape[0]):
            vol = back_to_grid(model_grid.with_data(probs[c].astype(np.float32)), image, order=1)
            out[..., c] = np.clip(np.asarray(vol.data), 0.0, 1.0)
        labels = [int(self._lut[c]) if c < self._lut.size else -1 for c in range(probs.shape[0])]
        return out, labels

    def provenance(self) -> dict[str, Any]:
        if self._checksum is None:
            self._checksum = folder_checksum(self.folder)
        return {
            "name": self.name,
            "folder": str(self.folder),
            "checksum": f"sha256:{self._checksum}",
            "modeltype": "nnunet",
            "configuration": self.loaded.configuration,
            "trainer_name": self.loaded.trainer_name,
            "folds": list(self.loaded.folder.folds),
            "checkpoints": list(self.loaded.checkpoint_names),
            "step_size": self.step_size,
            "mirroring": self.mirroring,
            **({"mirror_axes": list(self.tta_axes)} if self.mirroring and self.tta_axes else {}),
            "orientation": list(self.config.orientation),
            "spacing": [list(self.config.spacing_min), list(self.config.spacing_max)]
            if not self.config.fixed_spacing else list(self.config.spacing_min),
            "device": str(self.device),
            "threads": self.nprocs,
            "precision": self.precision,
            "engine": self.engine if self._ort is None else dict(self._ort.describe()),
            "channels_last": self.channels_last,
            "n4": self.n4,
        }
