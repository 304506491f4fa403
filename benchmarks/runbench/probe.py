"""Measuring inside a worker: exclusive wall time and peak RSS of named phases (the
pipeline's functions wrapped from outside, like a profiler) and the time inside a network's
forward (forward hooks)."""

from __future__ import annotations

import functools
import importlib
import time
from collections import defaultdict
from typing import Any

#: phases in pipeline order (what the table shows); "bookkeeping" is the participant loop
#: around the scan (output folder, lock, sidecar revocation)
PHASES = ("load", "preprocess_n4", "semantic_resample", "semantic_inference", "semantic_cleanup",
          "semantic_back_to_grid", "instance_resample", "instance_cutouts", "instance_forward", "instance_merge",
          "postprocess", "write", "measure", "figures", "bookkeeping")

def status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0

class PhaseProbe:
    """Exclusive wall time and peak RSS of named phases (innermost active phase wins).

    ``wrap(owner, attr, phase)`` replaces ``owner.attr`` by a timed wrapper. At every phase
    change the time since the last change and the high-water mark of the RSS (``VmHWM``) go
    to the phase that was active, then the high-water mark is reset (Linux ``clear_refs``
    5), so each phase gets its own peak. The process-wide peak is kept separately."""

    def __init__(self, outside: str = "outside") -> None:
        self.outside = outside
        self.stack: list[str] = []
        self.wall: dict[str, float] = defaultdict(float)
        self.peak_kib: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.process_peak_kib = status_kib("VmHWM")
        self.can_reset = self._reset()
        self._t = time.perf_counter()
        self._wrapped: list[tuple[Any, str, Any]] = []

    #: how far above the resident set the high-water mark may read right after a reset (the
    #: two are read one after the other) for the reset to count as done
    RESET_SLACK_KIB = 2048

    @classmethod
    def _reset(cls) -> bool:
        """Reset the high-water mark to the current resident set; False where that is refused
        or silently ignored (some sandboxed kernels accept the write and do nothing: the mark
        then stays above the resident set, and per-phase peaks would all read the process's
        historical peak)."""
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return False
        return status_kib("VmHWM") <= status_kib("VmRSS") + cls.RESET_SLACK_KIB

    def _switch(self) -> None:
        now = time.perf_counter()
        hwm = status_kib("VmHWM")
        cur = self.stack[-1] if self.stack else self.outside
        self.wall[cur] += now - self._t
        self.peak_kib[cur] = max(self.peak_kib[cur], hwm)
        self.process_peak_kib = max(self.process_peak_kib, hwm)
        if self.can_reset:
            self.can_reset = self._reset()
        self._t = time.perf_counter()

    def enter(self, name: str) -> None:
        self._switch()
        self.stack.append(name)
        self.calls[name] += 1

    def leave(self) -> None:
        self._switch()
        self.stack.pop()

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        orig = getattr(owner, attr)
        probe = self

        @functools.wraps(orig)
        def timed(*args: Any, **kwargs: Any) -> Any:
            probe.enter(phase)
            try:
                return orig(*args, **kwargs)
            finally:
                probe.leave()

        setattr(owner, attr, timed)
        self._wrapped.append((owner, attr, orig))

    def unwrap(self) -> None:
        for owner, attr, orig in reversed(self._wrapped):
            setattr(owner, attr, orig)
        self._wrapped.clear()

    def finish(self) -> None:
        self._switch()

class ForwardTimer:
    """Wall time inside a module's forward (outermost calls), through forward hooks;
    on CUDA the device is synchronised at both ends so the time is the kernels' time."""

    def __init__(self, module: Any, cuda: bool = False) -> None:
        import torch

        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._t = 0.0
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def pre(_m: Any, _inp: Any) -> None:
            if self._depth == 0:
                sync()
                self._t = time.perf_counter()
            self._depth += 1

        def post(_m: Any, _inp: Any, _out: Any) -> None:
            self._depth -= 1
            if self._depth == 0:
                sync()
                self.seconds += time.perf_counter() - self._t
                self.calls += 1

        self._handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

#: (module, attribute, phase) of every function the probe wraps: ``attribute`` is a function of
#: the module or ``Class.method``; the innermost active phase gets the time
PHASE_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("spineps.participant", "run_participant", "bookkeeping"),
    ("spineps.participant", "process_scan", "write"),  # its own code: dtype casts for saving, sidecar assembly
    ("spineps.geometry.io", "read_header", "load"),
    ("spineps.geometry.io", "load_volume", "load"),
    ("spineps.resources", "check_scan_resources", "load"),
    ("spineps.participant", "_check_not_constant", "load"),
    ("spineps.semantic.predict", "NnUNetSemanticSegmenter.segment", "semantic_back_to_grid"),  # back_to_grid, checks
    ("spineps.semantic.predict", "preprocess_image", "preprocess_n4"),
    ("spineps.semantic.predict", "NnUNetSemanticSegmenter.to_model_grid", "semantic_resample"),
    ("spineps.semantic.predict", "NnUNetSemanticSegmenter.predict_indices", "semantic_inference"),
    ("spineps.semantic.predict", "clean_semantic", "semantic_cleanup"),
    ("spineps.pipeline", "segment_scan", "postprocess"),  # its own code: checks, result assembly
    ("spineps.instance.segmenter", "UNetInstanceSegmenter.segment", "instance_resample"),  # its own code: timing
    ("spineps.instance.segmenter", "UNetInstanceSegmenter._predict", "instance_resample"),  # reorient, resample, back
    ("spineps.instance.segmenter", "UNetInstanceSegmenter.predict_model_grid", "instance_cutouts"),  # centres, boxes
    ("spineps.instance.segmenter", "UNetInstanceSegmenter.forward_cutouts", "instance_forward"),  # one-hot, forward
    ("spineps.instance.merge", "merge_cutout_predictions", "instance_merge"),
    ("spineps.instance.merge", "fill_unassigned", "instance_merge"),
    ("spineps.pipeline", "postprocess", "postprocess"),  # crop to the spine's box and back
    ("spineps.postprocess.consistency", "make_consistent", "postprocess"),
    ("spineps.postprocess.vertebrae", "vertebra_centroids", "postprocess"),
    ("spineps.postprocess.discs", "assign_discs_and_endplates", "postprocess"),
    ("spineps.labeling.levels", "name_levels", "postprocess"),
    ("spineps.labeling.levels", "apply_naming", "postprocess"),
    ("spineps.pipeline", "centroids_json", "postprocess"),
    ("spineps.geometry.io", "save_volume", "write"),
    ("spineps.fsutil", "write_json_atomic", "write"),
    ("spineps.bids.derivatives", "write_sidecar", "write"),
    ("spineps.measure.scan", "measure_scan", "measure"),
    ("spineps.measure.scan", "write_measurements", "measure"),
    ("spineps.measure.figures", "write_figure", "figures"),
)


def install_probe(probe: PhaseProbe) -> None:
    """Wrap the functions of ``PHASE_TARGETS`` with their phases (an attribute that no longer
    exists is an error: the table follows the code)."""
    for module, attr, phase in PHASE_TARGETS:
        owner: Any = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        probe.wrap(owner, name, phase)
