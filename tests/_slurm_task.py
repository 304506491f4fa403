"""The participant command of the real-cluster fault tests (``tests/test_slurm_cluster.py``):
the app with the test-only segmenters (``tests/_run_with_test_models.py``), plus a delay per
subject so that a test can scancel a task inside a scan or let it run into its time limit.

``SPINEPS_TEST_DELAYS='{"02": 10, "03": 600}'`` slows every scan of those subjects down by
that many seconds (``SPINEPS_TEST_DELAY``), on their FIRST run only (a marker per subject in
``SPINEPS_TEST_DELAY_DIR``): resubmitting the very same command then runs at full speed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import _run_with_test_models as runner  # noqa: E402


def _first_run_delay(argv: list[str]) -> None:
    if "--participant-label" not in argv:
        return
    label = argv[argv.index("--participant-label") + 1]
    delays = json.loads(os.environ.get("SPINEPS_TEST_DELAYS") or "{}")
    marker_dir = os.environ.get("SPINEPS_TEST_DELAY_DIR")
    if label not in delays or not marker_dir:
        return
    try:
        (Path(marker_dir) / f"sub-{label}").open("x").close()
    except FileExistsError:  # delayed once already
        return
    os.environ["SPINEPS_TEST_DELAY"] = str(delays[label])


if __name__ == "__main__":
    _first_run_delay(sys.argv[1:])
    runner._install()
    sys.exit(runner.main())
