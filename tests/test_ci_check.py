"""``.ci/run``'s check that torch is the CPU build: on a machine whose pip brought the CUDA
build it says what to do (PyTorch's CPU wheel index), not only that it failed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / ".ci" / "check_torch_cpu.py"


def _run(tmp_path: Path, version: str, nvidia: bool = False) -> subprocess.CompletedProcess:
    fake = tmp_path / "site"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    if nvidia:
        dist = fake / "nvidia_cublas_cu12-12.8.4.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-cublas-cu12\nVersion: 12.8.4.1\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    return subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=60)


def test_cpu_build_passes(tmp_path: Path) -> None:
    r = _run(tmp_path, "2.13.0+cpu")
    assert r.returncode == 0, r.stderr
    assert "torch 2.13.0+cpu" in r.stdout


def test_cuda_build_fails_with_what_to_do(tmp_path: Path) -> None:
    r = _run(tmp_path, "2.13.0", nvidia=True)
    assert r.returncode == 1
    assert "is not the +cpu build" in r.stderr and "nvidia-cublas-cu12" in r.stderr
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in r.stderr
    assert "-c constraints.txt" in r.stderr


def test_ci_run_uses_the_check_and_keeps_its_test_command() -> None:
    text = (REPO / ".ci" / "run").read_text()
    assert ".venv/bin/python .ci/check_torch_cpu.py" in text
    assert text.rstrip().endswith('.venv/bin/python -m pytest "$@"   # no arguments in CI: the whole suite')
