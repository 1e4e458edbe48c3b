"""SIGTERM is never fatal, however early or often it comes (issue 15 row 16:
the agent exited with status 143 once in 11 SIGTERM drains)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from procs import free_port

from tether.tools.launch import BIN

pytestmark = [pytest.mark.e2e]


def _agent(tmp_path: Path, pki_ca: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(BIN / "tether-agent"),
            "--proxy-server-host=127.0.0.1",
            f"--proxy-server-port={free_port()}",  # nothing listens: the agent keeps retrying
            f"--ca-cert={pki_ca}",
            "--service-account-token-path=/dev/null",
            "--agent-id=edge-1",
            "--health-server-port=0",
            "--log-level=info",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    return proc.stderr.readline()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02, 0.05, 0.1, 0.3])
def test_sigterm_during_start_up_drains_with_exit_0(
    tmp_path: Path, pki: object, delay: float
) -> None:
    """The agent's first log line is written once its stop signals are
    caught; a SIGTERM right after it, while trio and the listeners are still
    starting, used to kill it with status 143."""
    proc = _agent(tmp_path, str(pki.ca_cert))  # type: ignore[attr-defined]
    try:
        assert "agent id edge-1" in _first_line(proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.timeout(60)
def test_a_second_sigterm_during_the_drain_is_not_fatal(tmp_path: Path, pki: object) -> None:
    proc = _agent(tmp_path, str(pki.ca_cert))  # type: ignore[attr-defined]
    try:
        _first_line(proc)
        time.sleep(0.5)
        for _ in range(5):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.002)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
