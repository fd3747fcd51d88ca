"""The package's shape: imports point one way (bench -> core), no cycles, and the contract module is stdlib-only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import iltm
import iltm_bench

CORE = Path(iltm.__file__).parent
BENCH = Path(iltm_bench.__file__).parent


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                   # from . import x / from .x import y
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                if node.module:
                    found.add(f"{base}.{node.module}")
                else:
                    found.update(f"{base}.{alias.name}" for alias in node.names)
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    modules = {f"{package}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imported_modules(path, package) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, trail + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                return cycle
    return None


def test_the_core_never_imports_the_bench_nor_slicer():
    for path in CORE.glob("*.py"):
        imports = imported_modules(path, "iltm")
        assert not {m for m in imports if m.split(".")[0] in ("iltm_bench", "slicer", "qt", "ctk", "vtk")}, path.name


def test_no_import_cycles_in_the_core_or_the_bench():
    core = import_graph(CORE, "iltm")
    assert "iltm.demo" in core["iltm.commands"] and "iltm.train" in core["iltm.demo"]   # the graph sees lazy imports
    assert find_cycle(core) is None, find_cycle(core)
    bench = import_graph(BENCH, "iltm_bench")
    assert find_cycle(bench) is None, find_cycle(bench)
    # The check itself finds a cycle when there is one.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_run_folder_contract_needs_the_standard_library_only():
    code = ("import sys; import iltm.layout; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'torch', 'yaml', 'SimpleITK', 'monai')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_core_runs_on_the_python_of_slicer_5_8():
    """Slicer 5.8 ships Python 3.9 and runs the core in its own Python. Annotations are not evaluated at run time
    (``from __future__ import annotations``) except the config's, which :func:`iltm.config.validate` reads."""
    def minimum(*args):
        result = subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "--no-tips",
                                 "--violations", "-t=3.9-", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    minimum(str(CORE))
    minimum("--eval-annotations", "--feature", "union-types", str(CORE / "config.py"))
    for path in CORE.glob("*.py"):
        assert "from __future__ import annotations" in path.read_text(encoding="utf-8") or \
            path.name in ("__init__.py", "__main__.py"), path.name


def test_the_bench_subcommand_survives_a_stale_metadata_folder_earlier_on_the_path(tmp_path, monkeypatch):
    """A source checkout on ``sys.path`` can hold an old ``iltm.egg-info`` without the plugin's entry point;
    ``importlib.metadata.entry_points()`` keeps only the first distribution of a name and would lose it."""
    from iltm.cli import _parser

    stale = tmp_path / "iltm.egg-info"
    stale.mkdir()
    (stale / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: iltm\nVersion: 0.0.1\n", encoding="utf-8")
    (stale / "entry_points.txt").write_text("[console_scripts]\niltm = iltm.cli:main\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    subcommands = next(a for a in _parser()._actions if a.dest == "command").choices
    assert "benchmark" in subcommands and "detect" in subcommands
