"""The SLURM scale-out scripts under a stub scheduler: ``slurm/submit.sh`` with a fake
``sbatch`` on PATH that records its arguments and environment (the array over the subject
list, the group job's dependency on the array ids, lists split over several arrays), and
``slurm/spineps_array.sbatch`` run the way SLURM runs a task (``SLURM_ARRAY_TASK_ID`` & co.
set), with the test-only segmenters: the right subject per task index."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bids_factory import minimal_dataset

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.sh"
ARRAY = REPO / "slurm" / "spineps_array.sbatch"
GROUP = REPO / "slurm" / "spineps_group.sbatch"
RUNNER = REPO / "tests" / "_run_with_test_models.py"

FAKE_SBATCH = r'''#!/usr/bin/env bash
# records one JSON line per call: argv and the variables the tasks read; prints a job id
set -euo pipefail
n=$(( $(cat "$FAKE_SLURM_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$FAKE_SLURM_DIR/count"
python3 - "$@" >> "$FAKE_SLURM_DIR/calls.jsonl" <<'PY'
import json, os, sys
keys = ("SUBJECTS_FILE", "BIDS_DIR", "OUT_DIR", "SPINEPS_SIF", "SPINEPS_CMD", "SPINEPS_ARGS", "SPINEPS_ARGS_FILE",
        "SPINEPS_ALLOW_PARTIAL", "ARRAY_OFFSET")
print(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}))
PY
echo "$(( 1000 + n - 1 ));cluster1"
'''

FAKE_APPTAINER = r'''#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE_SLURM_DIR/apptainer_args"
env | grep -E '^(APPTAINER|SINGULARITY)ENV_' | LC_ALL=C sort > "$FAKE_SLURM_DIR/apptainer_env" || true
'''


@pytest.fixture
def stub_slurm(tmp_path: Path) -> dict[str, str]:
    """A PATH with a fake ``sbatch`` and ``apptainer`` first; their records in FAKE_SLURM_DIR."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("apptainer", FAKE_APPTAINER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "slurm_record"
    record.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SPINEPS_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               FAKE_SLURM_DIR=str(record))
    return env


def _calls(env: dict[str, str]) -> list[dict]:
    path = Path(env["FAKE_SLURM_DIR"]) / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _args_file(env: dict) -> list[str]:
    """The app options submit.sh wrote for the tasks (NUL-separated)."""
    return [a.decode() for a in Path(env["SPINEPS_ARGS_FILE"]).read_bytes().split(b"\0")[:-1]]


def _opt(argv: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


def _subject_dirs(root: Path, labels: list[str]) -> Path:
    for label in labels:
        (root / f"sub-{label}" / "anat").mkdir(parents=True)
    return root


def test_submit_builds_the_list_submits_the_array_and_a_dependent_group_job(tmp_path: Path,
                                                                            stub_slurm: dict[str, str]) -> None:
    bids = _subject_dirs(tmp_path / "bids", ["10", "02", "01"])
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SUBMIT), str(bids), str(out), "--max-parallel", "2",
                           "--sbatch-args", "--partition gpu --gres gpu:1", "--", "--skip-bids-validation", "--no-n4"],
                          env=stub_slurm, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = _calls(stub_slurm)
    assert len(calls) == 2
    array, group = calls
    assert array["argv"][-1] == str(ARRAY) and group["argv"][-1] == str(GROUP)
    assert _opt(array["argv"], "--array") == "1-3%2"
    assert "--parsable" in array["argv"] and "--export=ALL" in array["argv"]
    assert array["argv"][array["argv"].index("--partition") + 1] == "gpu"
    assert array["argv"][array["argv"].index("--gres") + 1] == "gpu:1"
    # the array's id (";cluster" stripped); afterok: no group table from a partial cohort unless asked
    assert _opt(group["argv"], "--dependency") == "afterok:1000"
    assert "--kill-on-invalid-dep=yes" in group["argv"] and group["env"]["SPINEPS_ALLOW_PARTIAL"] == "0"
    env = array["env"]
    assert env["BIDS_DIR"] == str(bids) and env["OUT_DIR"] == str(out) and env["ARRAY_OFFSET"] == "0"
    assert env["SPINEPS_ARGS"] is None and _args_file(env) == ["--skip-bids-validation", "--no-n4"]
    assert env["SPINEPS_CMD"] == "spineps"  # no --sif, --venv or --cmd: spineps on PATH
    assert Path(env["SUBJECTS_FILE"]).read_text().split() == ["01", "02", "10"]  # sorted, no "sub-"
    assert Path(env["SUBJECTS_FILE"]).parent == out / "logs" / "slurm"
    assert str(out / "logs" / "slurm") in _opt(array["argv"], "--output")
    assert "group job 1001: after afterok:1000" in proc.stdout


def test_submit_splits_long_lists_and_the_group_waits_for_every_array(tmp_path: Path,
                                                                      stub_slurm: dict[str, str]) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("sub-a\n\n# comment\nb\nsub-c\n  d  \ne\n")
    proc = subprocess.run(["bash", str(SUBMIT), str(bids), str(tmp_path / "out"), "--subjects", str(subjects),
                           "--max-array-size", "2", "--dependency", "afterok"],
                          env=stub_slurm, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = _calls(stub_slurm)
    assert [_opt(c["argv"], "--array") for c in calls[:-1]] == ["1-2", "1-2", "1-1"]
    assert [c["env"]["ARRAY_OFFSET"] for c in calls[:-1]] == ["0", "2", "4"]
    assert _opt(calls[-1]["argv"], "--dependency") == "afterok:1000:1001:1002"
    assert Path(calls[0]["env"]["SUBJECTS_FILE"]).read_text().split() == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("args, code, message", [
    (["--dependency", "after"], 64, "afterany or afterok"),
    (["--max-array-size", "0"], 64, "positive integer"),
    (["--bogus"], 64, "unknown option"),
    ([], 66, "no subjects"),
])
def test_submit_refuses_bad_input(tmp_path: Path, stub_slurm: dict[str, str], args: list[str], code: int,
                                  message: str) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    proc = subprocess.run(["bash", str(SUBMIT), str(bids), str(tmp_path / "out"), *args],
                          env=stub_slurm, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code and message in proc.stderr, (proc.returncode, proc.stderr)
    assert _calls(stub_slurm) == []


def _task_env(base: dict[str, str], tmp: Path, bids: Path, out: Path, subjects: Path, task: int,
              **extra: str) -> dict[str, str]:
    env = dict(base)
    env.update(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_JOB_ID="4242", SLURM_JOB_ID="4243",
               SLURM_CPUS_PER_TASK="1", SUBJECTS_FILE=str(subjects), BIDS_DIR=str(bids), OUT_DIR=str(out),
               SPINEPS_CMD=f"{shlex.quote(sys.executable)} {shlex.quote(str(RUNNER))}",
               SPINEPS_ARGS="--skip-bids-validation", WORK_ROOT=str(tmp / "scratch"), SPINEPS_TEST_DELAY="0")
    env.update(extra)
    (tmp / "scratch").mkdir(exist_ok=True)
    return env


def _done_subjects(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("sub-*") if list(p.rglob("*_desc-spine_dseg.nii.gz")))


@pytest.mark.slow
def test_array_task_processes_the_subject_of_its_index_then_the_group_job(tmp_path: Path,
                                                                          stub_slurm: dict[str, str]) -> None:
    ds = minimal_dataset(tmp_path / "bids", subjects=("01", "02", "03"), shape=(24, 40, 8))
    out = tmp_path / "out"
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("01\nsub-02\n03\n")

    env = _task_env(stub_slurm, tmp_path, ds.root, out, subjects, task=2)
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task 2 (index 2) -> sub-02" in proc.stdout
    assert _done_subjects(out) == ["sub-02"]
    assert list((tmp_path / "scratch").iterdir()) == []  # the task's scratch folder is removed
    settings = json.loads(next((out / "logs").glob("participant_*_settings.json")).read_text())
    assert settings["participant_labels"] == ["02"] and settings["nprocs"] == 1
    assert settings["work_dir"].startswith(str(tmp_path / "scratch" / "spineps_4242_2_"))

    # a later array of a split list: task 1 with offset 2 is line 3
    env = _task_env(stub_slurm, tmp_path, ds.root, out, subjects, task=1, ARRAY_OFFSET="2")
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _done_subjects(out) == ["sub-02", "sub-03"]

    status = out / "logs" / "slurm" / "status"
    assert sorted(p.name for p in status.iterdir()) == ["sub-02", "sub-03"]
    assert (status / "sub-03").read_text().startswith("exit=0 job=4242_1 ")

    # sub-01's task never ran: the group job refuses the partial cohort and names the subject ...
    genv = {k: v for k, v in env.items() if not k.startswith("SLURM_ARRAY")}
    proc = subprocess.run(["bash", str(GROUP)], env=genv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "1 of 3 subjects" in proc.stderr and "sub-01 (no finished task" in proc.stderr
    assert not (out / "group_T2w.tsv").exists()
    # ... and runs on it when asked to (submit.sh --allow-partial), with the missing list beside the subject list
    proc = subprocess.run(["bash", str(GROUP)], env={**genv, "SPINEPS_ALLOW_PARTIAL": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "partial cohort" in proc.stderr and "2 of 3 subjects" in proc.stderr
    assert (tmp_path / "subjects_missing.txt").read_text() == "sub-01\n"
    table = (out / "group_T2w.tsv").read_text()
    assert "sub-02" in table and "sub-03" in table and "sub-01" not in table


def test_array_task_index_outside_the_list_fails_before_running(tmp_path: Path, stub_slurm: dict[str, str]) -> None:
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("01\n02\n")
    env = _task_env(stub_slurm, tmp_path, tmp_path / "bids", tmp_path / "out", subjects, task=3,
                    SPINEPS_CMD="false")
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64 and "outside 1..2" in proc.stderr
    env.pop("SLURM_ARRAY_TASK_ID")
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "array task" in proc.stderr


@pytest.mark.parametrize("gpu", [False, True])
def test_array_task_runs_the_apptainer_image_with_the_same_paths(tmp_path: Path, stub_slurm: dict[str, str],
                                                                 gpu: bool) -> None:
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("01\n02\n")
    bids, out = tmp_path / "bids", tmp_path / "out"
    extra = {"SPINEPS_SIF": "/images/spineps.sif", "SPINEPS_ARGS": "--skip-bids-validation --device auto"}
    if gpu:
        extra["CUDA_VISIBLE_DEVICES"] = "0"
    env = _task_env(stub_slurm, tmp_path, bids, out, subjects, task=1, **extra)
    if not gpu:
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env.pop("SLURM_JOB_GPUS", None)
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (Path(stub_slurm["FAKE_SLURM_DIR"]) / "apptainer_args").read_text().splitlines()
    work = args[args.index("-B", args.index(f"{out}:{out}")) + 1].split(":")[0]
    expected = ["run", *(["--nv"] if gpu else []), "--cleanenv", "-B", f"{bids}:{bids}:ro", "-B", f"{out}:{out}",
                "-B", f"{work}:{work}", "/images/spineps.sif", str(bids), str(out), "participant",
                "--participant-label", "01", "-w", work, "--nprocs", "1", "--omp-nthreads", "1",
                "--skip-bids-validation", "--device", "auto"]
    assert args == expected
    assert work.startswith(str(tmp_path / "scratch" / "spineps_4242_1_")) and not Path(work).exists()


RECORD_ARGS = r'''#!/usr/bin/env bash
# a stand-in for spineps: records its arguments (NUL-separated) and the memory budget it was given
printf '%s\0' "$@" > "$FAKE_SLURM_DIR/spineps_args"
echo "${SPINEPS_MEMORY_LIMIT_MB:-unset}" > "$FAKE_SLURM_DIR/spineps_memory"
exit "${FAKE_SPINEPS_EXIT:-0}"
'''


def _recorder(tmp_path: Path) -> Path:
    path = tmp_path / "bin dir" / "record args"  # spaces: an executable path is one word
    path.parent.mkdir()
    path.write_text(RECORD_ARGS)
    path.chmod(0o755)
    return path


def _recorded_args(env: dict[str, str]) -> list[str]:
    raw = (Path(env["FAKE_SLURM_DIR"]) / "spineps_args").read_bytes()
    return [a.decode() for a in raw.split(b"\0")[:-1]]


def test_app_options_reach_spineps_unchanged(tmp_path: Path, stub_slurm: dict[str, str]) -> None:
    """Spaces, quotes and glob characters in the app options survive submit.sh -> sbatch -> the task
    (they were word-split and glob-expanded); SPINEPS_ARGS set by hand is split but never globbed."""
    bids = _subject_dirs(tmp_path / "bids", ["01"])
    out = tmp_path / "out"
    recorder = _recorder(tmp_path)
    for name in ("a.json", "b.json"):  # what an unquoted *.json would expand to in the task's folder
        (tmp_path / name).write_text("{}")
    tricky = ["--bids-filter-file", str(tmp_path / "my filters" / "*.json"), "--level-rule", "it's \"odd\"", ""]
    proc = subprocess.run(["bash", str(SUBMIT), str(bids), str(out), "--cmd", str(recorder), "--", *tricky],
                          env=stub_slurm, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    array = _calls(stub_slurm)[0]["env"]
    assert _args_file(array) == tricky and array["SPINEPS_CMD"] == str(recorder)

    env = _task_env(stub_slurm, tmp_path, bids, out, Path(array["SUBJECTS_FILE"]), task=1, SPINEPS_ARGS="",
                    SPINEPS_ARGS_FILE=array["SPINEPS_ARGS_FILE"], SPINEPS_CMD=array["SPINEPS_CMD"])
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    args = _recorded_args(stub_slurm)
    assert args[:3] == [str(bids), str(out), "participant"] and args[-len(tricky):] == tricky

    env = _task_env(stub_slurm, tmp_path, bids, out, Path(array["SUBJECTS_FILE"]), task=1,
                    SPINEPS_ARGS="--bids-filter-file  *.json\t-v", SPINEPS_CMD=f"{recorder}")
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _recorded_args(stub_slurm)[-3:] == ["--bids-filter-file", "*.json", "-v"]


@pytest.mark.parametrize("memory, expected", [
    ({"SLURM_MEM_PER_NODE": "1500"}, "1500"),  # --mem 1500M
    ({"SLURM_MEM_PER_CPU": "700", "SLURM_CPUS_ON_NODE": "2"}, "1400"),  # --mem-per-cpu 700M -c 2
    ({"SLURM_MEM_PER_NODE": "1500", "SPINEPS_MEMORY_LIMIT_MB": "900"}, "900"),  # set by the user: kept
    ({}, "unset"),
])
def test_the_jobs_memory_becomes_the_apps_memory_budget(tmp_path: Path, stub_slurm: dict[str, str],
                                                        memory: dict[str, str], expected: str) -> None:
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("01\n")
    env = _task_env(stub_slurm, tmp_path, tmp_path / "bids", tmp_path / "out", subjects, task=1,
                    SPINEPS_CMD=str(_recorder(tmp_path)), FAKE_SPINEPS_EXIT="75", **memory)
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75, proc.stderr  # the app's exit status is the task's
    assert (Path(stub_slurm["FAKE_SLURM_DIR"]) / "spineps_memory").read_text().strip() == expected
    assert f"memory budget {expected}" in proc.stdout
    status = (tmp_path / "out" / "logs" / "slurm" / "status" / "sub-01").read_text()
    assert status.startswith("exit=75 job=4242_1 ")


def test_the_image_gets_the_model_variables_and_folders(tmp_path: Path, stub_slurm: dict[str, str]) -> None:
    """apptainer --cleanenv drops the host's variables: the model folders and the memory budget
    are forwarded as APPTAINERENV_*/SINGULARITYENV_*, host folders bound read-only."""
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("01\n")
    sem = tmp_path / "weights" / "t2w_semantic"
    sem.mkdir(parents=True)
    in_image = "/opt/spineps/models/instance-v2"  # a folder inside the image only: not bound
    env = _task_env(stub_slurm, tmp_path, tmp_path / "bids", tmp_path / "out", subjects, task=1,
                    SPINEPS_SIF="/images/spineps.sif", SPINEPS_SEMANTIC_MODEL=str(sem),
                    SPINEPS_INSTANCE_MODEL=in_image, SLURM_MEM_PER_NODE="2048",
                    APPTAINERENV_SPINEPS_DISK_LIMIT_MB="5")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("SLURM_JOB_GPUS", None)
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    record = Path(stub_slurm["FAKE_SLURM_DIR"])
    forwarded = dict(line.split("=", 1) for line in (record / "apptainer_env").read_text().splitlines())
    for prefix in ("APPTAINERENV_", "SINGULARITYENV_"):
        assert forwarded[prefix + "SPINEPS_SEMANTIC_MODEL"] == str(sem)
        assert forwarded[prefix + "SPINEPS_INSTANCE_MODEL"] == in_image
        assert forwarded[prefix + "SPINEPS_MEMORY_LIMIT_MB"] == "2048"
    assert forwarded["APPTAINERENV_SPINEPS_DISK_LIMIT_MB"] == "5"  # the user's own setting is kept
    args = (record / "apptainer_args").read_text().splitlines()
    assert args[:2] == ["run", "--cleanenv"]
    binds = [args[i + 1] for i, a in enumerate(args) if a == "-B"]
    assert f"{sem}:{sem}:ro" in binds and not any(in_image in b for b in binds)


@pytest.mark.parametrize("args, code, message", [
    (["--sif", "IMG", "--venv", "ENV"], 64, "only one of --sif, --venv, --cmd"),
    (["--venv", "ENV"], 69, "no spineps in that environment"),
])
def test_submit_runner_options(tmp_path: Path, stub_slurm: dict[str, str], args: list[str], code: int,
                               message: str) -> None:
    bids = _subject_dirs(tmp_path / "bids", ["01"])
    (tmp_path / "IMG").write_text("")
    args = [str(tmp_path / a) if a in ("IMG", "ENV") else a for a in args]
    proc = subprocess.run(["bash", str(SUBMIT), str(bids), str(tmp_path / "out"), *args],
                          env=stub_slurm, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code and message in proc.stderr, (proc.returncode, proc.stderr)
    assert _calls(stub_slurm) == []


def test_submit_with_a_venv_and_allow_partial(tmp_path: Path, stub_slurm: dict[str, str]) -> None:
    bids = _subject_dirs(tmp_path / "bids", ["01", "02"])
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "spineps").write_text("#!/bin/sh\n")
    (venv / "bin" / "spineps").chmod(0o755)
    proc = subprocess.run(["bash", str(SUBMIT), str(bids), str(tmp_path / "out"), "--venv", str(venv),
                           "--allow-partial"], env=stub_slurm, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array, group = _calls(stub_slurm)
    assert array["env"]["SPINEPS_CMD"] == str(venv / "bin" / "spineps") and array["env"]["SPINEPS_SIF"] == ""
    assert _args_file(array["env"]) == []
    assert _opt(group["argv"], "--dependency") == "afterany:1000" and group["env"]["SPINEPS_ALLOW_PARTIAL"] == "1"


SLOW_APP = r'''#!/usr/bin/env python3
# a stand-in for spineps that runs until SIGTERM, then exits 143 as spineps does
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
Path(sys.argv[0] + ".ready").write_text("")
time.sleep(120)
'''


def test_array_task_passes_sigterm_on_to_spineps(tmp_path: Path, stub_slurm: dict[str, str]) -> None:
    """scancel and the time limit signal only the batch shell (SIGKILL of everything comes
    KillWait seconds later): the task must hand SIGTERM to spineps and report its status."""
    import signal
    import time

    subjects = tmp_path / "subjects.txt"
    subjects.write_text("01\n")
    app = tmp_path / "slow-app"
    app.write_text(SLOW_APP.replace("python3", sys.executable, 1))
    app.chmod(0o755)
    env = _task_env(stub_slurm, tmp_path, tmp_path / "bids", tmp_path / "out", subjects, task=1, SPINEPS_CMD=str(app))
    proc = subprocess.Popen(["bash", str(ARRAY)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{app}.ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # to the shell only, as slurmstepd does
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and time.monotonic() - t0 < 10, err
    assert "passing it on to spineps" in err
    assert (tmp_path / "out/logs/slurm/status/sub-01").read_text().startswith("exit=143 ")
    assert list((tmp_path / "scratch").iterdir()) == []
