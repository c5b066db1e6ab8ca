"""The shape of the code: layers that point one way, and files and functions that fit on a few screens.

Every import of every module (top-level or inside a function: a lazy import is still an arrow) is read
from the source. The layers, bottom up: `errors`; `config` and `format` (no torch); `distributed`,
`attention` and `models` (shared by both stages); stage 1 (`capture`) and stage 2 (`train`), which never
import each other; the on-policy loop (`onpolicy`), which runs both; the CLI (`stages`).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = sorted(REPO.glob("pipeline/**/*.py")) + sorted(REPO.glob("stages/*.py"))
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # pipeline.format.reader.Cache -> pipeline.format.reader
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _third_party(path: Path, top_level: bool = False) -> set[str]:
    names = set()
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(name, path, set(sources)) for name, path in sources.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, if there is any (depth-first search for a back edge)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_walk_sees_the_arrows_it_checks(graph):
    """The checks below are only as good as the import walk: it must see relative, lazy and package imports."""
    assert "pipeline.train.terms" in graph["pipeline.train.recipe"]  # from . import terms
    assert "pipeline.models" in graph["pipeline.train.heldout"]  # from .. import distributed, models
    assert "pipeline.capture.documents" in graph["stages.cache"]  # an import inside a function
    assert "pipeline.format.reader" in graph["pipeline.format"]  # a package's __init__
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle(graph):
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_stage_two_never_imports_stage_one_nor_the_other_way(graph):
    for name, deps in graph.items():
        if name.startswith("pipeline.train"):
            assert not {d for d in deps if d.startswith("pipeline.capture")}, name
        if name.startswith("pipeline.capture"):
            assert not {d for d in deps if d.startswith("pipeline.train")}, name
        if name.startswith(("pipeline.capture", "pipeline.train")):  # the loop stands on both stages, not under
            assert not {d for d in deps if d.startswith("pipeline.onpolicy")}, name


def test_the_floors_import_no_stage(graph):
    floor = ["pipeline.errors", "pipeline.config", "pipeline.overrides", "pipeline.models", "pipeline.distributed",
             "pipeline.attention"]
    floor += [n for n in graph if n.startswith("pipeline.format")]
    for name in floor:
        climbing = {d for d in graph[name] if d.startswith(("pipeline.capture", "pipeline.train", "stages"))}
        assert not climbing, f"{name} imports {climbing}"
    assert graph["pipeline.config"] <= {"pipeline.errors", "pipeline.overrides"}
    assert graph["pipeline.overrides"] <= {"pipeline.errors"}
    assert graph["pipeline.errors"] == set()


def test_the_format_needs_no_training_stack():
    for path in sorted(REPO.glob("pipeline/format/*.py")):  # transformers only to load a cache's tokenizer, on use
        heavy = (_third_party(path) & {"torch"}) | (_third_party(path, top_level=True) & {"transformers", "datasets"})
        assert not heavy, f"{path.name} imports {heavy}"
    code = ("import sys; import pipeline.format as f; from pipeline.config import load_config, TeacherCacheConfig; "
            "from pipeline.student_config import StudentRunConfig; "
            "load_config(StudentRunConfig, 'data/configs/student.toml'); "
            "load_config(TeacherCacheConfig, 'data/configs/teacher_cache.toml'); "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'torch or transformers imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_files_and_functions_fit_on_a_few_screens():
    too_long = []
    for name, path in _sources().items():
        src = path.read_text()
        if len(src.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {n} lines")
    assert not too_long, "; ".join(too_long)


CONVENTIONAL_ALIASES = {"numpy": "np", "pyarrow": "pa", "pyarrow.parquet": "pq", "pyarrow.compute": "pc",
                        "torch.nn.functional": "F"}


def test_no_private_names_across_modules_and_no_one_letter_module_aliases():
    """`losses._acc`, `data_mod._pad_id`, `from x import _y` in library or benchmark code, and aliases such as
    `import losses as L` (L is the sequence length everywhere else) are refused; tests may reach private helpers."""
    found = []
    for path in sorted(REPO.glob("pipeline/**/*.py")) + sorted(REPO.glob("stages/*.py")) + \
            sorted(REPO.glob("benchmarks/*.py")) + sorted(REPO.glob("tests/*.py")):
        library = path.parent.name != "tests"
        modules = set()  # names bound to project modules in this file
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            project = isinstance(node, ast.ImportFrom) and ((node.module or "").startswith(("pipeline", "stages"))
                                                            or bool(node.level))
            for a in node.names:
                if a.asname is not None and len(a.asname) <= 2 and CONVENTIONAL_ALIASES.get(a.name) != a.asname:
                    found.append(f"{path.name}: import {a.name} as {a.asname}")
                if isinstance(node, ast.ImportFrom) and project and a.name.startswith("_") and library:
                    found.append(f"{path.name}: imports private {node.module}.{a.name}")
                if isinstance(node, ast.ImportFrom) and project or a.name.startswith(("pipeline", "stages")):
                    modules.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(tree):
            if library and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in modules and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{path.name}: reaches private {node.value.id}.{node.attr}")
    assert not found, "; ".join(found)


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_every_benchmark_still_imports(script):
    """A benchmark is documentation's evidence: a refactor that breaks its imports must fail here, not when a
    figure is next remeasured."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", REPO / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # module level only: main() runs under __main__
    assert callable(getattr(module, "main", None)), f"{script} has no main()"


def _diagram_arrows(subgraph: str) -> tuple[set[str], set[tuple[str, str]]]:
    """(nodes, arrows) of one subgraph of the architecture page's package diagram; `a --> b --> c` is two arrows."""
    page = (REPO / "docs/architecture.md").read_text()
    block = page[page.index(f'subgraph {subgraph}['):]
    block = block[: block.index("\n  end")]
    nodes, arrows = set(), set()
    for line in block.splitlines()[1:]:
        chain = [part.strip() for part in line.split("-->")]
        nodes |= set(chain)
        arrows |= set(zip(chain, chain[1:]))
    return nodes, arrows


@pytest.mark.parametrize("stage,package", [("stage1", "capture"), ("stage2", "train")])
def test_the_architecture_diagram_shows_every_module_and_only_real_arrows(stage, package, graph):
    """docs/architecture.md draws each stage's modules: none is missing, and every arrow a --> b is an import of
    a by b (the diagram may leave arrows out, never draw one the code does not have)."""
    nodes, arrows = _diagram_arrows(stage)
    modules = {p.stem for p in (REPO / "pipeline" / package).glob("*.py") if p.stem != "__init__"}
    assert modules - nodes == set(), f"modules missing from the {stage} diagram"
    assert nodes - modules == set(), f"nodes of the {stage} diagram that are no module"
    false = [(a, b) for a, b in arrows if f"pipeline.{package}.{a}" not in graph[f"pipeline.{package}.{b}"]]
    assert not false, f"arrows the code does not have: {false}"
