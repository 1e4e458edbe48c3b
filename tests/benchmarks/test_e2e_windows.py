"""Windows that follow the link, end to end: a broker and an agent (real
processes) across the emulated satellite link (10 Mbit/s, 600 ms RTT, 1%
loss), both opening every stream with a 64 KiB window. An echo through the
tunnel comes back byte for byte, the windows grew (the broker's metrics say
so), and the transfer ran well above what the opening window allows."""

from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path

import pytest
import trio

from benchmarks.linksim import LinkSim, check_available, list_namespaces
from tether.tools.certs import init_pki
from tether.tools.launch import BrokerHandle, Proc, connect_tunnel, start_agent, start_broker

pytestmark = [pytest.mark.e2e]

CLOUD = "198.18.0.1"
WINDOW = 64 * 1024
SIZE = 8 * 1024 * 1024


async def _get_in_cloud(link: LinkSim, port: int, path: str) -> str:
    sock = trio.socket.from_stdlib_socket(link.socket("cloud"))
    try:
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        return data.decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        sock.close()


def _counter(text: str, name: str, change: str) -> float:
    m = re.search(rf'^{name}\{{change="{change}"\}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else -1.0


async def _echo(broker: BrokerHandle, port: int, payload: bytes) -> tuple[bytes, float]:
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{port}", via="uds")
    assert tunnel.status == 200, tunnel.status
    got = bytearray()
    started = time.monotonic()
    try:
        async with trio.open_nursery() as n:
            n.start_soon(tunnel.send_all, payload)
            while len(got) < len(payload):
                chunk = await tunnel.receive_some(65536)
                if not chunk:
                    break
                got += chunk
    finally:
        await tunnel.aclose()
    return bytes(got), time.monotonic() - started


@pytest.mark.timeout(180)
def test_windows_grow_over_a_long_fat_lossy_link_and_bytes_stay_intact(tmp_path: Path) -> None:
    check_available()  # root and /dev/net/tun: present in CI; a clear error otherwise
    payload = random.Random(13).randbytes(SIZE)
    with LinkSim("satellite", seed=13) as link:
        pki = init_pki(tmp_path / "pki", extra_sans=(CLOUD,))
        broker = start_broker(
            tmp_path,
            pki,
            "--agent-bind-address=",
            "--health-bind-address=127.0.0.1",
            "--admin-bind-address=127.0.0.1",
            f"--stream-window={WINDOW}",
            "--log-level=info",
            tcp=False,
            prefix=link.exec_prefix("cloud"),
        )
        procs: list[Proc] = [broker.proc]
        try:
            procs.append(
                start_agent(
                    tmp_path,
                    broker,
                    f"--proxy-server-host={CLOUD}",
                    f"--stream-window={WINDOW}",
                    "--log-level=info",
                    prefix=link.exec_prefix("edge"),
                )
            )
            portfile = tmp_path / "echo-port"
            procs.append(
                Proc(
                    "echo target",
                    [
                        *link.exec_prefix("edge"),
                        sys.executable,
                        "-m",
                        "benchmarks.targets",
                        str(portfile),
                    ],
                    tmp_path / "target.log",
                )
            )

            async def main() -> tuple[bytes, float, str]:
                with trio.fail_after(30):
                    while not portfile.exists() or not portfile.read_text():
                        await trio.sleep(0.05)
                    while not (await _get_in_cloud(link, broker.health_port, "/readyz")).startswith(
                        "HTTP/1.1 200"
                    ):
                        await trio.sleep(0.2)
                port = int(portfile.read_text().split()[0])
                with trio.fail_after(120):
                    got, took = await _echo(broker, port, payload)
                metrics = await _get_in_cloud(link, broker.admin_port, "/metrics")
                return got, took, metrics

            got, took, metrics = trio.run(main)
        finally:
            for proc in reversed(procs):
                proc.stop(timeout=5)
    assert got == payload  # every byte back, in order
    # The broker's receive window for the echo's way back grew with the link.
    assert _counter(metrics, "tether_stream_window_changes_total", "grown") >= 1, metrics[-2000:]
    assert _counter(metrics, "tether_stream_window_changes_total", "refused") == 0
    # A 64 KiB window over a 600 ms round trip carries at most ~107 KB/s
    # (77 s for this transfer); the transfer ran at least 1.5 times that. TCP
    # under 1% loss at 600 ms sets the rest: 33-41 s in runs on this machine,
    # so twice (38 s) failed one CI run with windows that had grown.
    assert took < SIZE / (WINDOW / 0.6) / 1.5, took
    assert not [ns for ns in list_namespaces() if str(tmp_path.name) in ns]
