"""The house's layering, checked: the contracts in pyproject.toml ([tool.importlinter]) hold,
the package has no import cycle, and a lower layer importing a higher one fails the check.

Layers, bottom-up (docs/architecture.md): files, config, tls, rotation, http, pinning, ops,
serve, then acme and dev side by side, then cli. The contracts are run with import-linter's own
command, as a developer would run it (`.venv/bin/lint-imports`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import grimp
import pytest

REPO: Final = Path(__file__).resolve().parent.parent
LINT_IMPORTS: Final = Path(sys.executable).with_name("lint-imports")
# lint-imports builds the whole graph once (a second or two here); a hung run is a bug.
LINT_TIMEOUT: Final = 120.0


def lint_imports(cwd: Path, *, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the repository's contracts, importing `dualproxy` from `pythonpath`
    (the installed package when None)."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=LINT_TIMEOUT,
        check=False,
    )


def test_the_layer_contracts_hold() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("module", "imported"),
    [
        ("config/schema.py", "dualproxy.serve.server"),  # the bottom reaching for the top
        ("http/exchange.py", "dualproxy.ops.evidence"),  # the pure exchange reaching for ops
        ("serve/server.py", "dualproxy.acme.issuer"),  # the handshake path importing ACME
        ("ops/admin.py", "dualproxy.dev.control"),  # production built from the dev bench
        ("rotation/policy.py", "socket"),  # the pure core doing I/O
        ("http/exchange.py", "trio"),  # the sans-IO exchange on an event loop
    ],
)
def test_an_import_against_the_layers_breaks_the_contracts(
    tmp_path: Path, module: str, imported: str
) -> None:
    """The contracts are not blanket passes: one forbidden import in a copy of the package,
    and lint-imports fails, naming it. Its twin is test_the_layer_contracts_hold."""
    copy = tmp_path / "dualproxy"
    shutil.copytree(REPO / "dualproxy", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\nimport {imported}  # noqa: E402\n")
    result = lint_imports(tmp_path, pythonpath=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout
    assert imported in result.stdout


def strongly_connected(graph: Mapping[str, set[str]]) -> Iterator[list[str]]:
    """Tarjan's strongly connected components of `graph` (module -> modules it imports),
    iteratively; a component of more than one module is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    yield sorted(component)


def import_graph() -> dict[str, set[str]]:
    graph = grimp.build_graph("dualproxy", cache_dir=None)
    return {
        module: graph.find_modules_directly_imported_by(module) - {module}
        for module in graph.modules
    }


def test_the_package_has_no_import_cycle() -> None:
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert cycles == []


@pytest.mark.parametrize(
    ("graph", "cycles"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], cycles: list[list[str]]) -> None:
    """Its negative twin: the finder above reports a cycle when there is one."""
    found = [c for c in strongly_connected(graph) if len(c) > 1]
    assert found == cycles
