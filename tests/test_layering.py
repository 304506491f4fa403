"""The structure of ``spineps/``, read with ``ast`` (nothing is imported):

- the import graph (module level, inside functions, under ``TYPE_CHECKING``) has no cycle;
- no module imports from a layer above its own (``LAYERS``, lowest first; a module imports
  from its own layer and the layers below it);
- no function on the participant and group path is longer than ``MAX_FUNCTION_LINES``.

A new module needs a place in ``LAYERS`` (the test names the ones without one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spineps"

#: the layers, lowest first: (name, modules or packages). The data flow of a run: labels and
#: errors -> grids -> the dataset's files -> model folders -> the two phases -> post-processing
#: -> level names -> measurements -> the pipeline that chains them -> the runs -> the CLI.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("spineps", "spineps.errors", "spineps.labels", "spineps.fsutil", "spineps.logging_setup",
                    "spineps.settings")),
    ("geometry", ("spineps.geometry",)),
    ("bids", ("spineps.bids",)),  # scans in, derivative names and sidecars out
    ("models", ("spineps.models",)),  # the model-folder contract, where models come from, devices, engines
    ("phases", ("spineps.semantic", "spineps.instance")),
    ("postprocess", ("spineps.postprocess",)),
    ("naming", ("spineps.labeling",)),
    ("measure", ("spineps.measure",)),
    ("pipeline", ("spineps.loading", "spineps.pipeline", "spineps.resources")),
    ("runs", ("spineps.methods", "spineps.failures", "spineps.participant", "spineps.group", "spineps.evaluate",
              "spineps.synth", "spineps.training")),
    ("cli", ("spineps.cli", "spineps.evaluate.cli", "spineps.training.cli")),
)

#: longest function allowed on the participant and group path (lines, decorators excluded)
MAX_FUNCTION_LINES = 60
#: the tools beside the participant path (phantoms, training, evaluation): not held to it
OFF_PATH = ("spineps.synth", "spineps.training", "spineps.evaluate")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _within(module: str, key: str) -> bool:
    return module == key or (key != "spineps" and module.startswith(key + "."))


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of the most specific entry holding ``module`` (-1: none)."""
    best, best_len = -1, -1
    for i, (_name, keys) in enumerate(LAYERS):
        for key in keys:
            if _within(module, key) and len(key) > best_len:
                best, best_len = i, len(key)
    return best


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> set[str]:
    """The ``spineps`` modules that ``module`` imports anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _within(a.name, "spineps") or a.name == "spineps")
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if not (target == "spineps" or target.startswith("spineps.")):
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES)
    found.discard(module)
    return {m for m in found if m in MODULES}


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if layer_of(m) < 0] == []


def test_no_import_runs_up_a_layer() -> None:
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in GRAPH.items() for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert upward == []


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (empty when there is none), by depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_import_graph_has_no_cycle() -> None:
    assert _cycle(GRAPH) == []


def test_the_checker_sees_cycles_and_upward_imports(tmp_path: Path) -> None:
    """The checks themselves: a cycle and an upward import are found."""
    looped = {**GRAPH, "spineps.labels": {*GRAPH["spineps.labels"], "spineps.pipeline"}}
    cycle = _cycle(looped)
    assert cycle and cycle[0] == cycle[-1] and "spineps.labels" in cycle
    assert layer_of("spineps.pipeline") > layer_of("spineps.labels")
    pkg = tmp_path / "spineps" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .. import labels\nfrom ..pipeline import segment_scan\n")
    node = ast.parse((pkg / "__init__.py").read_text()).body[1]
    assert isinstance(node, ast.ImportFrom)
    assert _resolve("spineps.sub", pkg / "__init__.py", node) == "spineps.pipeline"


def _long_functions() -> list[str]:
    out = []
    for module, path in MODULES.items():
        if any(_within(module, off) for off in OFF_PATH):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{module}.{node.name} ({n} lines)")
    return out


def test_no_long_function_on_the_participant_and_group_path() -> None:
    assert _long_functions() == []


@pytest.mark.parametrize("module", ["spineps.pipeline", "spineps.postprocess.vertebrae", "spineps.loading"])
def test_the_layers_of_the_redesign(module: str) -> None:
    """The rooms of the redesign: the pipeline chains, the vertebra helpers serve every later
    stage, the segmenters are built above the phases."""
    assert layer_of(module) >= 0
    if module == "spineps.pipeline":
        assert {"spineps.postprocess.consistency", "spineps.postprocess.discs", "spineps.labeling.levels",
                "spineps.measure.scan"} <= GRAPH[module]
    if module == "spineps.postprocess.vertebrae":
        users = {m for m, deps in GRAPH.items() if module in deps}
        assert {"spineps.postprocess.consistency", "spineps.postprocess.discs", "spineps.labeling.levels",
                "spineps.measure.morphometry", "spineps.measure.figures"} <= users
    if module == "spineps.loading":
        assert {"spineps.semantic.predict", "spineps.instance.segmenter"} <= GRAPH[module]
        assert not any(d.startswith(("spineps.semantic", "spineps.instance"))
                       for d in GRAPH["spineps.models.registry"])
