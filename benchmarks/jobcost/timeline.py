"""Inside one participant process: when each fixed-cost step ran, how much of it was imports,
and the resident memory after it (the floor under the peak).

``install(t0)`` puts an import hook in front of ``sys.meta_path``. It times every outermost
import (so a step's time splits into imports and work) and, when one of the modules of
``STEPS`` has been executed, wraps the named function in place so that its calls are timed
(the callers import these functions at call time, so they find the wrapped ones). Nothing
in the library is instrumented. ``FIRST_VOXEL`` marks the end of the fixed cost: the first
call that reads voxels of a scan (in this process, or in the N4 helper it starts). Standard library only.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import time
from typing import Any, Callable, Optional

#: (module, function, step name): the fixed-cost steps of a participant run, in their order
STEPS: tuple[tuple[str, str, str], ...] = (
    ("spineps.participant", "finish_validation", "validation"),
    ("spineps.bids.discovery", "discover_scans", "indexing"),
    ("spineps.loading", "load_segmenters", "model_loading"),
)
#: the calls that read a scan's voxels: the participant's own reading, and the helper process
#: that reads the first scan for its N4 while the models load (``spineps.semantic.n4_helper``)
FIRST_VOXEL: tuple[tuple[str, str], ...] = (("spineps.geometry.io", "load_volume"),
                                            ("spineps.semantic.n4_helper", "start_prefetch"))


def rss_mib(key: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class Timeline:
    """What the hook and the wrappers record, in seconds since ``t0`` (the parent's clock
    just before it started this process)."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.started = time.time() - t0  # interpreter start-up, up to the first line of the driver
        self.import_s = 0.0  # outermost imports, cumulative
        self.steps: list[dict[str, Any]] = []
        self.first_voxel: Optional[dict[str, float]] = None
        self._depth = 0

    def now(self) -> float:
        return time.time() - self.t0

    def timed_import(self, run: Callable[[], None]) -> None:
        outer = self._depth == 0
        self._depth += 1
        t = time.perf_counter()
        try:
            run()
        finally:
            self._depth -= 1
            if outer:
                self.import_s += time.perf_counter() - t

    def wrap_step(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, imp = self.now(), self.import_s
            try:
                return fn(*args, **kwargs)
            finally:
                self.steps.append({"step": name, "start_s": round(start, 4), "s": round(self.now() - start, 4),
                                   "imports_s": round(self.import_s - imp, 4), "rss_after_mib": round(rss_mib(), 1)})
        return timed

    def wrap_first_voxel(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def marked(*args: Any, **kwargs: Any) -> Any:
            if self.first_voxel is None:
                self.first_voxel = {"at_s": round(self.now(), 4), "rss_mib": round(rss_mib(), 1),
                                    "imports_s": round(self.import_s, 4)}
            return fn(*args, **kwargs)
        return marked


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, timeline: Timeline, after: Optional[Callable[[Any], None]]):
        self.inner, self.timeline, self.after = inner, timeline, after

    def __getattr__(self, name: str) -> Any:  # resources, is_package, get_data ...: the real loader's
        return getattr(self.inner, name)

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.timeline.timed_import(lambda: self.inner.exec_module(module))
        if self.after is not None:
            self.after(module)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, timeline: Timeline):
        self.timeline = timeline
        self.targets: dict[str, list[tuple[str, Callable[[Callable[..., Any]], Callable[..., Any]]]]] = {}
        for mod, fn, name in STEPS:
            self.targets.setdefault(mod, []).append((fn, functools.partial(timeline.wrap_step, name=name)))
        for mod, fn in FIRST_VOXEL:
            self.targets.setdefault(mod, []).append((fn, timeline.wrap_first_voxel))

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, self.timeline, self._after(fullname))
        return spec

    def _after(self, fullname: str) -> Optional[Callable[[Any], None]]:
        wraps = self.targets.get(fullname)
        if not wraps:
            return None

        def patch(module: Any) -> None:
            for attr, wrapper in wraps:
                setattr(module, attr, wrapper(getattr(module, attr)))
        return patch


def install(t0: float) -> Timeline:
    timeline = Timeline(t0)
    sys.meta_path.insert(0, _Finder(timeline))
    return timeline
