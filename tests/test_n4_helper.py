"""N4 in a helper process (``spineps.semantic.n4_helper``): the same voxels as in this
process, a prefetched result used only for exactly the voxels it corrected, failures as
``InputError``, nothing left behind; and a participant run that never imports ITK itself."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spineps.errors import InputError
from spineps.geometry.io import load_volume
from spineps.semantic.n4_helper import digest, n4_isolated, start_prefetch
from spineps.semantic.preprocess import N4Settings, n4_correct, normalize_range, set_itk_threads

REPO = Path(__file__).resolve().parents[1]
FAST = N4Settings(iterations=(10, 10))


def _biased(shape: tuple[int, int, int] = (12, 40, 36), seed: int = 3) -> np.ndarray:
    """A blob of tissue under a smooth multiplicative field (what N4 takes out)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    tissue = (xx ** 2 + yy ** 2 < 0.8).astype(np.float32) * 400 + 200
    field = np.exp(0.4 * yy + 0.2 * zz).astype(np.float32)
    return (tissue * field + rng.normal(0, 5, shape)).clip(0).astype(np.float32)


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    path = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(nib.Nifti1Image(_biased(), np.diag([3.0, 1.0, 1.0, 1.0])), str(path))
    return path


@pytest.fixture(autouse=True)
def _one_itk_thread():
    set_itk_threads(1)  # the same thread count here and in the helper: bit-identical answers
    yield


def _helpers_left() -> list[Path]:
    import tempfile

    return sorted(Path(tempfile.gettempdir()).glob(f"spineps-n4-{os.getpid()}-*"))  # this process's helpers


def test_isolated_n4_gives_the_voxels_of_n4_in_this_process() -> None:
    data = normalize_range(_biased())
    before = _helpers_left()
    out = n4_isolated(data, (3.0, 1.0, 1.0), FAST, threads=1)
    ref = n4_correct(data, (3.0, 1.0, 1.0), FAST)
    assert out.dtype == np.float32 and out.shape == data.shape
    assert np.array_equal(out, ref)
    assert not np.array_equal(out, data)  # it did correct something
    assert _helpers_left() == before


def test_prefetched_result_is_used_for_exactly_its_scan(scan: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = load_volume(scan)
    data = normalize_range(image.data)
    job = start_prefetch(scan, FAST, 1)
    assert job is not None
    jobs = [job]
    with caplog.at_level(logging.DEBUG, logger="spineps.semantic.n4_helper"):
        out = n4_isolated(data, image.spacing, FAST, threads=1, prefetched=jobs)
    assert "prefetched result is used" in caplog.text
    assert jobs == [] and not job.folder.exists() and not job.running
    assert np.array_equal(out, n4_correct(data, image.spacing, FAST))


@pytest.mark.parametrize("change", ["voxels", "spacing", "settings"])
def test_prefetched_result_for_other_input_is_stopped_and_n4_runs_afresh(scan: Path, change: str,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    image = load_volume(scan)
    data, spacing, settings = normalize_range(image.data), tuple(image.spacing), FAST
    if change == "voxels":
        data = data.copy()
        data[0, 0, 0] += 1.0
    elif change == "spacing":
        spacing = (3.0, 1.0, 1.1)
    else:
        settings = N4Settings(iterations=(5, 5))
    job = start_prefetch(scan, FAST, 1)
    assert job is not None
    with caplog.at_level(logging.DEBUG, logger="spineps.semantic.n4_helper"):
        out = n4_isolated(data, spacing, settings, threads=1, prefetched=[job])
    assert "prefetched result was for other voxels" in caplog.text
    assert not job.folder.exists() and not job.running
    assert np.array_equal(out, n4_correct(data, spacing, settings))


def test_digest_tells_voxels_shape_and_spacing_apart() -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert digest(a, (1, 1, 1)) == digest(a.astype(np.float64), (1.0, 1.0, 1.0))
    assert digest(a, (1, 1, 1)) != digest(a.reshape(3, 2, 4), (1, 1, 1))
    assert digest(a, (1, 1, 1)) != digest(a, (1, 1, 2))
    b = a.copy()
    b[1, 2, 3] = -1
    assert digest(a, (1, 1, 1)) != digest(b, (1, 1, 1))


def test_a_failing_helper_is_an_input_error_with_its_reason() -> None:
    before = _helpers_left()
    why = "(?s)N4 bias-field correction failed in its helper process.*RuntimeError.*[Zz]ero-valued spacing"
    with pytest.raises(InputError, match=why):
        n4_isolated(normalize_range(_biased()), (0.0, 1.0, 1.0), FAST, threads=1)
    assert _helpers_left() == before


def test_a_prefetch_of_an_unreadable_scan_is_dropped_and_n4_runs_afresh(tmp_path: Path) -> None:
    bad = tmp_path / "sub-01_T2w.nii.gz"
    bad.write_bytes(b"not a nifti")
    job = start_prefetch(bad, FAST, 1)
    assert job is not None
    data = normalize_range(_biased())
    out = n4_isolated(data, (3.0, 1.0, 1.0), FAST, threads=1, prefetched=[job])
    assert np.array_equal(out, n4_correct(data, (3.0, 1.0, 1.0), FAST))
    assert not job.folder.exists()


def test_cancel_stops_a_running_helper_and_removes_its_folder(scan: Path) -> None:
    job = start_prefetch(scan, N4Settings(iterations=(200, 200, 200), convergence=0.0), 1)
    assert job is not None and job.proc is not None
    pid = job.proc.pid
    job.cancel()
    assert not job.running and not job.folder.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    job.cancel()  # twice is harmless


_RUN = """
import json, sys
from spineps.cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "sitk": "SimpleITK" in sys.modules and
                  type(sys.modules["SimpleITK"]).__name__ == "module"}))
"""


@pytest.mark.slow
def test_participant_run_keeps_itk_out_and_uses_the_prefetched_n4(tmp_path: Path) -> None:
    """Two scans, N4 on, tiny real model folders: the first scan's N4 is the helper's started
    before the models loaded, the second's runs in a helper too, and the participant process
    never imports SimpleITK (it would stay resident through the inference)."""
    pytest.importorskip("torch")
    from tests.bids_factory import BidsFactory
    from tests.tiny_models import build_tiny_model_folders

    sem, inst = build_tiny_model_folders(tmp_path)
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    ds.add("02", acq="sag", seed=1)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("nnUNet_compile", None)
    proc = subprocess.run([sys.executable, "-c", _RUN, str(ds.root), str(out), "participant", "--semantic-model",
                           str(sem), "--instance-model", str(inst), "--device", "cpu", "--nprocs", "1",
                           "--skip-bids-validation", "-vv"], env=env, capture_output=True, text=True, timeout=600)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["code"] == 0, proc.stderr[-3000:]
    assert res["sitk"] is False, "the participant process imported SimpleITK itself"
    log = proc.stderr
    assert "sub-01_acq-sag_T2w.nii.gz started in a helper process" in log
    assert log.count("the helper's prefetched result is used") == 1
    assert log.count("N4 helper (") == 2  # both scans' N4 ran in a helper
    side = json.loads((out / "sub-01/anat/sub-01_acq-sag_desc-vertebrae_dseg.json").read_text())
    assert side["Parameters"]["n4"] is True


def test_helper_folders_of_dead_processes_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A participant killed outright (SIGKILL at a job's time limit) cannot remove its
    helper's folder; the next helper started on the machine removes it."""
    import tempfile

    from spineps.semantic import n4_helper

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    orphan = tmp_path / f"spineps-n4-{int(dead.stdout)}-abc"
    (orphan / "input.npy").parent.mkdir()
    (orphan / "input.npy").write_bytes(b"x" * 100)
    mine = tmp_path / f"spineps-n4-{os.getpid()}-def"
    mine.mkdir()
    other = tmp_path / "spineps-n4-notapid"
    other.mkdir()
    out = n4_isolated(normalize_range(_biased()), (3.0, 1.0, 1.0), FAST, threads=1)
    assert out.shape == (12, 40, 36)
    assert not orphan.exists() and mine.exists() and other.exists()
    assert n4_helper._remove_orphans() == []


_KILLED_PARENT = """
import sys, time
from pathlib import Path
from spineps.semantic.n4_helper import start_prefetch
from spineps.semantic.preprocess import N4Settings
job = start_prefetch(Path(sys.argv[1]), N4Settings(iterations=(400, 400, 400), convergence=0.0), 1)
print(job.proc.pid, flush=True)
time.sleep(60)
"""


def test_a_helper_dies_with_its_parent(scan: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, str(scan)], stdout=subprocess.PIPE, text=True,
                              env=env)
    assert parent.stdout is not None
    helper = int(parent.stdout.readline())
    os.kill(helper, 0)  # running
    parent.kill()
    parent.wait()
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(helper, 0)
        except ProcessLookupError:
            break
        try:
            with open(f"/proc/{helper}/stat") as fh:  # a zombie waiting for init to reap it counts as gone
                if fh.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the N4 helper kept running after its parent was killed")
