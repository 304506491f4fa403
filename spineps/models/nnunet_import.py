"""nnU-Net's own ``nnUNetPredictor``, imported without ``torch._dynamo``.

``nnunetv2.inference.predict_from_raw_data`` imports ``OptimizedModule`` from
``torch._dynamo`` at module level, only for ``isinstance`` checks (is the network a
``torch.compile`` wrapper?). Importing ``torch._dynamo`` costs a participant process about
70 MiB of resident memory and a large share of its start-up (it pulls in sympy, the inductor
and ``torch.distributed``; ``benchmarks/job_cost.py``). This process never compiles the
network, so the module is imported with a stand-in ``torch._dynamo`` holding a class that
nothing is an instance of (the answer those checks would give), removed again right after:
a later ``import torch._dynamo`` (``torch.compile``) gets the real one. The predictor is
nnU-Net's class itself, unchanged.

The full import is used instead when nnU-Net would compile (``nnUNet_compile`` set true: the
checks must then see real ``OptimizedModule`` instances), when ``torch._dynamo`` is already
imported (nothing to save), or when the module is already imported.

The same module chain imports ``pandas`` at module level (nnU-Net's resampling and
batchgenerators use ``pd`` in a few functions a participant process never calls): about
30 MiB of resident memory and half a second; and ``SimpleITK`` (nnU-Net's image readers,
not used here: ~90 MiB and 0.3 s), which N4 imports when it runs in this process (a
participant run's N4 runs in a helper process, ``spineps.semantic.n4_helper``: never here).
(``blosc2``, for nnU-Net's compressed training data, would be the next, but acvl_utils
evaluates ``blosc2.ndarray.NDArray`` in an annotation at import time.) They are imported *lazily* (``make_lazy``):
``sys.modules`` holds a module object that imports the real one on its first attribute
access, so every function that uses them works unchanged and a process that never touches
them never pays for them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from typing import Any

from spineps.logging_setup import quiet_stdout

__all__ = ["nnunet_predictor_class", "PREDICTOR_MODULE", "LAZY_MODULES", "make_lazy"]

log = logging.getLogger(__name__)

PREDICTOR_MODULE = "nnunetv2.inference.predict_from_raw_data"
_DYNAMO = "torch._dynamo"


#: modules the predictor's import chain imports at module level but a participant never uses
LAZY_MODULES = ("pandas", "SimpleITK")


class _LazyModule(types.ModuleType):
    """A module whose code runs on first use: it holds only the module's spec until an
    attribute it does not have is asked for; then the real module is imported (and replaces
    it in ``sys.modules``), its namespace copied in, and every further lookup answered from
    it. No ``__path__`` before that, so importing a submodule loads the package first.
    (The standard library's ``importlib.util.LazyLoader`` is not enough on Python 3.11: the
    ``import`` statement itself reads ``__spec__``, which loads the module.)"""

    def __init__(self, spec: Any) -> None:
        super().__init__(spec.name)
        self.__spec__ = spec
        self.__loader__ = spec.loader

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def make_lazy(names: tuple[str, ...] = LAZY_MODULES) -> list[str]:
    """From now on an ``import`` of one of ``names`` (not imported yet) binds a module that
    loads itself on first use (``_LazyModule``). Returns the names made lazy."""
    made = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        sys.modules[name] = _LazyModule(spec)
        made.append(name)
    return made


def _compile_requested() -> bool:
    return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")


def _stand_in() -> types.ModuleType:
    module = types.ModuleType(_DYNAMO, "spineps stand-in while nnU-Net's predictor module is imported")

    class OptimizedModule:  # never instantiated: no network of this process is compiled
        """Stand-in for ``torch._dynamo.OptimizedModule``."""

    OptimizedModule.__module__ = __name__
    module.OptimizedModule = OptimizedModule  # type: ignore[attr-defined]
    return module


def nnunet_predictor_class() -> Any:
    """``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor`` (see the module docstring)."""
    cheap = PREDICTOR_MODULE not in sys.modules and _DYNAMO not in sys.modules and not _compile_requested()
    if not cheap:
        with quiet_stdout(log):
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        return nnUNetPredictor
    import torch

    stand_in = _stand_in()
    sys.modules[_DYNAMO] = stand_in
    make_lazy()
    try:
        with quiet_stdout(log):
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    finally:
        if sys.modules.get(_DYNAMO) is stand_in:
            del sys.modules[_DYNAMO]
        if torch.__dict__.get("_dynamo") is stand_in:
            del torch.__dict__["_dynamo"]
    log.debug("nnU-Net's predictor imported without torch._dynamo (no network is compiled here)")
    return nnUNetPredictor
