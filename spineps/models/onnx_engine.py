"""ONNX Runtime as the CPU engine of a torch network's forward pass (``--engine onnxruntime``).

The network stays a torch module (nnU-Net's predictor keeps calling it inside its own sliding
window and keeps copying each fold's weights into it); only its ``forward`` is replaced by
an ONNX Runtime session of the same network, exported in memory when the model is loaded
(TorchScript exporter, opset 17; traced on a small input with dynamic axes, then the input
fixed to the tile or cutout shape the caller feeds, batch dynamic; no memory pattern). A
call with another spatial shape runs the torch forward.

Why: on CPU, ONNX Runtime runs the float32 semantic networks faster than torch (4.4x the
bundled model, 1.5x at the released model's size with 30 % less memory;
``benchmarks/inference_options.py``, ``benchmarks/semantic_official_layout.py``) and gives
the same labels, on any x86 or Arm CPU; bfloat16 is faster still only on CPUs with native
bfloat16, and changes a few border voxels.

Weights are read once, at export: a session is made for one set of weights. nnU-Net
reloads the weights of every fold (``load_state_dict``) before each prediction, so the
engine keeps one session per fold, keyed by a digest of the weights, and looks it up again
after every ``load_state_dict`` of the network (``bind_weights``).
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ["ENGINES", "onnxruntime_available", "onnxruntime_version", "resolve_engine", "wants_onnxruntime",
           "OrtForward", "install_or_fall_back"]

ENGINES = ("auto", "torch", "onnxruntime")
#: the ONNX operator set the networks are exported with (3D convolutions, instance / group norm)
OPSET = 17


def onnxruntime_version() -> Optional[str]:
    """The installed ONNX Runtime's version, None when it cannot be imported."""
    try:
        import onnxruntime
    except Exception:  # a broken install counts as absent (logged by the caller)
        return None
    return str(onnxruntime.__version__)


def onnxruntime_available() -> bool:
    return onnxruntime_version() is not None


def resolve_engine(engine: str, device: str, precision: str) -> str:
    """What runs the forward passes: ``"torch"`` or ``"onnxruntime"``.

    ``precision`` is the resolved one (``fp32``/``bf16``/``fp16``). ``auto`` takes ONNX
    Runtime for float32 on CPU when it is installed, torch otherwise. ``onnxruntime``
    asked for explicitly must be possible: ``ValueError`` naming why not."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    on_cpu = not str(device).startswith("cuda")
    if engine == "torch":
        return "torch"
    if engine == "onnxruntime":
        if not on_cpu:
            raise ValueError("--engine onnxruntime runs on CPU only; use --engine torch (or auto) with a CUDA device")
        if precision != "fp32":
            raise ValueError(f"--engine onnxruntime runs float32 networks; --precision {precision} needs "
                             "--engine torch")
        if not onnxruntime_available():
            raise ValueError("--engine onnxruntime needs the onnxruntime package (pip install onnxruntime)")
        return "onnxruntime"
    return "onnxruntime" if on_cpu and precision == "fp32" and onnxruntime_available() else "torch"


def wants_onnxruntime(engine: str, device: str, precision: str, folder: Any) -> bool:
    """Whether a model loaded from ``folder`` runs its forward passes in ONNX Runtime
    (:func:`resolve_engine`); a choice that cannot hold is a ``ModelError`` naming ``folder``."""
    from spineps.errors import ModelError

    try:
        return resolve_engine(engine, device, precision) == "onnxruntime"
    except ValueError as exc:
        raise ModelError(str(exc), folder) from None


def _export(network: Any, example: Any, dynamic_spatial: bool = False) -> bytes:
    """The network as an ONNX model (bytes), batch axis dynamic (and the spatial axes with
    ``dynamic_spatial``: then ``example`` may be much smaller than the tiles, which keeps the
    export's own forward pass cheap for large networks)."""
    import torch

    axes = {0: "batch"}
    if dynamic_spatial:
        axes.update({i: f"d{i}" for i in range(2, example.dim())})

    buf = io.BytesIO()
    # export traces the network: outside any inference_mode the caller (nnU-Net's predictor) runs in
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the exporter warns that instance norm in eval mode still uses the instance statistics
        # (which is what the networks do) and about TorchScript's deprecation
        warnings.simplefilter("ignore")
        export: Any = torch.onnx.export  # its stub types the target as a path; a file object works as documented
        export(network, (example,), buf, input_names=["x"], output_names=["y"], opset_version=OPSET,
               dynamic_axes={"x": axes, "y": axes}, dynamo=False)
    return buf.getvalue()


def _fix_spatial_shape(model: bytes, input_shape: Sequence[int]) -> bytes:
    """The exported model with its input's channel and spatial sizes fixed to ``input_shape``
    (the batch stays dynamic), so ONNX Runtime plans its memory and kernels for the tile
    shape as if the export had traced it; the intermediate shapes are inferred again."""
    import onnx

    proto = onnx.load_from_string(model)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(list(dims)[1:], input_shape):
        dim.Clear()
        dim.dim_value = int(size)
    del proto.graph.value_info[:]  # symbolic shapes of the traced sizes: ONNX Runtime infers them anew
    for out in proto.graph.output:
        for dim in list(out.type.tensor_type.shape.dim)[1:]:
            dim.Clear()
    return proto.SerializeToString()


class OrtForward:
    """The forward pass of ``network`` in ONNX Runtime for inputs ``(batch, *input_shape)``.

    ``install()`` puts it in place of ``network.forward``; ``uninstall()`` restores it.
    ``threads`` is ONNX Runtime's intra-op thread count (the process's CPU share)."""

    def __init__(self, network: Any, input_shape: Sequence[int], threads: int, *, name: str = "network",
                 trace_shape: Optional[Sequence[int]] = None):
        import onnxruntime as ort
        import torch

        self.network = network
        self.input_shape = tuple(int(v) for v in input_shape)  # channels + spatial
        # what the export traces with: a smaller input (channels + spatial) exports with dynamic
        # spatial axes; the session still serves the tile shape only (the shape checked above)
        self.trace_shape = tuple(int(v) for v in trace_shape) if trace_shape is not None else self.input_shape
        self.threads = max(1, int(threads))
        self.name = name
        self._ort = ort
        self._torch = torch
        self._sessions: dict[Any, Any] = {}
        self._key: Any = None
        self._stale = True  # the weights may differ from the bound session's (set by load_state_dict)
        self._hook = network.register_load_state_dict_post_hook(self._weights_loaded)
        self._plain: Optional[Callable[[Any], Any]] = None
        self.export_s = 0.0
        self.calls = 0
        self.fallbacks = 0
        self.bind_weights()

    # -- sessions -----------------------------------------------------------------------
    def _weights_loaded(self, module: Any, incompatible_keys: Any) -> None:
        """``load_state_dict`` post-hook: the next forward looks up the session again."""
        self._stale = True

    def _digest(self) -> str:
        """The weights' content (a fold's weights reloaded give the same digest)."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for t in self.network.state_dict().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != self._torch.bfloat16
                     else t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def bind_weights(self) -> None:
        """Make (or reuse) the session for the weights now in the network. Cheap when they did
        not change since the last call; a reload of known weights finds its session again."""
        if not self._stale:
            return
        key = self._digest()
        self._stale = False
        if key == self._key:
            return
        session = self._sessions.get(key)
        if session is None:
            t0 = time.perf_counter()
            was_training = self.network.training
            plain = self._plain
            if plain is not None:  # export the torch forward, not this engine
                self.network.forward = plain
            try:
                self.network.eval()
                example = self._torch.zeros((1, *self.trace_shape), dtype=self._torch.float32)
                model = _export(self.network, example, dynamic_spatial=self.trace_shape != self.input_shape)
            finally:
                self.network.train(was_training)
                if plain is not None:
                    self.network.forward = self
            if self.trace_shape != self.input_shape:
                model = _fix_spatial_shape(model, self.input_shape)
            opts = self._ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3  # errors only: no per-session warnings on stderr
            # no memory pattern: with it ONNX Runtime keeps one block for the whole pattern after
            # the first run (released-size network: peak 4.9 GB instead of 2.8 GB, same speed)
            opts.enable_mem_pattern = False
            session = self._ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            del model
            self._sessions[key] = session
            self.export_s += time.perf_counter() - t0
            log.debug("%s: ONNX Runtime session made in %.2f s (input %s, %d threads)", self.name,
                      time.perf_counter() - t0, self.input_shape, self.threads)
        self._key = key
        self._session = session

    # -- forward ------------------------------------------------------------------------
    def __call__(self, x: Any) -> Any:
        torch = self._torch
        if tuple(x.shape[1:]) != self.input_shape or x.device.type != "cpu":
            self.fallbacks += 1
            if self._plain is None:
                raise RuntimeError(f"{self.name}: the ONNX Runtime forward is not installed")
            return self._plain(x)
        self.bind_weights()
        arr = x.detach().to(torch.float32).contiguous().numpy()
        out = self._session.run(None, {"x": arr})[0]
        self.calls += 1
        return torch.from_numpy(out)

    def install(self) -> "OrtForward":
        if self._plain is None:
            self._plain = self.network.forward
            self.network.forward = self
        return self

    def uninstall(self) -> None:
        """The network's own forward back; the engine is done with (its sessions are dropped)."""
        if self._plain is not None:
            del self.network.forward  # back to the class's forward
            self._plain = None
        self._hook.remove()
        self._sessions.clear()
        self._session = None

    def describe(self) -> Mapping[str, Any]:
        return {"engine": "onnxruntime", "onnxruntime": self._ort.__version__, "opset": OPSET,
                "threads": self.threads, "input_shape": list(self.input_shape)}


def install_or_fall_back(network: Any, input_shape: Sequence[int], threads: int, *, name: str, asked: str,
                         folder: Any, trace_shape: Optional[Sequence[int]] = None) -> Optional[OrtForward]:
    """``OrtForward`` installed on ``network``, or None where it cannot be: with ``asked`` =
    ``"onnxruntime"`` that is a ``ModelError`` naming ``folder`` (before any scan); with
    ``"auto"`` a warning, and the network stays on torch (auto never makes a run fail)."""
    from spineps.errors import ModelError

    try:
        return OrtForward(network, input_shape, threads, name=name, trace_shape=trace_shape).install()
    except Exception as exc:  # an export or session ONNX Runtime cannot take: say which
        why = f"{type(exc).__name__}: {str(exc)[:300]}"
        if asked == "onnxruntime":
            raise ModelError(f"ONNX Runtime could not take the network of {name} ({why}); use --engine torch",
                             folder) from exc
        log.warning("%s: ONNX Runtime could not take the network (%s); it runs in torch", name, why)
        return None
