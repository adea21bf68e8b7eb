"""caffe-compat's modules import each other one way: no import cycles.

A cycle hidden behind a function-level import is still a cycle: the two modules cannot be
understood, tested or reused apart.  So every ``import`` counts, wherever it stands (module
level, function, class body), except those under ``if TYPE_CHECKING:``, which never run.
``from package import name`` counts as importing ``package.name`` when that is a module,
else ``package``.  Importing a module is not counted as importing the packages above it
(Python runs their ``__init__`` first, but a package importing its own modules is its job).

The graph is read from the sources (ast), with the folders ``setup.cfg`` maps onto
subpackages (``layers/`` -> ``caffe_compat.layers`` ...).
"""
from __future__ import annotations

import ast
import configparser
import functools
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

from conftest import ROOT

#: imports known to close a cycle, not yet restructured away, each with the cycle it closes
#: and the way out.  The test ignores these edges and requires the rest of the graph to be
#: acyclic.  Keep it short: break a cycle rather than add a line here.
KNOWN_BACK_EDGES: Dict[Tuple[str, str], str] = {
}

Edge = Tuple[str, str]


def _package_dirs() -> Dict[str, Path]:
    """Package name -> folder, from setup.cfg's ``package_dir``."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    out = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, _, folder = (x.strip() for x in line.partition("="))
        out[name] = ROOT / folder
    return out


@functools.lru_cache(maxsize=None)
def _modules() -> Dict[str, Path]:
    """Every module and package of caffe_compat: dotted name -> file."""
    dirs = _package_dirs()
    mapped = {d.resolve() for d in dirs.values()}
    mods: Dict[str, Path] = {}
    for pkg, folder in dirs.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if any((folder / Path(*rel.parts[:i])).resolve() in mapped and i
                   for i in range(1, len(rel.parts))):
                continue  # a folder mapped onto another package name is read under that name
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([pkg] + parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.stmt]:
    """Every import statement, skipping ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _target(name: str, mods: Dict[str, Path]) -> str:
    """The innermost known module ``name`` means ('' when not caffe_compat's)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


@functools.lru_cache(maxsize=None)
def import_graph() -> Dict[Edge, List[str]]:
    """(importer, imported) -> the ``file:line`` of each import statement making the edge."""
    mods = _modules()
    edges: Dict[Edge, List[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parent = name.split(".") if is_pkg else name.split(".")[:-1]
                    parent = parent[:len(parent) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                t = _target(t, mods)
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if t and t != name and where not in edges.get((name, t), []):
                    edges.setdefault((name, t), []).append(where)
    return edges


def cycles(edges: Dict[Edge, List[str]]) -> List[Tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    succ: Dict[str, Set[str]] = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)
        succ.setdefault(b, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[Tuple[str, ...]] = []
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(tuple(sorted(comp)))
    return sorted(found)


def _describe(comp: Tuple[str, ...], edges: Dict[Edge, List[str]]) -> str:
    inside = set(comp)
    lines = [f"cycle among {len(comp)} modules: {', '.join(comp)}"]
    for (a, b), where in sorted(edges.items()):
        if a in inside and b in inside:
            lines.append(f"    {a} -> {b}  ({', '.join(where)})")
    return "\n".join(lines)


def test_the_graph_sees_the_tree():
    edges = import_graph()
    mods = _modules()
    assert {"caffe_compat.net", "caffe_compat.layers.registry", "caffe_compat.cli.main",
            "caffe_compat.solver.solver", "caffe_compat.weights.formats"} <= set(mods)
    assert ("caffe_compat.net", "caffe_compat.fuse") in edges
    assert ("caffe_compat.weights.formats", "caffe_compat.weights.hdf5") in edges


def test_no_import_cycles():
    edges = import_graph()
    rest = {e: w for e, w in edges.items() if e not in KNOWN_BACK_EDGES}
    found = cycles(rest)
    assert not found, "\n\n".join(_describe(c, rest) for c in found)


def test_known_back_edges_still_exist():
    """A documented back edge that is gone (the cycle was broken) leaves this list."""
    edges = import_graph()
    assert [e for e in KNOWN_BACK_EDGES if e not in edges] == []


def test_cycle_finder_finds_cycles_and_type_checking_imports_do_not_count():
    edges = {("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): [], ("d", "e"): []}
    assert cycles(edges) == [("a", "b", "c")]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n"
                     "    import y\ndef f():\n    import z\n")
    assert [n.names[0].name for n in _imports(tree) if isinstance(n, ast.Import)] == ["y", "z"]
