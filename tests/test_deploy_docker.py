"""The Dockerfile, checked without a Docker engine (this machine has none):
multi-stage, a final stage with no build tools running as non-root, and the
build context holding exactly what ``pip install .`` needs."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


@pytest.mark.timeout(30)
def test_multi_stage_with_a_clean_non_root_final_stage() -> None:
    build, final = stages()
    assert re.match(r"FROM \S+ AS build$", build[0])
    assert final[0].startswith("FROM ") and " AS " not in final[0]
    body = "\n".join(final[1:])
    for tool in ("apt-get", "gcc", "pip install", "build-essential"):
        assert tool not in body, f"final stage runs {tool}"
    copies = [i for i in final if i.startswith("COPY")]
    assert copies and all(i.startswith("COPY --from=build ") for i in copies)
    (user,) = [i.split()[1] for i in final if i.startswith("USER ")]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert any("/opt/tether/bin" in i for i in final if i.startswith("ENV "))


@pytest.mark.timeout(30)
def test_both_commands_are_installed_and_checked() -> None:
    build, _ = stages()
    run = "\n".join(i for i in build if i.startswith("RUN "))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for command in ("tether-broker", "tether-agent"):
        assert command in scripts
        assert f"/opt/tether/bin/{command} --help" in run


@pytest.mark.timeout(30)
def test_build_context_has_every_package_and_nothing_else() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    build, _ = stages()
    copied = {src.rstrip("/") for i in build if i.startswith("COPY ") for src in i.split()[1:-1]}
    assert packages | {"pyproject.toml", project["project"]["readme"]} <= copied
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "everything is excluded unless listed"
    included = {line[1:] for line in ignore if line.startswith("!")}
    assert copied <= included
    # Caches and local state stay out even inside included folders.
    assert any(fnmatch.fnmatch("__pycache__", p.split("/")[-1]) for p in ignore)
