"""Run ``spineps.cli.main.main`` with the TEST-ONLY segmenters of ``tests/segmenters.py``
plugged in (for subprocess tests: kill, parallel runs).

    python tests/_run_with_test_models.py BIDS OUT participant [options]

``SPINEPS_TEST_DELAY`` (seconds) slows the semantic phase of each scan down;
``SPINEPS_TEST_SIDECAR_DELAY`` (seconds) sleeps before each sidecar is written, i.e. after
a scan's masks are on disk, so a test can kill the run at the most awkward moment.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spineps.bids import derivatives
from spineps.cli.main import main
from spineps import loading
from tests.segmenters import make_test_segmenters


def _load(settings):
    return make_test_segmenters(settings, delay_s=float(os.environ.get("SPINEPS_TEST_DELAY", "0")))


def _install() -> None:
    loading.load_segmenters = _load
    delay = float(os.environ.get("SPINEPS_TEST_SIDECAR_DELAY", "0"))
    if delay > 0:
        write = derivatives.write_sidecar

        def slow_write(path, data):
            time.sleep(delay)
            return write(path, data)

        derivatives.write_sidecar = slow_write


if __name__ == "__main__":
    _install()
    sys.exit(main())
