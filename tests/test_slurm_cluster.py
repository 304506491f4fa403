"""The SLURM scale-out path on a REAL single-node cluster (``tests/slurm_cluster.py``: munged,
slurmctld and slurmd on localhost, started once for this module and always stopped):
``slurm/submit.sh`` submits the participant array and the dependent group job, and the
tests wait for them through ``squeue`` and read their end states with ``scontrol``.

- an array over 4 phantom subjects with tiny real (random-weight) model folders, run from
  this Python environment (``--venv``), ``--max-parallel 2``: every task and the group job
  complete, never more than 2 tasks run at once, and the outputs are identical (minus
  timings and logs) to a local run of the same subjects;
- faults: one task scancelled inside its second scan, another killed by its ``--time``
  limit; the group job (afterok) never runs; nothing half-written is left; resubmitting the
  same command finishes only the missing scans, then the group job runs;
- ``--allow-partial``: the group job runs although a task failed and names the subject;
- memory: a scan that cannot fit in the task's ``--mem`` fails through the app's own check
  (exit 75, the numbers in the log), not through the OOM killer; whether the node enforces
  ``--mem`` at all (task/cgroup) is a test of its own.

Skipped (with the reason) where no cluster can be had: not root and SLURM not installed,
no apt-get; ``SPINEPS_SLURM_TESTS=require`` (CI) turns that into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from tests.bids_factory import BidsFactory, minimal_dataset
from tests.slurm_cluster import MODE_ENV, LocalSlurm, cluster_or_skip_reason, unavailable_reason

pytestmark = [pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.sh"
TASK = REPO / "tests" / "_slurm_task.py"
PER_SCAN = ["_desc-spine_dseg.json", "_desc-spine_dseg.nii.gz", "_desc-spine_dseg.png", "_desc-spine_morphometry.json",
            "_desc-spine_morphometry.tsv", "_desc-vertebrae_centroids.json", "_desc-vertebrae_dseg.json",
            "_desc-vertebrae_dseg.nii.gz"]


# -- the cluster ------------------------------------------------------------------------------
def test_skip_reasons_without_root_or_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the tests skip and why (the decision the fixture takes; no cluster needed)."""
    import tests.slurm_cluster as sc

    monkeypatch.setenv(MODE_ENV, "auto")
    monkeypatch.setattr(sc.os, "geteuid", lambda: 1000)  # what the fixture sees as a normal user
    assert "not root" in cluster_or_skip_reason()
    monkeypatch.setenv(MODE_ENV, "off")
    assert cluster_or_skip_reason() == f"{MODE_ENV}=off"
    nothing = dict(have=lambda tool: False)
    assert unavailable_reason(**nothing, is_root=True, has_apt=True) is None  # installs it
    assert "not root" in unavailable_reason(**nothing, is_root=False, has_apt=True)
    assert "no apt-get" in unavailable_reason(**nothing, is_root=True, has_apt=False)
    assert unavailable_reason(have=lambda tool: True, is_root=True, has_apt=False) is None  # installed already
    assert "not root: the test cluster's daemons run as root" in unavailable_reason(
        have=lambda tool: True, is_root=False, has_apt=True)
    partly = unavailable_reason(have=lambda tool: tool != "slurmd", is_root=True, has_apt=False)
    assert "slurmd missing" in partly and "no apt-get" in partly


@pytest.fixture(scope="module")
def cluster() -> Any:
    reason = cluster_or_skip_reason()
    if reason is not None:
        if os.environ.get(MODE_ENV, "").strip().lower() == "require":
            pytest.fail(f"{MODE_ENV}=require but no SLURM cluster can be had: {reason}")
        pytest.skip(f"no SLURM cluster: {reason}")
    c = LocalSlurm()
    c.start()  # raises (and cleans up) when the daemons do not come up: a failure, not a skip
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.tiny_models import build_tiny_model_folders

    return build_tiny_model_folders(tmp_path_factory.mktemp("models"))


def _env(cluster: LocalSlurm, tmp: Path, **extra: str) -> dict[str, str]:
    """What submit.sh runs with (and the tasks inherit, sbatch --export=ALL)."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("SPINEPS_")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               WORK_ROOT=str(tmp / "scratch"), OMP_NUM_THREADS="1")
    (tmp / "scratch").mkdir(exist_ok=True)
    env.update(extra)
    return env


def _task_command(tmp: Path) -> Path:
    """An executable that runs the app with the test-only segmenters (``--cmd``)."""
    path = tmp / "spineps-test"
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(TASK))} \"$@\"\n")
    path.chmod(0o755)
    return path


def _submit(env: dict[str, str], bids: Path, out: Path, *options: str) -> tuple[str, Optional[str]]:
    """Run slurm/submit.sh; (array job id, group job id or None)."""
    proc = subprocess.run(["bash", str(SUBMIT), str(bids), str(out), *options], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    arrays = re.findall(r"^participant array (\d+):", proc.stdout, re.M)
    group = re.findall(r"^group job (\d+):", proc.stdout, re.M)
    assert len(arrays) == 1, proc.stdout
    return arrays[0], (group[0] if group else None)


def _states(cluster: LocalSlurm, array: str) -> dict[int, str]:
    return {i: r["JobState"] for i, r in cluster.tasks(array).items()}


def _job(cluster: LocalSlurm, job: str) -> dict[str, str]:
    (rec,) = cluster.records(job)
    return rec


def _task_log(out: Path, array: str, task: int) -> str:
    return (out / "logs" / "slurm" / f"spineps_{array}_{task}.out").read_text(errors="replace")


def _diagnose(cluster: LocalSlurm, out: Path) -> str:
    logs = sorted((out / "logs" / "slurm").glob("*.out")) if (out / "logs" / "slurm").is_dir() else []
    return "\n".join([cluster.log_tail(8)] + [f"== {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs])


def _status(out: Path) -> dict[str, str]:
    folder = out / "logs" / "slurm" / "status"
    return {p.name: p.read_text().split()[0] for p in folder.iterdir()} if folder.is_dir() else {}


# -- comparing output trees -----------------------------------------------------------------------
def _normalised(path: Path) -> Any:
    """A file's content minus what differs between two runs of the same inputs: timings, the
    run id / settings file of the process, the report's generation time."""
    name = path.name
    if name.endswith(".nii.gz"):
        import nibabel as nib

        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        return ("nifti", data.shape, str(data.dtype), data.tobytes(), np.round(img.affine, 6).tolist())
    if name.endswith(".json"):
        obj = json.loads(path.read_text())
        if isinstance(obj, dict):
            obj.pop("Timings", None)
            for key in ("SettingsFile", "RunId"):
                obj.get("Parameters", {}).pop(key, None)
        return obj
    if name.endswith(".html"):
        from spineps.group.scan_page import VOLATILE_RE  # a scan page's run id and timings

        text = re.sub(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}(:\d{2})? UTC", "TIME", VOLATILE_RE.sub("", path.read_text()))
        # the report's methods texts name the runs behind them (one per array task on the cluster)
        return re.sub(r'"runs":\[[^\]]*\]', '"runs":[]', text)
    return path.read_bytes()


def _tree(out: Path) -> dict[str, Any]:
    return {p.relative_to(out).as_posix(): _normalised(p) for p in sorted(out.rglob("*"))
            if p.is_file() and not p.relative_to(out).as_posix().startswith("logs/")}


def _assert_nothing_torn(out: Path) -> None:
    """No temporary file, and every output under its final name reads back whole."""
    from spineps.fsutil import TEMP_PREFIX

    assert not [p for p in out.rglob(f"{TEMP_PREFIX}*")], "temporary files left behind"
    for path in out.rglob("sub-*/**/*"):
        if path.is_file():
            _normalised(path)  # raises on a truncated gzip / NIfTI or a cut JSON


def _outputs(out: Path, bids: Path, scan: Path) -> list[Path]:
    from spineps.bids.derivatives import expected_outputs
    from spineps.bids.discovery import Scan

    return [Path(p) for p in expected_outputs(out, Scan.from_path(scan, bids))]


def _complete(out: Path, bids: Path, scan: Path) -> bool:
    return all(p.is_file() for p in _outputs(out, bids, scan))


# -- the documented commands, for real ---------------------------------------------------------
@pytest.mark.slow
def test_array_and_group_job_match_a_local_run(cluster: LocalSlurm, tiny_models: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    sem, inst = tiny_models
    subjects = ("01", "02", "03", "04")
    ds = minimal_dataset(tmp_path / "bids", subjects=subjects)
    out = tmp_path / "cluster" / "spineps"
    local = tmp_path / "local" / "spineps"  # same folder name: the report shows it
    env = _env(cluster, tmp_path, SPINEPS_SEMANTIC_MODEL=str(sem), SPINEPS_INSTANCE_MODEL=str(inst))
    app = ["--skip-bids-validation", "--no-n4"]

    # this Python environment's spineps (--venv), else the checkout's run.py with this Python (--cmd)
    venv_spineps = Path(sys.prefix) / "bin" / "spineps"
    runner = ["--venv", sys.prefix] if venv_spineps.is_file() else ["--cmd", f"{sys.executable} {REPO / 'run.py'}"]
    spineps = [str(venv_spineps)] if venv_spineps.is_file() else [sys.executable, str(REPO / "run.py")]

    t0 = time.monotonic()
    array, group = _submit(env, ds.root, out, *runner, "--max-parallel", "2",
                           "--sbatch-args", "--cpus-per-task 1 --mem 2G --time 10", "--group-sbatch-args", "--mem 1G",
                           "--", *app)
    # the same subjects locally meanwhile: one process, the same options and thread counts
    local_run = subprocess.Popen([*spineps, str(ds.root), str(local), "participant", *app, "--nprocs", "1",
                                  "--omp-nthreads", "1", "-w", str(tmp_path / "local_work")],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    running_max, throttled = 0, False

    def watch() -> None:
        nonlocal running_max, throttled
        rows = [r for r in cluster.queued([array]) if r["id"].startswith(f"{array}_")]
        running_max = max(running_max, sum(r["state"] == "RUNNING" for r in rows))
        throttled |= any(r["state"] == "PENDING" and r["reason"] == "JobArrayTaskLimit" for r in rows)

    try:
        cluster.wait([array, group], timeout=600, poll=watch)
    except TimeoutError:
        pytest.fail(_diagnose(cluster, out))
    array_s = time.monotonic() - t0
    assert local_run.wait(timeout=600) == 0, local_run.stderr.read()
    assert subprocess.run([*spineps, str(ds.root), str(local), "group"], env=env, capture_output=True,
                          timeout=300).returncode == 0

    tasks = cluster.tasks(array)
    states = {i: r["JobState"] for i, r in tasks.items()}
    assert states == {i: "COMPLETED" for i in (1, 2, 3, 4)}, _diagnose(cluster, out)
    assert all(r["ExitCode"] == "0:0" for r in tasks.values())
    assert _job(cluster, group)["JobState"] == "COMPLETED", _diagnose(cluster, out)
    # --max-parallel 2 on a node with room for 4: never more than 2 at once, and the rest waited for it
    assert cluster.cpus >= 4 and running_max <= 2 and throttled
    spans = [(r["StartTime"], r["EndTime"]) for r in tasks.values()]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2
    # every task ran its own subject
    for i, sub in enumerate(subjects, start=1):
        assert f"-> sub-{sub} on " in _task_log(out, array, i)
    assert _status(out) == {f"sub-{s}": "exit=0" for s in subjects}
    assert "all 4 subjects" in (out / "logs" / "slurm" / f"spineps_group_{group}.out").read_text()
    assert list((tmp_path / "scratch").iterdir()) == []  # every task removed its scratch folder

    cluster_tree, local_tree = _tree(out), _tree(local)
    assert sorted(cluster_tree) == sorted(local_tree)
    assert {f"sub-{s}/anat/sub-{s}_acq-sag{k}" for s in subjects for k in PER_SCAN} <= set(cluster_tree)
    assert {"group_T2w.tsv", "group_T2w.json", "group_T2w_report.html"} <= set(cluster_tree)
    different = [name for name in cluster_tree if cluster_tree[name] != local_tree[name]]
    assert different == []
    print(f"\n[slurm] array of 4 (--max-parallel 2) + group job: {array_s:.0f} s, node {cluster.node} "
          f"({'task/cgroup' if cluster.cgroup else 'task/none'})")


# -- faults -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_scancel_and_time_limit_then_the_same_command_finishes_only_the_missing_scans(
        cluster: LocalSlurm, tmp_path: Path) -> None:
    ds = minimal_dataset(tmp_path / "bids", subjects=("01", "02", "03", "04"), sessions=("1", "2"))
    scans = {s: [ds.root / f"sub-{s}/ses-{x}/anat/sub-{s}_ses-{x}_acq-sag_T2w.nii.gz" for x in ("1", "2")]
             for s in ("01", "02", "03", "04")}
    out = tmp_path / "out"
    (tmp_path / "delays").mkdir()
    # first run only: sub-02 10 s per scan (scancelled inside its second scan), sub-03 far past --time 1
    env = _env(cluster, tmp_path, SPINEPS_TEST_DELAYS=json.dumps({"02": 10, "03": 600}),
               SPINEPS_TEST_DELAY_DIR=str(tmp_path / "delays"))
    command = ["--cmd", str(_task_command(tmp_path)), "--sbatch-args", "--cpus-per-task 1 --mem 1G --time 1",
               "--", "--skip-bids-validation"]

    t0 = time.monotonic()
    array, group = _submit(env, ds.root, out, *command)
    deadline = time.monotonic() + 180
    while not _complete(out, ds.root, scans["02"][0]):  # sub-02's first scan is done: it is in the second
        assert time.monotonic() < deadline, _diagnose(cluster, out)
        assert _states(cluster, array).get(2, "RUNNING") in ("RUNNING", "PENDING"), _diagnose(cluster, out)
        time.sleep(0.3)
    time.sleep(1.5)
    cluster.run("scancel", f"{array}_2")
    cancelled_s = time.monotonic() - t0
    try:
        cluster.wait([array, group], timeout=300)
    except TimeoutError:
        pytest.fail(_diagnose(cluster, out))
    first_s = time.monotonic() - t0

    states = _states(cluster, array)
    assert states == {1: "COMPLETED", 2: "CANCELLED", 3: "TIMEOUT", 4: "COMPLETED"}, _diagnose(cluster, out)
    assert "DUE TO TIME LIMIT" in _task_log(out, array, 3) and "CANCELLED AT" in _task_log(out, array, 2)
    for task in (2, 3):  # SIGTERM reached spineps through the task's shell, and it stopped in the scan
        log = _task_log(out, array, task)
        assert "SIGTERM (scancel or time limit): passing it on" in log and "terminated (SIGTERM)" in log, log
    # the group job waited for a full cohort (afterok) and was cancelled, not run on a partial one
    grec = _job(cluster, group)
    assert grec["JobState"] == "CANCELLED" and grec["Reason"] == "DependencyNeverSatisfied", grec
    assert not (out / "group_T2w.tsv").exists()
    status = _status(out)
    assert status["sub-01"] == status["sub-04"] == "exit=0"
    assert status["sub-02"] == status["sub-03"] == "exit=143"

    # nothing half-written: finished scans whole, the interrupted ones incomplete, no temporary file
    _assert_nothing_torn(out)
    done = {s: [_complete(out, ds.root, p) for p in scans[s]] for s in scans}
    assert done == {"01": [True, True], "02": [True, False], "03": [False, False], "04": [True, True]}
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns)
                for scan in scans["01"] + scans["04"] + scans["02"][:1] for p in _outputs(out, ds.root, scan)}
    logs_before = set((out / "logs").glob("participant_*.log"))

    # the very same command again
    t1 = time.monotonic()
    array2, group2 = _submit(env, ds.root, out, *command)
    try:
        cluster.wait([array2, group2], timeout=300)
    except TimeoutError:
        pytest.fail(_diagnose(cluster, out))
    rerun_s = time.monotonic() - t1
    assert _states(cluster, array2) == {i: "COMPLETED" for i in (1, 2, 3, 4)}, _diagnose(cluster, out)
    assert _job(cluster, group2)["JobState"] == "COMPLETED", _diagnose(cluster, out)
    assert all(_complete(out, ds.root, p) for ps in scans.values() for p in ps)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == finished  # untouched
    summaries = sorted(re.search(r"summary: 2 scan\(s\): (\d) processed, (\d) skipped", p.read_text()).groups()
                       for p in set((out / "logs").glob("participant_*.log")) - logs_before)
    assert summaries == [("0", "2"), ("0", "2"), ("1", "1"), ("2", "0")]  # 01, 04 | 02 | 03
    _assert_nothing_torn(out)
    rows = (out / "group_T2w.tsv").read_text().splitlines()[1:]
    assert len(rows) == 8
    assert _status(out) == {f"sub-{s}": "exit=0" for s in scans}
    print(f"\n[slurm] faults: scancel at {cancelled_s:.0f} s, time limit, array + cancelled group done at "
          f"{first_s:.0f} s; resubmission {rerun_s:.0f} s")


@pytest.mark.slow
def test_allow_partial_runs_the_group_job_and_names_the_missing_subjects(cluster: LocalSlurm,
                                                                         tmp_path: Path) -> None:
    ds = minimal_dataset(tmp_path / "bids", subjects=("01", "02"))
    out = tmp_path / "out"
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("01\nsub-99\n02\n")  # 99 has no data: its task fails (exit 18, no match)
    array, group = _submit(_env(cluster, tmp_path), ds.root, out, "--subjects", str(subjects), "--allow-partial",
                           "--cmd", str(_task_command(tmp_path)), "--sbatch-args", "--cpus-per-task 1 --mem 1G",
                           "--", "--skip-bids-validation")
    try:
        cluster.wait([array, group], timeout=300)
    except TimeoutError:
        pytest.fail(_diagnose(cluster, out))
    tasks = cluster.tasks(array)
    assert tasks[2]["JobState"] == "FAILED" and tasks[2]["ExitCode"] == "18:0", tasks[2]
    assert tasks[1]["JobState"] == tasks[3]["JobState"] == "COMPLETED"
    assert _job(cluster, group)["JobState"] == "COMPLETED", _diagnose(cluster, out)
    glog = (out / "logs" / "slurm" / f"spineps_group_{group}.out").read_text()
    assert "1 of 3 subjects" in glog and "sub-99 (exit=18 " in glog and "partial cohort" in glog
    (missing,) = (out / "logs" / "slurm").glob("subjects_*_missing.txt")
    assert missing.read_text() == "sub-99\n"
    table = (out / "group_T2w.tsv").read_text()
    assert "sub-01_acq-sag" in table and "sub-02_acq-sag" in table


# -- memory -------------------------------------------------------------------------------------
def test_whether_the_node_enforces_mem(cluster: LocalSlurm, tmp_path: Path) -> None:
    """With task/cgroup a job that touches more than its --mem is killed by the kernel
    (OUT_OF_MEMORY); without it nothing stops it: say which this node is."""
    if not cluster.cgroup:
        pytest.skip(f"this node does not enforce --mem (proctrack/linuxproc + task/none): {cluster.cgroup_note}")
    hog = f"{shlex.quote(sys.executable)} -c 'b = bytearray(300 << 20); b[::4096] = b\"x\" * len(b[::4096])'"
    job = cluster.run("sbatch", "--parsable", "--mem", "60M", "-o", str(tmp_path / "hog.out"), "--wrap",
                      hog).stdout.strip()
    cluster.wait([job], timeout=120)
    assert _job(cluster, job)["JobState"] == "OUT_OF_MEMORY"


@pytest.mark.slow
def test_too_little_mem_fails_through_the_apps_check_with_75(cluster: LocalSlurm, tmp_path: Path) -> None:
    """--mem 1000M: the small scan fits, the large one (about 1.5 GB by the estimate) fails
    before it is read (exit 75, the numbers in the log) - under task/cgroup the task is not
    OOM-killed, without it nothing would have stopped it."""
    from spineps.geometry.io import read_header
    from spineps.resources import estimate_scan

    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    shape = (256, 320, 40)
    big = ds.add("02", acq="sag", shape=shape, data=np.zeros(shape, np.int16))  # 1 x 1 x 4 mm voxels
    header = read_header(big)
    need_mb = estimate_scan(header.spatial_shape, header.spacing).memory_bytes / 2**20
    assert need_mb > 1400  # 1,472 MB
    out = tmp_path / "out"
    array, group = _submit(_env(cluster, tmp_path), ds.root, out, "--no-group", "--cmd", str(_task_command(tmp_path)),
                           "--sbatch-args", "--cpus-per-task 1 --mem 1000M", "--", "--skip-bids-validation")
    assert group is None
    try:
        cluster.wait([array], timeout=300)
    except TimeoutError:
        pytest.fail(_diagnose(cluster, out))
    tasks = cluster.tasks(array)
    assert tasks[1]["JobState"] == "COMPLETED", _diagnose(cluster, out)
    assert tasks[2]["JobState"] == "FAILED" and tasks[2]["ExitCode"] == "75:0", tasks[2]  # not OUT_OF_MEMORY
    log = _task_log(out, array, 2)
    assert "memory budget 1000 MB" in log
    line = next(ln for ln in log.splitlines() if "not enough memory for this scan" in ln)
    # the job's --mem as the app's limit (minus what the process holds), or, under task/cgroup, the
    # job's own cgroup limit, whichever leaves less
    assert ("SPINEPS_MEMORY_LIMIT_MB=1,000 MB minus" in line or "cgroup memory limit: cgroup v1" in line), line
    assert "sub-02_acq-sag_T2w.nii.gz" in line
    assert _status(out)["sub-02"] == "exit=75"
    if cluster.cgroup:  # the kernel would have enforced the 1000 MB: the app's check came first
        slurmd_log = (cluster.root / "log" / "slurmd.log").read_text()
        assert f"[{tasks[2]['JobId']}.batch] task/cgroup: _memcg_initialize: step: alloc=1000MB mem.limit=1000MB" \
            in slurmd_log
