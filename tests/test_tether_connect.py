"""``tether connect``: an operator's local port through the broker's
Unix-socket frontend, in both frontend modes, with the real curl (issue 15
row 11 / item 8)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from procs import BrokerHandle, Proc, free_port

pytestmark = [pytest.mark.e2e]

TETHER = Path(sys.executable).parent / "tether"
SIZE = 3 * 1024 * 1024 + 17


@pytest.fixture
def http_target(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A real HTTP server (python -m http.server) with one file; (port, sha256)."""
    root = tmp_path / "www"
    root.mkdir()
    blob = os.urandom(SIZE)
    (root / "blob").write_bytes(blob)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(
            ["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"], check=False
        ).returncode:
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.1)
        yield port, hashlib.sha256(blob).hexdigest()
    finally:
        server.kill()
        server.wait(10)


class Connect:
    """A running ``tether connect`` and the local port it listens on."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(TETHER), "connect", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + self.proc.stderr.read()
        self.port = int(line.split()[2].rsplit(":", 1)[1].rstrip(","))

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, err


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("curl")
    assert exe, "curl is installed by `make sysdeps`"
    return subprocess.run([exe, "-sS", "--max-time", "30", *args], capture_output=True, timeout=40)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["http-connect", "grpc"])
async def test_fixed_target_and_proxy_mode(
    mode: str,
    http_target: tuple[int, str],
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
) -> None:
    broker = broker_factory(mode=mode, tcp=False)
    agent_factory(broker)
    await broker.ready(agents=1)
    port, digest = http_target

    fixed = Connect("--uds", broker.uds, "--mode", mode, "--target", f"127.0.0.1:{port}")
    proxy = Connect("--uds", broker.uds, "--mode", mode)
    try:
        # a fixed target: curl talks to the local port as if it were the node's
        got = curl(f"http://127.0.0.1:{fixed.port}/blob")
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256(got.stdout).hexdigest() == digest
        # proxy mode: curl names the target in its own CONNECT
        got = curl("-p", "-x", f"http://127.0.0.1:{proxy.port}", f"http://127.0.0.1:{port}/blob")
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256(got.stdout).hexdigest() == digest
        # a refused dial reaches curl as the broker's 502, and the tool keeps serving
        refused = curl("-p", "-x", f"http://127.0.0.1:{proxy.port}", "http://127.0.0.1:1/")
        assert refused.returncode != 0
        assert b"502" in refused.stderr, refused.stderr
        got = curl("-p", "-x", f"http://127.0.0.1:{proxy.port}", f"http://127.0.0.1:{port}/blob")
        assert hashlib.sha256(got.stdout).hexdigest() == digest
    finally:
        codes = [fixed.stop(), proxy.stop()]
    for code, err in codes:
        assert code == 0, err
        assert "Traceback" not in err, err
    assert "refused" in codes[1][1]  # the failed dial is reported on stderr


@pytest.mark.timeout(30)
def test_missing_socket_is_a_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(TETHER), "connect", "--uds", str(tmp_path / "nope.sock"), "--listen", "0"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no such socket" in result.stderr
