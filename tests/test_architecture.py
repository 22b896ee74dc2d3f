"""The house's rules, checked on the source: arrows between folders go one way, database
drivers stay in the storage floor, and no room grows past what one reader can hold.

Read with ``ast`` (every import, including those inside functions, which hide cycles
from a reader but not from Python), so a change that breaks a rule fails here with the
modules that break it named, not in a later review."""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "collector")
DRIVERS = ("sqlite3", "psycopg", "psycopg_pool")
# The one module allowed past the size rule: the OpenAPI document is data.
MAX_LINES = 600
DATA_MODULES = {"collector/web/openapi.py"}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if p.name != "__main__.py")  # an entry point: nothing imports it


def _folder_of(parts: list[str]) -> str | None:
    """The folder (dotted) a dotted import name lands in, or None outside the tree."""
    while parts and not ((ROOT.joinpath(*parts).with_suffix(".py")).exists()
                         or ROOT.joinpath(*parts).is_dir()):
        parts = parts[:-1]
    if not parts:
        return None
    return ".".join(parts) if ROOT.joinpath(*parts).is_dir() else ".".join(parts[:-1])


def _imports(path: Path) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


def _arrows() -> dict[tuple[str, str], str]:
    """(from folder, to folder) -> one place that draws the arrow."""
    arrows: dict[tuple[str, str], str] = {}
    for path in _modules():
        rel = path.relative_to(ROOT)
        here = ".".join(rel.parts[:-1])
        for name, line in _imports(path):
            if name.split(".")[0] not in PACKAGES:
                continue
            there = _folder_of(name.split("."))
            if there is not None and there != here:
                arrows.setdefault((here, there), f"{rel}:{line} imports {name}")
    return arrows


def test_no_folder_imports_a_folder_that_imports_it_back() -> None:
    """The folder graph is acyclic: every cycle (of any length) is named with one import
    that draws each of its arrows."""
    arrows = _arrows()
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in arrows:
        graph[a].add(b)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    named = [" -> ".join(c) + ": " + "; ".join(arrows[(a, b)] for a, b in itertools.pairwise(c))
             for c in cycles]
    assert named == []


def test_the_collector_top_level_is_vocabulary_and_the_agent_never_imports_it() -> None:
    """collector/*.py import no collector folder (they are what every folder stands on);
    nothing in agent/ imports collector (probes install without the server), with one
    named exception: ``bbprobe verify`` and ``bbprobe run --evidence``
    (agent/app/evidence_cmd.py) check and write evidence bundles with the collector's own
    code (a certificate is recomputed with the same pure code that made it, issue 27),
    imported inside those two commands only, and only from the modules listed here."""
    wrong = sorted(where for (a, b), where in _arrows().items()
                   if (a == "collector" and b.startswith("collector.")))
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith("agent/"):
            continue
        for name, line in _imports(path):
            if name.split(".")[0] != "collector" or name == "collector":
                continue  # ("from collector import x" is listed as collector.x too)
            allowed = rel == EVIDENCE_COMMANDS and any(
                name == m or name.startswith(m + ".") for m in EVIDENCE_IMPORTS)
            if not allowed:
                wrong.append(f"{rel}:{line} imports {name}")
    assert wrong == []


EVIDENCE_COMMANDS = "agent/app/evidence_cmd.py"
EVIDENCE_IMPORTS = ("collector.evidence", "collector.cli.verify", "collector.safetext")


def test_database_drivers_stay_in_the_storage_floor() -> None:
    """Only collector/storage/ imports sqlite3 or psycopg: every other module sees the
    store's own errors (collector/errors.py), so a driver change touches one floor."""
    leaks = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in _modules()
             if not path.relative_to(ROOT).as_posix().startswith("collector/storage/")
             for name, line in _imports(path) if name.split(".")[0] in DRIVERS]
    assert leaks == []


def test_no_module_over_600_lines() -> None:
    """One job per module: none over 600 lines (the OpenAPI document, data, aside)."""
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in _modules()
           if p.relative_to(ROOT).as_posix() not in DATA_MODULES
           and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert big == []
