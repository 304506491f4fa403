"""``scripts/demo`` (one command for the demo) and ``.ci/run`` (one for the tests) are what
the README opens with; the demo script runs exactly the README's step-by-step lines (checked
through its dry run, no install), and the README's test lines are what ``.ci/run`` runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "demo"
README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(text: str) -> list[list[str]]:
    """The README's ```bash blocks as command lines (continuations joined, comments dropped)."""
    out = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", body)
        out.append([" ".join(ln.split("#")[0].split()) for ln in joined.splitlines() if ln.split("#")[0].strip()])
    return out


def _block_after(heading: str) -> list[str]:
    return _blocks(README[README.index(heading):])[0]


def test_script_is_valid_bash_and_executable() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    assert os.access(SCRIPT, os.X_OK)
    res = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in SCRIPT.read_text()


def test_readme_opens_with_the_two_commands() -> None:
    first = _blocks(README)[0]
    assert first == ["scripts/demo", "bash .ci/run"]
    assert README.index("scripts/demo") < README.index("## Quick start")


def test_demo_script_runs_the_readme_steps(tmp_path: Path) -> None:
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SPINEPS_DEMO_DRY_RUN": "1", "PYTHON": "python3"})
    assert res.returncode == 0, res.stderr
    steps = [" ".join(ln.split()) for ln in res.stdout.splitlines() if ln.strip()]
    demo = _block_after("**Install and try it on a demo dataset**")
    evaluate = _block_after("Compare with the references:")
    assert steps == demo + evaluate
    # another folder goes everywhere the default went
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "d")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SPINEPS_DEMO_DRY_RUN": "1", "PYTHON": "python3"})
    assert "/tmp/spineps-demo" not in res.stdout and res.stdout.count(str(tmp_path / "d")) == 8
    # the report it prints at the end is the group level's
    assert "group_T2w_report.html" in SCRIPT.read_text()


def test_readme_test_lines_are_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    lines = _block_after("**Install and run the tests**")
    assert lines[-1] == ".venv/bin/python -m pytest"
    ci_cmds = {" ".join(ln.split("#")[0].split()).replace('"$PYTHON"', "python3") for ln in ci.splitlines()}
    for line in lines:
        wanted = line if line != ".venv/bin/python -m pytest" else '.venv/bin/python -m pytest "$@"'
        assert wanted in ci_cmds, f"README line not run by .ci/run: {line}"
    assert ".venv/bin/ruff check ." in ci_cmds and ".venv/bin/mypy" in ci_cmds


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed")
def test_shellcheck_clean() -> None:
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
