"""``make demo`` installs the runtime alone: no test, lint, fuzz or plot
extras (issue 15 row 12: it used to build a 610 MB virtualenv)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_demo_venv_has_the_runtime_and_no_test_extras(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-C", str(REPO), f"VENV={venv}", "venv-runtime"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    py = str(venv / "bin" / "python")
    probe = (
        "import importlib.util as u, sys;"
        "mods = ['trio', 'h2', 'h11', 'msgpack', 'cryptography', 'broker.app', 'edge_agent.app',"
        " 'tether.tools.demo', 'pytest', 'mypy', 'atheris', 'grpc_tools', 'matplotlib', 'hypothesis'];"
        "print(' '.join(m for m in mods if u.find_spec(m.split('.')[0]) is not None))"
    )
    found = set(
        subprocess.run(
            [py, "-c", probe], capture_output=True, text=True, timeout=60, check=True
        ).stdout.split()
    )
    assert {
        "trio",
        "h2",
        "h11",
        "msgpack",
        "cryptography",
        "broker.app",
        "edge_agent.app",
        "tether.tools.demo",
    } <= found
    assert not found & {"pytest", "mypy", "atheris", "grpc_tools", "matplotlib", "hypothesis"}
    for command in ("tether", "tether-broker", "tether-agent"):
        assert (venv / "bin" / command).exists()
