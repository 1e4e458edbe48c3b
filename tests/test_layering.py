"""The import layering and the product-code rules, checked by parsing the
source with ``ast`` (nothing is imported or run).

- ``protocol/`` is sans-IO: it imports nothing from ``broker``,
  ``edge_agent`` or ``tether``, reads no clock and draws no randomness of
  its own (the caller passes time and random bytes in).
- The runtime layer both commands share (``tether/netio``,
  ``tether/settings.py``, ``tether/compat.py``, ``tether/pki.py``) imports
  only ``protocol`` and itself.
- Nothing outside ``tether/tools`` imports ``tether.tools``.
- No import cycles between product modules (module-level imports; imports
  inside functions and ``if TYPE_CHECKING:`` blocks do not count).
- ``broker/`` and ``edge_agent/`` do not import h2, hyperframe or h11.
- No ``.startswith(`` on reason or cause text in product code.

What exists today and is being removed is listed in the ``PENDING_*`` sets
by name; a new violation fails, and so does an entry that is no longer
needed (remove it).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("protocol", "broker", "edge_agent", "tether")
RUNTIME = ("tether.netio", "tether.settings", "tether.compat", "tether.pki")

#: Modules of broker/ and edge_agent/ that still import an HTTP library
#: directly. The engine work empties it.
PENDING_H2_EXEMPTIONS: frozenset[str] = frozenset()
HTTP_LIBRARIES = ("h2", "hyperframe", "h11")

#: (file, what) pairs of clocks and randomness protocol/ still draws itself.
PENDING_CLOCK_EXEMPTIONS: frozenset[tuple[str, str]] = frozenset()
CLOCKS = frozenset(
    {
        "time.monotonic",
        "time.monotonic_ns",
        "time.time",
        "time.time_ns",
        "time.perf_counter",
        "time.perf_counter_ns",
        "os.urandom",
        "os.getrandom",
    }
)
#: The one name of the random module protocol/ may use: the generator type
#: a caller passes in (its functions draw from the hidden module-level one).
RANDOM_ALLOWED = frozenset({"Random"})

#: (file, stripped line) pairs of today's ``startswith`` on reason text.
PENDING_STARTSWITH_EXEMPTIONS: frozenset[tuple[str, str]] = frozenset()
#: What text a ``startswith`` receiver holds when it is an outcome in words.
REASON_TEXT = re.compile(r"reason|cause|error|\bmsg\b|message|detail", re.IGNORECASE)


@attrs.frozen
class Import:
    module: str  # the imported module, absolute
    line: int
    module_level: bool  # at import time (not in a function or TYPE_CHECKING)


@attrs.frozen
class Source:
    path: str  # relative to the repository, with /
    module: str
    tree: ast.Module
    lines: tuple[str, ...]


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> list[Source]:
    found = []
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            text = path.read_text(encoding="utf-8")
            found.append(
                Source(
                    rel.as_posix(),
                    _module_name(rel),
                    ast.parse(text, filename=str(rel)),
                    tuple(text.splitlines()),
                )
            )
    return found


SOURCES = _sources()
MODULES = frozenset(s.module for s in SOURCES)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(src: Source, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = src.module.split(".")
    if not src.path.endswith("__init__.py"):
        package.pop()
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(src: Source, modules: frozenset[str] = MODULES) -> list[Import]:
    """Every import in ``src``, marked whether it runs at import time;
    ``from p import m`` names the module ``p.m`` when it is one of ``modules``."""
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, module_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(src, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(sub if sub in modules else base, node.lineno, module_level))
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, module_level)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.iter_child_nodes(node):
                visit(child, False)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, module_level)

    visit(src.tree, True)
    return found


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _first_party(module: str) -> bool:
    return _within(module, PRODUCT)


# ---------------------------------------------------------------- layers


def layering_violations(sources: list[Source]) -> list[str]:
    out = []
    for src in sources:
        for imp in imports(src):
            where = f"{src.path}:{imp.line} imports {imp.module}"
            if _within(src.module, ("protocol",)) and _within(
                imp.module, ("broker", "edge_agent", "tether")
            ):
                out.append(f"{where}: protocol/ imports nothing above it")
            if (
                _within(src.module, RUNTIME)
                and _first_party(imp.module)
                and not _within(imp.module, ("protocol", *RUNTIME))
                and imp.module != "tether"
            ):
                out.append(f"{where}: the runtime layer imports only protocol/ and itself")
            if not _within(src.module, ("tether.tools",)) and _within(
                imp.module, ("tether.tools",)
            ):
                out.append(f"{where}: only tether/tools imports tether.tools")
    return out


def test_layers() -> None:
    assert layering_violations(SOURCES) == []


# ---------------------------------------------------------------- cycles


def import_graph(sources: list[Source]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {s.module: set() for s in sources}
    for src in sources:
        for imp in imports(src, MODULES | frozenset(graph)):
            if imp.module_level and imp.module in graph and imp.module != src.module:
                graph[src.module].add(imp.module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph(SOURCES)) == []


# ------------------------------------------------------ HTTP libraries


def http_imports(sources: list[Source]) -> set[str]:
    """Files of broker/ and edge_agent/ that import h2, hyperframe or h11."""
    return {
        src.path
        for src in sources
        if _within(src.module, ("broker", "edge_agent"))
        for imp in imports(src)
        if _within(imp.module, HTTP_LIBRARIES)
    }


def test_no_http_library_in_the_adapters() -> None:
    found = http_imports(SOURCES)
    assert found - PENDING_H2_EXEMPTIONS == set(), "import it through protocol/ instead"
    assert PENDING_H2_EXEMPTIONS - found == set(), "no longer needed: remove the exemption"


# ------------------------------------------------------ clocks, random


def clock_uses(src: Source) -> Iterator[str]:
    """The clocks and random sources ``src`` uses, as ``module.name``."""
    aliases: dict[str, str] = {}  # local name -> module, for time/os/random/secrets
    for node in ast.walk(src.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("time", "os", "random", "secrets"):
                    aliases[a.asname or a.name] = a.name
                    if a.name == "secrets":
                        yield "secrets"
        elif isinstance(node, ast.ImportFrom) and node.module in ("time", "os", "random"):
            for a in node.names:
                name = f"{node.module}.{a.name}"
                if name in CLOCKS or (node.module == "random" and a.name not in RANDOM_ALLOWED):
                    yield name
        elif isinstance(node, ast.ImportFrom) and node.module == "secrets":
            yield "secrets"
    for node in ast.walk(src.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = aliases.get(node.value.id)
            if module is None:
                continue
            name = f"{module}.{node.attr}"
            if name in CLOCKS or (module == "random" and node.attr not in RANDOM_ALLOWED):
                yield name


def clock_violations(sources: list[Source]) -> set[tuple[str, str]]:
    return {
        (src.path, use)
        for src in sources
        if _within(src.module, ("protocol",))
        for use in clock_uses(src)
    }


def test_protocol_reads_no_clock_and_draws_no_randomness() -> None:
    found = clock_violations(SOURCES)
    assert found - PENDING_CLOCK_EXEMPTIONS == set(), "the caller passes time and random bytes"
    assert PENDING_CLOCK_EXEMPTIONS - found == set(), "no longer needed: remove the exemption"


# ---------------------------------------------------------- startswith


def startswith_on_reasons(sources: list[Source]) -> set[tuple[str, str]]:
    found = set()
    for src in sources:
        if _within(src.module, ("tether.tools",)):
            continue
        for node in ast.walk(src.tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith")
                and REASON_TEXT.search(ast.unparse(node.func.value))
            ):
                found.add((src.path, src.lines[node.lineno - 1].strip()))
    return found


def test_no_startswith_on_reason_text() -> None:
    found = startswith_on_reasons(SOURCES)
    assert found - PENDING_STARTSWITH_EXEMPTIONS == set(), "compare typed reasons, not text"
    assert PENDING_STARTSWITH_EXEMPTIONS - found == set(), "no longer needed: remove it"


# ------------------------------------------- the checks catch what they say


def _parse(path: str, text: str) -> Source:
    rel = Path(path)
    return Source(path, _module_name(rel), ast.parse(text), tuple(text.splitlines()))


def test_the_checks_find_new_violations() -> None:
    """Each check reports a violation planted in a made-up module."""
    assert layering_violations([_parse("protocol/x.py", "from broker import app\n")])
    assert layering_violations([_parse("tether/netio/x.py", "import edge_agent.config\n")])
    assert layering_violations([_parse("broker/x.py", "from tether.tools import launch\n")])
    assert not layering_violations(
        [_parse("tether/netio/x.py", "from protocol import session\nimport tether.settings\n")]
    )
    assert http_imports([_parse("edge_agent/x.py", "def f():\n    import h2.connection\n")])
    assert http_imports([_parse("broker/x.py", "from hyperframe.frame import Frame\n")])
    for text, use in [
        ("import time\nt = time.monotonic()\n", "time.monotonic"),
        ("from time import time\n", "time.time"),
        ("import os as o\nb = o.urandom(8)\n", "os.urandom"),
        ("import random\nx = random.random()\n", "random.random"),
        ("from random import choice\n", "random.choice"),
    ]:
        assert clock_violations([_parse("protocol/x.py", text)]) == {("protocol/x.py", use)}
    assert not clock_violations(
        [_parse("protocol/x.py", "import random\ndef f(rng: random.Random) -> None: ...\n")]
    )
    assert startswith_on_reasons(
        [_parse("broker/x.py", "def f(c):\n    return c.closed_reason.startswith('x')\n")]
    )
    assert not startswith_on_reasons(
        [_parse("broker/x.py", "def f(addr):\n    return addr.startswith('[')\n")]
    )
    graph = import_graph(
        [
            _parse("broker/a.py", "import broker.b\n"),
            _parse("broker/b.py", "from broker import a\n"),
            _parse(
                "broker/c.py",
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import broker.a\n",
            ),
        ]
    )
    assert cycles(graph) == [["broker.a", "broker.b"]]
