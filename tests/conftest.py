"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the real scans with partial labels (never copied into the repository)
REAL_DATA = Path(os.environ.get("SPINEPS_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real scans not available: {REAL_DATA} does not exist (it lies beside the checkout in CI)")
    return REAL_DATA
