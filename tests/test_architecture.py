"""The boundaries of docs/architecture.md, checked over the import graph of llmstack's source.

Every import statement counts, function-level ones included: a hidden import cycle or a worker that reaches
into the launcher is as real inside a function as at the top of a module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "llmstack"
MAX_MODULE_LINES = 450


def _modules(root: Path) -> dict[str, Path]:
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path = SOURCE) -> dict[str, set[str]]:
    """module -> the llmstack modules it imports (a name inside a module counts as that module)."""
    modules = _modules(root)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*kept, base] if base else kept)
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                found = owner(target)
                if found is not None and found != module:
                    graph[module].add(found)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_checker_finds_a_cycle_and_its_members(tmp_path: Path) -> None:
    package = tmp_path / "llmstack"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from llmstack import b\n")  # function-level
    (package / "b.py").write_text("from llmstack.a import f\n")
    (package / "c.py").write_text("import llmstack.a\n")
    assert import_cycles(import_graph(package)) == [["llmstack.a", "llmstack.b"]]


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert import_cycles(graph) == []


# (importer, whether a target is forbidden to it): the boundaries of docs/architecture.md.
FORBIDDEN = [
    # Workers are separate programs: nothing of the launcher (llmstack.pdeathsig is a stdlib-only leaf).
    ("llmstack.workers", lambda t: not _within(t, "llmstack.workers") and t != "llmstack.pdeathsig"),
    # The benchmark client knows only HTTP and the OpenAI API: usable against any server, without llmstack.
    ("llmstack.bench", lambda t: not _within(t, "llmstack.bench")),
    # The supervisor runs a LaunchPlan and knows no engine, config, phase or worker.
    (
        "llmstack.serving",
        lambda t: any(
            _within(t, p)
            for p in (
                "llmstack.engines",
                "llmstack.config",
                "llmstack.validation",
                "llmstack.bench",
                "llmstack.phases",
                "llmstack.workers",
            )
        ),
    ),
    # Engines plan; they never start processes: of serving they see only the plan type.
    ("llmstack.engines", lambda t: _within(t, "llmstack.serving") and t != "llmstack.serving.plan"),
    # Composition knows nothing of what runs.
    (
        "llmstack.config",
        lambda t: any(_within(t, p) for p in ("llmstack.serving", "llmstack.run", "llmstack.grid")),
    ),
]


@pytest.mark.parametrize(("importer", "forbidden"), FORBIDDEN, ids=[importer for importer, _ in FORBIDDEN])
def test_boundary(graph: dict[str, set[str]], importer: str, forbidden: Callable[[str], bool]) -> None:
    crossings = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if _within(module, importer)
        for target in targets
        if forbidden(target)
    )
    assert crossings == []


CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_linter_keeps_every_contract() -> None:
    """import-linter ([tool.importlinter] in pyproject.toml) is the enforcer of the contracts."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists():
        pytest.fail(f"{lint_imports} is missing: pip install 'import-linter>=2' (the test extra)")
    done = subprocess.run(
        [str(lint_imports), "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(CONTRACTS)} kept, 0 broken" in done.stdout


@pytest.mark.parametrize("contract", CONTRACTS, ids=[c["name"] for c in CONTRACTS])
def test_contract_is_not_vacuous(graph: dict[str, set[str]], contract: dict[str, object]) -> None:
    """Every contract constrains code that imports something: its source modules exist and import llmstack."""
    sources = contract["source_modules"]
    assert isinstance(sources, list)
    for source in sources:
        members = [m for m in graph if _within(m, source)]
        assert members, f"{source} does not exist"
        assert any(graph[m] for m in members), (
            f"{source} imports nothing of llmstack: the contract is vacuous"
        )


def test_no_module_over_the_size_limit() -> None:
    """No module over MAX_MODULE_LINES lines, unless its docstring has a line starting with "Size:" (why)."""
    oversized = []
    for path in sorted(SOURCE.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines <= MAX_MODULE_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(text, str(path))) or ""
        if not any(line.strip().startswith("Size:") for line in docstring.splitlines()):
            oversized.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert oversized == []


def test_every_lazy_registry_entry_imports() -> None:
    # The engine and phase tables name their modules as strings (imported when picked), which neither
    # import-linter nor the graph above sees: a renamed module must fail here, not at a user's run.
    from llmstack.engines import _ENGINES, ENGINE_SCHEMAS
    from llmstack.phases.registry import PHASES, benchmark_schemas

    for registry in (_ENGINES, ENGINE_SCHEMAS, PHASES):
        loaded = dict(registry.items())
        assert sorted(loaded) == registry.names() and all(loaded.values())
    assert sorted(benchmark_schemas()) == sorted(["none", *PHASES.names()])
    assert ENGINE_SCHEMAS.names() == _ENGINES.names()


def test_a_dry_run_imports_only_what_it_picked() -> None:
    # A repeated benchmark=none dry run (compose cache warm: Hydra, which needs every schema, does not
    # run) imports no phase module and no engine it did not pick; docs/performance.md's launch figures
    # depend on it.
    code = (
        "import runpy, sys\n"
        "sys.argv = ['llmstack', 'device=cpu', 'engine=lightweight', 'benchmark=none', 'dry_run=true']\n"
        "try:\n    runpy.run_module('llmstack', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('MODULES', ' '.join(m for m in sys.modules if m.startswith('llmstack.')))"
    )
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(out.stdout.rpartition("MODULES ")[2].split())
    assert "llmstack.engines.lightweight" in loaded
    assert not {m for m in loaded if m.startswith(("llmstack.engines.vllm", "llmstack.phases.online"))}
    assert not loaded & {"llmstack.phases.runner", "llmstack.phases.common", "llmstack.bench.http"}
