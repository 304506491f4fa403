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
"""

from __future__ import annotations

import logging
import os
import sys
import types
from typing import Any

from spineps.logging_setup import quiet_stdout

__all__ = ["nnunet_predictor_class", "PREDICTOR_MODULE"]

log = logging.getLogger(__name__)

PREDICTOR_MODULE = "nnunetv2.inference.predict_from_raw_data"
_DYNAMO = "torch._dynamo"


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
