"""A port clash or a bind address the host does not have is one line that
names the listener, its flag and address, and exit status 2 (issue 15
row 9: it was ``cannot start: [Errno 98] Address already in use``)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.tools.certs import PkiPaths
from tether.tools.launch import BIN

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def taken() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "ERROR" in line]


@pytest.mark.timeout(60)
def test_broker_names_the_listener_that_cannot_open(
    tmp_path: Path, pki: PkiPaths, taken: int
) -> None:
    base = [
        str(BIN / "tether-broker"),
        f"--uds-name={tmp_path / 'b.sock'}",
        f"--cluster-cert={pki.broker_cert}",
        f"--cluster-key={pki.broker_key}",
        f"--cluster-ca-cert={pki.ca_cert}",
        "--agent-bind-address=127.0.0.1",
        "--health-bind-address=127.0.0.1",
        "--admin-port=0",
        "--health-port=0",
    ]
    result = _run([*base, f"--agent-port={taken}"])
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result)
    assert f"cannot listen on the agent port (--agent-port) 127.0.0.1:{taken}" in line
    assert "ddress already in use" in line
    result = _run([*base, "--agent-port=0", "--health-bind-address=198.18.7.7", "--health-port=1"])
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result)
    assert "cannot listen on the health port (--health-port) 198.18.7.7:1" in line
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_agent_names_its_health_port(pki: PkiPaths, taken: int) -> None:
    cert, key = pki.agent("agent-1")
    result = _run(
        [
            str(BIN / "tether-agent"),
            f"--ca-cert={pki.ca_cert}",
            f"--agent-cert={cert}",
            f"--agent-key={key}",
            "--agent-id=agent-1",
            "--proxy-server-port=1",
            f"--health-server-port={taken}",
        ]
    )
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result)
    assert f"cannot listen on the health port (--health-server-port) 127.0.0.1:{taken}" in line
