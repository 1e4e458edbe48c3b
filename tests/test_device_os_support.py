"""Device operating systems: the docs name as supported only those whose
python3 is 3.11 or newer, install.sh refuses an older python3 with one
clear line, and CI runs the arm64 smoke test (``make arm64-smoke``, which
needs root and minutes, so it is a CI step rather than a test here)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPERATIONS = REPO / "docs" / "operations.md"


def supported_table() -> list[list[str]]:
    """The rows of the table after 'Supported device operating systems'."""
    text = OPERATIONS.read_text()
    after = text[text.index("**Supported device operating systems**") :]
    rows = []
    for line in after.splitlines()[3:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if set(cells[0]) <= {"-"}:
            continue
        rows.append(cells)
    return rows[1:]  # without the header


@pytest.mark.timeout(30)
def test_supported_table_lists_only_python_311_or_newer() -> None:
    rows = supported_table()
    names = [r[0] for r in rows]
    assert any("Debian 12" in n for n in names) and any("Raspberry Pi OS 12" in n for n in names)
    for name, python, *_ in rows:
        major, minor = (int(x) for x in python.split("."))
        assert (major, minor) >= (3, 11), f"{name}: python3 {python} is listed as supported"
        for old in ("Debian 11", "Ubuntu 20.04", "Ubuntu 22.04", "Raspberry Pi OS 11"):
            assert old not in name
    wheelhouse_doc = (REPO / "deploy" / "systemd" / "wheelhouse.py").read_text()
    targets = wheelhouse_doc[wheelhouse_doc.index("Targets are") : wheelhouse_doc.index("(docs/")]
    assert not re.search(r"Debian 11|Ubuntu 2[02]\.04|Raspberry Pi OS 11", targets)


@pytest.mark.timeout(60)
def test_install_sh_refuses_an_older_python(tmp_path: Path) -> None:
    """The check a Debian 11 root hit: a python3 that is 3.9.2 (a stand-in
    that answers as Debian 11's does) stops the install at once."""
    old = tmp_path / "python3.9"
    old.write_text(
        '#!/bin/sh\ncase "$1" in -V) echo "Python 3.9.2" ;; -c) exit 1 ;; *) exit 3 ;; esac\n'
    )
    old.chmod(0o755)
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    for name in ("tether-0.1.0-py3-none-any.whl", "pip-24.0-py3-none-any.whl"):
        (wheelhouse / name).write_bytes(b"")
    result = subprocess.run(
        [
            "sh",
            str(REPO / "deploy/systemd/install.sh"),
            "--prefix",
            str(tmp_path / "root"),
            "--wheelhouse",
            str(wheelhouse),
            "--python",
            str(old),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"install.sh: {old} is Python 3.9.2; tether needs 3.11 or newer"
    )
    assert not (tmp_path / "root" / "opt").exists()


@pytest.mark.timeout(30)
def test_ci_runs_the_arm64_smoke_after_the_suite() -> None:
    steps = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip().startswith(("make", "exec make"))
    ]
    assert steps[:2] == ["make test", "make arm64-smoke"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^arm64-smoke:.*\n\t\$\(PY\) scripts/arm64_smoke\.py", makefile, re.M)
