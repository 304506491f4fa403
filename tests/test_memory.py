"""The memory check (issue 17, item 4): this process's own cgroup limits (v1 and v2, nested,
through ``/proc/self/cgroup`` and ``/proc/self/mountinfo``), the per-scan estimate from the
loaded models, calibrated on the measured peaks of the released-size networks, and one real
run under a kernel-enforced memory limit that fails with 75 instead of being killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from spineps.resources import (Footprint, InstanceFootprint, SemanticFootprint, cgroup_memory_room,
                               estimate_scan)
from tests.bids_factory import BidsFactory

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


# --------------------------------------------------------------------------- cgroup fixture trees
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> tuple[Path, Path]:
    """Fake ``/proc/self/cgroup`` and ``/proc/self/mountinfo``."""
    return (_write(tmp_path / "proc" / "cgroup", cgroup),
            _write(tmp_path / "proc" / "mountinfo", "\n".join(mounts) + "\n"))


def test_cgroup_v2_slurm_job_limit_seen_from_its_task(tmp_path: Path) -> None:
    """SLURM (cgroup/v2) sets the limit on the job's cgroup; the task runs two levels below,
    where memory.max says "max". The root files the old code read say nothing at all."""
    fs = tmp_path / "sys" / "fs" / "cgroup"
    job = fs / "system.slice" / "slurmstepd.scope" / "job_42"
    task = job / "step_batch" / "user" / "task_0"
    _write(fs / "cgroup.controllers", "cpu memory pids\n")  # the root has no memory.max
    for level in (fs / "system.slice", fs / "system.slice" / "slurmstepd.scope", job / "step_batch",
                  job / "step_batch" / "user", task):
        _write(level / "memory.max", "max\n")
        _write(level / "memory.current", f"{100 * MB}\n")
    _write(job / "memory.max", f"{2048 * MB}\n")
    _write(job / "memory.current", f"{1500 * MB}\n")
    _write(job / "memory.stat", f"anon {1200 * MB}\ninactive_file {200 * MB}\nactive_file 1\n")
    cg, mi = _proc(tmp_path, "0::/system.slice/slurmstepd.scope/job_42/step_batch/user/task_0\n",
                   [f"35 24 0:30 / {fs} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw"])
    room, where = cgroup_memory_room(cg, mi)
    assert room == (2048 - 1500 + 200) * MB
    assert "cgroup v2" in where and "job_42:" in where and "limit 2,048 MB" in where and "1,500 MB in use" in where


def test_cgroup_v2_tightest_level_wins(tmp_path: Path) -> None:
    fs = tmp_path / "cg2"
    leaf = fs / "a" / "b"
    _write(fs / "a" / "memory.max", f"{1000 * MB}\n")
    _write(fs / "a" / "memory.current", f"{100 * MB}\n")  # room 900 MB
    _write(leaf / "memory.max", f"{500 * MB}\n")
    _write(leaf / "memory.current", f"{50 * MB}\n")  # room 450 MB
    cg, mi = _proc(tmp_path, "0::/a/b\n", [f"30 20 0:26 / {fs} rw - cgroup2 cgroup2 rw"])
    assert cgroup_memory_room(cg, mi)[0] == 450 * MB
    _write(fs / "a" / "memory.current", f"{800 * MB}\n")  # room 200 MB at the parent
    assert cgroup_memory_room(cg, mi)[0] == 200 * MB


def test_cgroup_v1_nested_and_hybrid(tmp_path: Path) -> None:
    """cgroup v1 (what SLURM's cgroup/v1 and this machine use): memory controller mounted on
    its own, the limit on ``slurm/uid_0/job_7``, the task below it; a v2 mount beside it
    (hybrid) without the memory controller says nothing."""
    mem = tmp_path / "sys" / "fs" / "cgroup" / "memory"
    uni = tmp_path / "sys" / "fs" / "cgroup" / "unified"
    job = mem / "slurm" / "uid_0" / "job_7"
    task = job / "step_batch" / "task_0"
    unlimited = str(2 ** 63 - 4096)
    for level in (mem, mem / "slurm", mem / "slurm" / "uid_0", job / "step_batch", task):
        _write(level / "memory.limit_in_bytes", unlimited + "\n")
        _write(level / "memory.usage_in_bytes", f"{10 * MB}\n")
    _write(job / "memory.limit_in_bytes", f"{1000 * MB}\n")
    _write(job / "memory.usage_in_bytes", f"{600 * MB}\n")
    _write(job / "memory.stat", f"cache 1\ntotal_inactive_file {50 * MB}\nhierarchical_memory_limit {1000 * MB}\n")
    uni.mkdir(parents=True)
    cg, mi = _proc(tmp_path, "12:pids:/slurm/uid_0/job_7\n4:memory:/slurm/uid_0/job_7/step_batch/task_0\n0::/\n",
                   [f"31 23 0:28 / {tmp_path / 'sys/fs/cgroup'} rw,relatime - tmpfs tmpfs rw,mode=755",
                    f"35 31 0:32 / {mem} rw,relatime - cgroup cgroup rw,memory",
                    f"36 31 0:33 / {tmp_path / 'sys/fs/cgroup/cpu'} rw,relatime - cgroup cgroup rw,cpu",
                    f"41 31 0:38 / {uni} rw,relatime - cgroup2 cgroup2 rw"])
    room, where = cgroup_memory_room(cg, mi)
    assert room == (1000 - 600 + 50) * MB and where.startswith("cgroup v1 ") and where.split(":")[0].endswith("job_7")


def test_cgroup_v1_container_sees_its_cgroup_at_the_mount_point(tmp_path: Path) -> None:
    """A container without a cgroup namespace: /proc/self/cgroup names /docker/<id>, and the
    mount shows exactly that cgroup at /sys/fs/cgroup/memory (mountinfo's root field); the
    ancestors' limit comes from hierarchical_memory_limit."""
    mem = tmp_path / "memory"
    _write(mem / "memory.limit_in_bytes", str(2 ** 63 - 4096))
    _write(mem / "memory.usage_in_bytes", f"{300 * MB}\n")
    _write(mem / "memory.stat", f"hierarchical_memory_limit {800 * MB}\ntotal_inactive_file 0\n")
    cg, mi = _proc(tmp_path, "4:memory:/docker/abc123\n",
                   [f"35 31 0:32 /docker/abc123 {mem} ro,nosuid - cgroup cgroup rw,memory"])
    assert cgroup_memory_room(cg, mi)[0] == 500 * MB


def test_cgroup_namespace_and_no_limits(tmp_path: Path) -> None:
    """With a cgroup namespace the process sees "0::/" and its own cgroup at the mount point;
    no limit anywhere (or no cgroup files at all): None, the other sources decide."""
    fs = tmp_path / "cg"
    _write(fs / "memory.max", f"{256 * MB}\n")
    _write(fs / "memory.current", f"{56 * MB}\n")
    cg, mi = _proc(tmp_path, "0::/\n", [f"30 20 0:26 / {fs} rw - cgroup2 cgroup2 rw,nsdelegate"])
    assert cgroup_memory_room(cg, mi)[0] == 200 * MB
    _write(fs / "memory.max", "max\n")
    assert cgroup_memory_room(cg, mi) is None
    assert cgroup_memory_room(tmp_path / "absent", tmp_path / "absent2") is None
    cg, mi = _proc(tmp_path, "0::/x\n", ["garbage line", f"30 20 0:26 / {tmp_path / 'gone'} rw - cgroup2 cgroup2 rw"])
    assert cgroup_memory_room(cg, mi) is None


def test_mount_points_with_escaped_spaces(tmp_path: Path) -> None:
    fs = tmp_path / "my cgroups"
    _write(fs / "memory.max", f"{100 * MB}\n")
    cg, mi = _proc(tmp_path, "0::/\n", [f"30 20 0:26 / {str(fs).replace(' ', chr(92) + '040')} rw - cgroup2 x rw"])
    assert cgroup_memory_room(cg, mi)[0] == 100 * MB


# --------------------------------------------------------------------------- the estimate
def _sem(**kw) -> SemanticFootprint:
    args = dict(orientation=("P", "I", "R"), spacing_min=(0.75, 0.75, 1.65), spacing_max=(0.75, 0.75, 1.65),
                tile=(256, 256, 64), features=32, classes=15, folds=1, precision="fp32", engine="torch")
    args.update(kw)
    return SemanticFootprint(**args)


def _ins(**kw) -> InstanceFootprint:
    args = dict(orientation=("P", "I", "R"), spacing_min=(3.0, 3.0, 6.0), spacing_max=(3.0, 3.0, 6.0),
                cutout=(248, 304, 64), in_channels=10, dim=16, batch=2)
    args.update(kw)
    return InstanceFootprint(**args)


SAG = np.diag([1.0, 1.0, 4.0, 1.0])[:, [1, 2, 0, 3]]  # array axes P, I, R; 1 x 1 x 4 mm


def test_estimate_follows_the_loaded_models() -> None:
    """It used to assume the official spacing and a fixed cost per voxel whatever model was
    loaded (a tile of the released network alone takes 3.7 GB in float32)."""
    shape, spacing = (256, 320, 20), (1.0, 1.0, 4.0)
    released = estimate_scan(shape, spacing, affine=SAG, footprint=Footprint(_sem(), _ins()))
    tiny = estimate_scan(shape, spacing, affine=SAG, footprint=Footprint(
        _sem(tile=(80, 96, 24), features=8, spacing_min=(1.5, 1.5, 3.0), spacing_max=(1.5, 1.5, 3.0)),
        _ins(cutout=(64, 80, 16), dim=8)))
    assert released.network_bytes > 3700 * MB  # the released tile in float32 torch
    assert tiny.network_bytes < 100 * MB and tiny.memory_bytes < released.memory_bytes / 5
    assert released.n_model_voxels > tiny.n_model_voxels  # 0.75 x 0.75 x 1.65 mm vs 1.5 x 1.5 x 3 mm
    # precision and engine: the released tile in bfloat16 or ONNX Runtime needs about half
    bf16 = estimate_scan(shape, spacing, affine=SAG, footprint=Footprint(_sem(precision="bf16"), None))
    ort = estimate_scan(shape, spacing, affine=SAG, footprint=Footprint(_sem(engine="onnxruntime"), None))
    fp32 = estimate_scan(shape, spacing, affine=SAG, footprint=Footprint(_sem(), None))
    assert ort.network_bytes < bf16.network_bytes < 0.6 * fp32.network_bytes
    # folds: the logits of several folds are summed in a second array
    assert estimate_scan(shape, spacing, affine=SAG, footprint=Footprint(_sem(folds=5), None)).memory_bytes \
        > fp32.memory_bytes
    # on CUDA the network and the logits are in GPU memory
    cuda = estimate_scan(shape, spacing, affine=SAG, footprint=Footprint(_sem(device="cuda"), _ins(device="cuda")))
    assert cuda.network_bytes == 0 and cuda.memory_bytes < fp32.memory_bytes - fp32.network_bytes
    # the instance phase alone (``spineps instance``): cutout batches, no semantic network
    only = estimate_scan(shape, spacing, affine=SAG, footprint=Footprint(None, _ins()))
    assert only.network_bytes == _ins().batch_bytes() and only.n_model_voxels == only.n_voxels


def test_model_grid_follows_the_axes_and_pads_to_one_tile() -> None:
    """A sagittal stack's thick axis is L-R: at 0.75 x 0.75 x 1.65 mm (P, I, R) it has 256/0.75 x
    320/0.75 x 80/1.65 voxels, whichever array axis holds which direction."""
    fp = Footprint(_sem(tile=(8, 8, 8)), None)
    a = estimate_scan((256, 320, 20), (1.0, 1.0, 4.0), affine=SAG, footprint=fp)
    perm = np.diag([4.0, 1.0, 1.0, 1.0])[:, [0, 1, 2, 3]]  # array axes R (4 mm), A, S: another layout, same scan
    b = estimate_scan((20, 256, 320), (4.0, 1.0, 1.0), affine=perm, footprint=fp)
    expected = int(np.ceil(256 / 0.75)) * int(np.ceil(320 / 0.75)) * int(np.ceil(80 / 1.65))
    assert a.n_model_voxels == b.n_model_voxels == expected
    small = estimate_scan((10, 10, 3), (1.0, 1.0, 4.0), affine=SAG, footprint=Footprint(_sem(), None))
    assert small.n_model_voxels == 256 * 256 * 64  # nnU-Net pads to one tile


def test_calibration_against_the_measured_released_networks() -> None:
    """The network constants are the measured peaks of the released-size networks
    (benchmarks/results/semantic_official_layout.json, instance_speed.json): the estimate is
    never below them and at most 15 % above."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import memory_estimate

    rows = memory_estimate.released_rows()
    assert len(rows) == 6
    for row in rows:
        assert 1.0 <= row["ratio"] <= 1.15, row


@pytest.mark.slow
def test_estimate_covers_the_measured_pipeline_peaks() -> None:
    """The whole pipeline with the bundled models (results/cpu.json, cpu_fp32.json): the
    estimate is not below any measured peak above the process floor, and not far above (a
    too high estimate refuses scans that would fit). Only while the bundled models are the
    ones measured."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import memory_estimate

    rows = [r for r in memory_estimate.pipeline_rows() if r["models_as_measured"]]
    if not rows:
        pytest.skip("the bundled models differ from the ones results/cpu.json measured (rerun run_benchmark.py)")
    for row in rows:
        assert 1.0 <= row["ratio"] <= 2.5, row


def test_segmenters_describe_their_networks(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.semantic.predict import NnUNetSemanticSegmenter
    from tests.tiny_models import build_tiny_model_folders

    threads = torch.get_num_threads()
    try:
        sem_dir, ins_dir = build_tiny_model_folders(tmp_path)
        sem = NnUNetSemanticSegmenter.from_folder(sem_dir, device="cpu", nprocs=1, precision="bf16")
        ins = UNetInstanceSegmenter.from_folder(ins_dir, device="cpu", nprocs=1)
    finally:
        torch.set_num_threads(threads)
    fp = Footprint.of(sem, ins)
    assert fp is not None and fp.semantic is not None and fp.instance is not None
    assert fp.semantic.tile == (16, 16, 8)  # patch (R, I, P) = (8, 16, 16) of the folder, in P, I, R
    assert fp.semantic.features == 2 and fp.semantic.classes == sem.loaded.num_outputs and fp.semantic.folds == 1
    assert (fp.semantic.precision, fp.semantic.engine) == ("bf16", "torch")
    assert fp.instance.cutout == tuple(ins.config.cutout_size) and fp.instance.dim == ins.dim == 8
    assert Footprint.of(object(), None) is None  # a segmenter that does not say: the model-agnostic estimate


# --------------------------------------------------------------------------- a real memory limit
def _own_v1_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        ident, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (folder / "memory.limit_in_bytes").is_file():
                return folder
    raise FileNotFoundError("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")


@pytest.fixture
def memory_cgroup():
    """A child of this process's own cgroup v1 memory cgroup (root only), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    try:
        parent = _own_v1_memory_cgroup()
        child = parent / f"spineps-test-{uuid.uuid4().hex[:8]}"
        child.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup v1 memory cgroup here: {exc}")
    yield child
    for _ in range(50):  # empty once the process in it has exited
        try:
            child.rmdir()
            return
        except OSError:
            time.sleep(0.1)


@pytest.mark.slow
def test_real_run_under_a_memory_limit_fails_with_75_not_killed(tmp_path: Path, memory_cgroup: Path) -> None:
    """The app in a cgroup whose kernel-enforced limit is 900 MB, with the bundled models: the
    small scan is segmented, the large one (512 x 512 x 96 voxels; about 1.3 GB by the
    estimate; measured, it takes the cgroup's usage to about 1 GB: benchmarks/memory_estimate.py
    --cgroup-run) is refused before it is read, naming the cgroup, and the run exits 75. Before,
    the check saw only MemAvailable (GBs) and the kernel killed the process in the semantic
    phase of the large scan (exit -9, checked on the code before the fix)."""
    from spineps.models import registry

    if registry.bundled_model_dir(registry.BUNDLED_SEMANTIC) is None:
        pytest.skip("no bundled models in this installation")
    limit = 900 * MB
    (memory_cgroup / "memory.limit_in_bytes").write_text(str(limit))
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    big_shape = (512, 512, 96)
    # noise, not zeros: a constant image is refused as bad input, which would hide a missing check
    noise = np.random.default_rng(0).integers(0, 1000, big_shape).astype(np.int16)
    big = ds.add("02", acq="sag", shape=big_shape, data=noise, spacing=(0.5, 0.5, 3.0))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEPS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = (f'echo $$ > "{memory_cgroup}/cgroup.procs" && exec "{sys.executable}" "{REPO / "run.py"}" '
               f'"{ds.root}" "{out}" participant --skip-bids-validation --device cpu --nprocs 1')
    proc = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=600)
    err = proc.stderr
    assert proc.returncode == 75, err[-3000:]  # not -9 (SIGKILL by the OOM killer), not 1
    line = next(ln for ln in err.splitlines() if "not enough memory for this scan" in ln)
    assert big.name in line and "cgroup memory limit: cgroup v1" in line and memory_cgroup.name in line
    assert "limit 900 MB" in line
    assert (out / "sub-01/anat/sub-01_acq-sag_desc-vertebrae_dseg.json").is_file()
    assert not (out / "sub-02").exists() or not list((out / "sub-02").rglob("*.nii.gz"))
