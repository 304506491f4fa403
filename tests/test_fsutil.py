"""Atomic writes: a failed write leaves nothing under the final name; stale temps of dead
processes are cleaned, those of live processes are not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spineps.fsutil import TEMP_PREFIX, atomic_path, remove_stale_temps, write_json_atomic


def test_atomic_write_success(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_json_atomic(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in target.parent.iterdir()] == ["b.json"]


def test_failed_write_leaves_old_content_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed midway")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_temp_name_keeps_extension_and_is_hidden(tmp_path):
    with atomic_path(tmp_path / "x_dseg.nii.gz") as tmp:
        assert tmp.name.startswith(TEMP_PREFIX) and tmp.name.endswith("x_dseg.nii.gz")
        tmp.write_bytes(b"1")
    assert (tmp_path / "x_dseg.nii.gz").read_bytes() == b"1"


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "never.txt"):
            pass
    assert not (tmp_path / "never.txt").exists()


def test_remove_stale_temps_only_dead_processes(tmp_path):
    # a temp file of a process that has exited, and one of this (live) process
    code = ("import sys; from pathlib import Path; from spineps.fsutil import atomic_path\n"
            "cm = atomic_path(Path(sys.argv[1]) / 'x.txt'); tmp = cm.__enter__(); tmp.write_text('partial')\n"
            "import os; os._exit(0)  # dies without cleaning up, like SIGKILL\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    with atomic_path(tmp_path / "live.txt") as live_tmp:
        live_tmp.write_text("in progress")
        dead = [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX) and p != live_tmp]
        assert len(dead) == 1
        removed = remove_stale_temps(tmp_path)
        assert removed == dead
        assert live_tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.txt"]
    assert os.path.exists(tmp_path / "live.txt")
