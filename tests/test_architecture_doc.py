"""docs/architecture.md's module map names every product module once, and
its "where to look" table names only modules that exist (issue 12)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _modules() -> set[str]:
    found = set()
    for package in ("protocol", "broker", "edge_agent", "tether"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py"):
                found.add(str(path.relative_to(ROOT)))
    return found


def _section(title: str) -> str:
    start = DOC.index(f"## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else len(DOC)]


def test_every_module_has_one_line_in_the_module_map() -> None:
    rows = re.findall(r"^\| `([^`]+\.py)` \|", _section("Module map"), re.MULTILINE)
    assert len(rows) == len(set(rows)), "a module listed twice"
    assert set(rows) == _modules()


def test_where_to_look_names_existing_modules() -> None:
    named = re.findall(r"`([a-z_/]+\.py)`", _section("Where to look"))
    assert len(named) >= 20
    missing = [name for name in named if not (ROOT / name).exists()]
    assert not missing, missing
