"""A real one-node SLURM cluster on localhost, for the tests (``tests/test_slurm_cluster.py``).

:func:`unavailable_reason` says why no cluster can be had here (None when one can),
:func:`ensure_installed` installs Debian's ``slurm-wlm`` and ``munge`` when they are missing
(root and apt-get only), and :class:`LocalSlurm` writes a configuration of its own under a
fresh temporary folder (its own ports, munge socket and key, state and spool folders,
logs, node name), starts ``munged``, ``slurmctld`` and ``slurmd``, waits until the node is
idle, and stops everything again (:meth:`LocalSlurm.stop`, also from a watchdog process
when the test session dies without cleaning up). Two sessions at once never share a port,
a folder, a node name or a cgroup.

Node: this machine's memory (90 % of it) and CPUs, but at least :data:`MIN_CPUS` declared
(``SlurmdParameters=config_overrides``) so an array can run more tasks at once than
``--max-parallel`` allows. Process tracking and task plugins: ``proctrack/cgroup`` +
``task/cgroup`` (``--mem`` enforced by the kernel) when a writable cgroup v1 memory and
freezer hierarchy exists and slurmd starts with it; else ``proctrack/linuxproc`` +
``task/none`` (nothing enforced). No accounting storage (no ``sacct``): job states come
from ``scontrol show job``, kept for an hour (``MinJobAge``).

Environment: ``SPINEPS_SLURM_TESTS`` = ``auto`` (default: skip with the reason when no
cluster can be had), ``require`` (CI: that reason is a failure), ``off`` (always skip);
``SPINEPS_SLURM_CGROUP`` = ``auto`` (default), ``0`` or ``1``; ``SPINEPS_SLURM_KEEP=1``
keeps the cluster folder (logs) after the stop.

By hand: ``python -m tests.slurm_cluster start`` prints ``export SLURM_CONF=...``; ``python
-m tests.slurm_cluster stop DIR`` stops it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

__all__ = ["TOOLS", "PACKAGES", "MIN_CPUS", "unavailable_reason", "ensure_installed", "cluster_or_skip_reason",
           "LocalSlurm", "parse_records"]

#: the programs a cluster needs (daemons and the client tools the tests use)
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = ("slurm-wlm", "munge")
MIN_CPUS = 4
MODE_ENV = "SPINEPS_SLURM_TESTS"
CGROUP_ENV = "SPINEPS_SLURM_CGROUP"
KEEP_ENV = "SPINEPS_SLURM_KEEP"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("memory", "freezer", "cpuset", "devices", "cpuacct", "cpu")
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "spineps-slurm-install.lock"


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}{os.pathsep}{SBIN_PATH}")


def unavailable_reason(*, have: Callable[[str], bool], is_root: bool, has_apt: bool) -> Optional[str]:
    """Why no cluster can be had: None when running as root and every tool is there or can
    be installed (apt-get), else the reason a test skips with. The daemons run as root
    (``SlurmUser=root``: slurmd starts every job), so not root is a reason on its own."""
    missing = [t for t in TOOLS if not have(t)]
    what = f"SLURM/munge not installed ({', '.join(missing)} missing)" if missing else "SLURM is installed"
    if not is_root:
        return f"{what}, but not root: the test cluster's daemons run as root" + (
            f" (and apt-get install {' '.join(PACKAGES)} needs root)" if missing else "")
    if not missing:
        return None
    if not has_apt:
        return f"{what} and no apt-get to install {' '.join(PACKAGES)} with"
    return None


def ensure_installed(timeout: float = 900) -> Optional[str]:
    """Install the packages when tools are missing (once per machine: a file lock serialises
    sessions); None when the tools are there afterwards, else why not."""
    reason = unavailable_reason(have=lambda t: _which(t) is not None, is_root=os.geteuid() == 0,
                                has_apt=_which("apt-get") is not None)
    if reason is not None or all(_which(t) for t in TOOLS):
        return reason
    with open(_INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(_which(t) for t in TOOLS):
            return None
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"],
                    ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq", *PACKAGES]):
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return f"{' '.join(cmd)} did not finish in {timeout:.0f} s"
            if proc.returncode != 0:
                return f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
    missing = [t for t in TOOLS if not _which(t)]
    return f"still missing after installing {' '.join(PACKAGES)}: {', '.join(missing)}" if missing else None


def cluster_or_skip_reason() -> Optional[str]:
    """What the test fixture should skip with (None: go ahead), honouring ``SPINEPS_SLURM_TESTS``."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower()
    if mode == "off":
        return f"{MODE_ENV}=off"
    return ensure_installed()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _meminfo_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _cgroup_v1_usable() -> tuple[bool, str]:
    """Whether slurmd can make its own cgroups here (a writable v1 memory and freezer hierarchy)."""
    for controller in ("memory", "freezer"):
        folder = CGROUP_ROOT / controller
        if not (folder / "cgroup.procs").is_file():
            return False, f"no cgroup v1 {controller} hierarchy at {folder}"
        probe = folder / f"spineps-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            return False, f"cannot create a cgroup under {folder}: {exc.strerror}"
    return True, "cgroup v1 memory and freezer hierarchies are writable"


_RECORD_RE = re.compile(r"(?:^|\s)([A-Za-z][\w/:.]*)=(\S*)")


def parse_records(text: str) -> list[dict[str, str]]:
    """``scontrol -o show job`` output: one dict per line (Key=Value pairs)."""
    return [dict(_RECORD_RE.findall(line)) for line in text.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (from ``/proc``; a zombie, exited but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class LocalSlurm:
    """One controller + one node on 127.0.0.1; everything under ``root``."""

    def __init__(self, root: Optional[Path] = None, *, cpus: Optional[int] = None,
                 memory_mb: Optional[int] = None, cgroup: Optional[bool] = None) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="spineps-slurm-"))
        self.real_cpus = len(os.sched_getaffinity(0))
        self.cpus = cpus or max(self.real_cpus, MIN_CPUS)
        self.memory_mb = memory_mb or int(_meminfo_mb() * 0.9)
        self.host = socket.gethostname().split(".")[0]
        self.want_cgroup = cgroup
        self.cgroup = False
        self.cgroup_note = ""
        self.node = ""
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._watchdog: Optional[subprocess.Popen] = None

    # -- environment -----------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The caller's environment pointed at this cluster (no SLURM_* of an outer job)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{env.get('PATH', '')}{os.pathsep}{SBIN_PATH}"
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    # -- configuration -----------------------------------------------------------------
    def _write_config(self, cgroup: bool) -> None:
        ctld_port, slurmd_port = _free_port(), _free_port()
        self.node = f"spn{slurmd_port}"  # unique per session: slurmd's cgroups are slurm_<node>
        r = self.root
        lines = {
            "ClusterName": "spinepstest",
            "SlurmctldHost": f"{self.host}(127.0.0.1)",
            "SlurmctldPort": ctld_port,
            "SlurmdPort": slurmd_port,
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "StateSaveLocation": r / "state",
            "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "slurmctld.pid",
            "SlurmdPidFile": r / "slurmd.pid",
            "SlurmctldLogFile": r / "log" / "slurmctld.log",
            "SlurmdLogFile": r / "log" / "slurmd.log",
            "ProctrackType": "proctrack/cgroup" if cgroup else "proctrack/linuxproc",
            "TaskPlugin": "task/cgroup" if cgroup else "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU_Memory",
            "SchedulerType": "sched/backfill",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "KillWait": 10,  # SIGTERM, then SIGKILL 10 s later (scancel, time limit)
            "MinJobAge": 3600,  # finished jobs stay visible to scontrol (no accounting here)
            "InactiveLimit": 0,
            "SlurmctldTimeout": 30,
            "SlurmdTimeout": 60,
            "DefMemPerCPU": 512,
            "MaxArraySize": 1001,
        }
        if self.cpus > self.real_cpus:
            lines["SlurmdParameters"] = "config_overrides"  # declare more CPUs than the machine has
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += (f"NodeName={self.node} NodeHostname={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                 f"RealMemory={self.memory_mb} State=UNKNOWN\n"
                 f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n")
        self.conf.write_text(text)
        cgroup_conf = self.root / "cgroup.conf"
        if cgroup:
            cgroup_conf.write_text(f"CgroupPlugin=cgroup/v1\nCgroupMountpoint={CGROUP_ROOT}\nConstrainRAMSpace=yes\n"
                                   "ConstrainSwapSpace=no\nConstrainCores=no\nConstrainDevices=no\n")
        elif cgroup_conf.exists():
            cgroup_conf.unlink()
        self.cgroup = cgroup
        self._save_state()

    def _save_state(self) -> None:
        state = {"node": self.node, "conf": str(self.conf), "cgroup": self.cgroup,
                 "munge_pid_file": str(self.root / "munge" / "munged.pid")}
        (self.root / "cluster.json").write_text(json.dumps(state))

    # -- start -------------------------------------------------------------------------
    def _start_munge(self) -> None:
        m = self.root / "munge"
        m.mkdir(mode=0o755, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.run(_which("munged") or "munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                 f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                 f"--log-file={self.root / 'log' / 'munged.log'}")
        self._wait(lambda: self.munge_socket.exists(), 20, "munged did not create its socket")

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:.0f} s; logs: {self.log_tail()}")
            time.sleep(0.25)

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False, timeout=20)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def _start_slurm(self, cgroup: bool, timeout: float) -> None:
        self._write_config(cgroup)
        for d in ("state", "spool"):
            shutil.rmtree(self.root / d, ignore_errors=True)
            (self.root / d).mkdir()
        self.run(_which("slurmctld") or "slurmctld", "-f", str(self.conf))
        self._wait(lambda: self.run("scontrol", "ping", check=False, timeout=20).stdout.count("UP") >= 1, timeout,
                   "slurmctld did not answer")
        self.run(_which("slurmd") or "slurmd", "-f", str(self.conf), "-N", self.node)
        self._wait(lambda: self.node_state() == "idle", timeout, f"node {self.node} did not become idle")

    def start(self, timeout: float = 60) -> "LocalSlurm":
        (self.root / "log").mkdir(parents=True, exist_ok=True)
        self._start_munge()
        want = self.want_cgroup
        if want is None:
            setting = os.environ.get(CGROUP_ENV, "auto").strip().lower()
            want = None if setting == "auto" else setting not in ("0", "no", "off", "false")
        usable, self.cgroup_note = _cgroup_v1_usable()
        if want is False:
            self.cgroup_note = f"cgroups not tried ({CGROUP_ENV}=0)"
        tries = [True, False] if (want is None and usable) else [bool(want)]
        for i, cgroup in enumerate(tries):
            try:
                self._start_slurm(cgroup, timeout)
                break
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                self._stop_slurm()
                if i == len(tries) - 1:
                    self.stop()
                    raise
                self.cgroup_note = f"slurmd with task/cgroup did not start ({str(exc)[:300]}); linuxproc + task/none"
        self._spawn_watchdog(os.getpid())
        return self

    # -- jobs ----------------------------------------------------------------------------
    def records(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` records: one per array task (or the pending rest of an array)."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False, timeout=30)
        return parse_records(proc.stdout) if proc.returncode == 0 else []

    def tasks(self, array_id: str) -> dict[int, dict[str, str]]:
        """The array's tasks by task id (only those that have a record of their own)."""
        out = {}
        for rec in self.records(array_id):
            if rec.get("ArrayTaskId", "").isdigit():
                out[int(rec["ArrayTaskId"])] = rec
        return out

    def queued(self, ids: Iterable[str]) -> list[dict[str, str]]:
        """The jobs of ``ids`` still pending, running or completing (``squeue``)."""
        ids = [str(i) for i in ids]
        proc = self.run("squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r", check=False, timeout=30)
        rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
        return [{"id": r[0], "state": r[1], "reason": r[2]} for r in rows if len(r) == 3]

    def wait(self, ids: Iterable[str], timeout: float, poll: Optional[Callable[[], None]] = None) -> None:
        """Until none of ``ids`` is in the queue (``poll`` is called every round)."""
        ids = list(ids)
        deadline = time.monotonic() + timeout
        while True:
            if poll is not None:
                poll()
            if not self.queued(ids):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {ids} still queued after {timeout:.0f} s: {self.queued(ids)}")
            time.sleep(0.5)

    # -- stop ----------------------------------------------------------------------------
    def _daemon_pids(self) -> list[int]:
        pids = []
        for f in (self.root / "slurmd.pid", self.root / "slurmctld.pid"):
            try:
                pids.append(int(f.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        return pids

    def _stop_slurm(self) -> None:
        if self.conf.exists():
            try:
                if self.run("scontrol", "ping", check=False, timeout=10).returncode == 0:
                    self.run("scancel", "--quiet", "--full", "--user", "root", check=False, timeout=20)
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline and self.run("squeue", "-h", check=False,
                                                                    timeout=10).stdout.strip():
                        time.sleep(0.5)
                    self.run("scontrol", "shutdown", check=False, timeout=20)
            except subprocess.TimeoutExpired:
                pass
        _terminate(self._daemon_pids())
        for f in ("slurmd.pid", "slurmctld.pid"):
            (self.root / f).unlink(missing_ok=True)
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        if not self.node:
            return
        for controller in CGROUP_CONTROLLERS:
            top = CGROUP_ROOT / controller / f"slurm_{self.node}"
            if top.is_dir():
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    _rmdir(d)
                _rmdir(top)

    def stop(self) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged, remove the node's cgroups
        and (unless ``SPINEPS_SLURM_KEEP=1``) the folder. Safe to call twice."""
        self._stop_slurm()
        try:
            munge_pid = int((self.root / "munge" / "munged.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            munge_pid = None
        if munge_pid:
            _terminate([munge_pid])
        if self._watchdog is not None and self._watchdog.poll() is None:
            self._watchdog.terminate()
            self._watchdog.wait(timeout=10)
        if os.environ.get(KEEP_ENV) != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def _spawn_watchdog(self, owner: int) -> None:
        """A detached process that stops the cluster if ``owner`` (the test session) dies first."""
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "tests.slurm_cluster", "watchdog", str(self.root), str(owner)],
            cwd=Path(__file__).resolve().parents[1], start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @classmethod
    def attach(cls, root: Path) -> "LocalSlurm":
        """The cluster described by ``root/cluster.json`` (for stop/watchdog)."""
        state = json.loads((Path(root) / "cluster.json").read_text())
        c = cls(Path(root), cpus=1, memory_mb=1)
        c.node, c.cgroup = state["node"], state["cgroup"]
        return c


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _terminate(pids: list[int], grace: float = 15) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _main(argv: list[str]) -> int:
    if argv[:1] == ["start"]:
        reason = cluster_or_skip_reason()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        c = LocalSlurm().start()
        print(f"export SLURM_CONF={c.conf}  # node {c.node}, {c.cpus} CPUs, {c.memory_mb} MB, "
              f"{'cgroup' if c.cgroup else 'linuxproc + task/none'}; stop: python -m tests.slurm_cluster stop {c.root}")
        if c._watchdog is not None:  # no owner to watch by hand
            c._watchdog.terminate()
        return 0
    if argv[:1] == ["stop"] and len(argv) == 2:
        LocalSlurm.attach(Path(argv[1])).stop()
        return 0
    if argv[:1] == ["watchdog"] and len(argv) == 3:
        root, owner = Path(argv[1]), int(argv[2])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the owner's own stop() ends the watchdog
        while _pid_alive(owner) and root.exists():
            time.sleep(1)
        if root.exists():
            LocalSlurm.attach(root).stop()
        return 0
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
