"""No import circles among the modules of runtime/.

Every import of one runtime module by another counts: at module level, under ``if TYPE_CHECKING:`` and
inside functions (an import moved into a function to dodge a circle is still a circle). Read from the
source with ``ast``, so nothing is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
PACKAGE = "sdrt.runtime"

# Being removed now by the pipeline rewrite (runtime/pipeline.py and runtime/refiner.py); drop this once it has
# landed, so that the circle cannot come back.
KNOWN: set[tuple[str, str]] = set()  # none: keep it so


def runtime_imports(source: str, modules: set[str]) -> set[str]:
    """The runtime modules that ``source`` (a module of runtime/) imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
            elif node.level == 0 and node.module and (node.module + ".").startswith(PACKAGE + "."):
                base = node.module[len(PACKAGE) + 1:]
            else:
                continue
            if base:
                found.add(base.split(".")[0])
            else:  # from . import a, b
                found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE + "."):
                    found.add(a.name[len(PACKAGE) + 1:].split(".")[0])
    return found & modules


def import_graph(folder: Path = RUNTIME) -> dict[str, set[str]]:
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    return {m: runtime_imports((folder / f"{m}.py").read_text(), modules) - {m} for m in sorted(modules)}


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_parser_sees_every_kind_of_import() -> None:
    modules = {"a", "b", "c", "d", "e", "f"}
    src = (
        "from typing import TYPE_CHECKING\n"
        "from .a import x\n"
        "from . import b, numpy_thing\n"
        "from sdrt.runtime.c import y\n"
        "import sdrt.runtime.d\n"
        "if TYPE_CHECKING:\n"
        "    from .e import z\n"
        "def later():\n"
        "    from .f import w\n"
        "from sdrt.export import g\n"
        "import numpy\n"
    )
    assert runtime_imports(src, modules) == modules


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_holds_the_imports_that_exist() -> None:
    graph = import_graph()
    assert "ort_loop" in graph["ort_backend"] and "trt_loop" in graph["trt_backend"]
    assert "ort_backend" in graph["backends"]  # imported inside a function
    assert "refiner" in graph["pipeline"] and "pipeline" not in graph["refiner"]  # the refiner: public stages


def test_no_import_circles_in_runtime() -> None:
    graph = {m: {d for d in deps if (m, d) not in KNOWN} for m, deps in import_graph().items()}
    assert cycles(graph) == []
