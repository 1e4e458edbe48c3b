"""Does a stalled konnectivity tunnel slow a Tether agent's tunnels? (issue 17)

    python -m benchmarks.konnectivity_isolation [--size-mib 64] [--rounds 5]

One real ``tether-broker`` on loopback with a Tether agent (``ipv4=127.0.0.3``)
and a konnectivity-protocol agent (tests/konn_agent.py, grpcio, from
protocol/agent.proto; ``ipv4=127.0.0.2``). Each round downloads ``--size-mib``
through the Tether agent's CONNECT tunnel twice, interleaved: *solo*, and
*stalled* with a client holding a konnectivity tunnel whose target streams
without end and which never reads (its tunnel buffer full, that agent's
stream stalled). Reported: median goodput of each, their ratio (the issue's
bar: >= 0.95), and the broker's CPU seconds per GiB in each, so a noisy
machine shows up as work, not only as time. Last, with ``strace -c -f`` on
the broker: its system calls per GiB for one download of each kind, and in
three seconds of the stall alone (what the stalled tunnel itself costs).
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio

from benchmarks.measure import cpu_seconds, syscalls_during
from tether.tools.certs import init_pki
from tether.tools.launch import start_agent, start_broker

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from konn_agent import KonnAgent  # noqa: E402

MiB = 1024 * 1024
BLOCK = bytes(range(256)) * 1024


def _source(srv: socket.socket, total: int) -> None:
    def one(conn: socket.socket) -> None:
        left = total
        try:
            while left > 0:
                n = min(left, len(BLOCK))
                conn.sendall(BLOCK[:n])
                left -= n
        except OSError:
            pass
        finally:
            conn.close()

    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def _connect(uds: str, target: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(uds)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(1)
        if not b:
            raise RuntimeError("broker closed the CONNECT")
        head += b
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    return s


def _download(uds: str, target: str, total: int) -> float:
    s = _connect(uds, target)
    started = time.perf_counter()
    got = 0
    while got < total:
        chunk = s.recv(1024 * 1024)
        if not chunk:
            break
        got += len(chunk)
    elapsed = time.perf_counter() - started
    s.close()
    if got != total:
        raise RuntimeError(f"short download: {got} of {total}")
    return total / elapsed


def _own_cpu() -> float:
    """CPU seconds of this process (the clients and the konnectivity agent)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of ``pid`` so far."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if "ctxt_switches:" in line:
            total += int(line.split()[-1])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    total = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="tether-konn-iso-") as tmp_s:
        tmp = Path(tmp_s)
        pki = init_pki(tmp / "pki", agents=("agent-1", "agent-2"))
        broker = start_broker(
            tmp,
            pki,
            "--proxy-strategies=destHost,default",
            "--agent-allowed-identifiers=agent-1:ipv4=127.0.0.2,agent-2:ipv4=127.0.0.3",
            "--log-level=info",
        )
        tether = start_agent(
            tmp,
            broker,
            "--agent-identifiers=ipv4=127.0.0.3",
            "--log-level=info",
            agent_id="agent-2",
        )
        cert, key = pki.agent("agent-1")
        servers: list[socket.socket] = []
        konn: KonnAgent | None = None
        try:
            trio.run(broker.up)
            konn = KonnAgent(
                broker.agent_port,
                "agent-1",
                ca=pki.ca_cert,
                cert=cert,
                key=key,
                identifiers="ipv4=127.0.0.2",
            )
            trio.run(broker.ready, 2)
            addrs = {}
            for host, size in (("127.0.0.2", 1 << 40), ("127.0.0.3", total)):
                srv = socket.create_server((host, 0))
                servers.append(srv)
                threading.Thread(target=_source, args=(srv, size), daemon=True).start()
                addrs[host] = f"{host}:{srv.getsockname()[1]}"
            _download(broker.uds, addrs["127.0.0.3"], total)  # warm-up
            solo: list[float] = []
            stalled: list[float] = []
            cpu = {"solo": 0.0, "stalled": 0.0}
            switches = {"solo": 0, "stalled": 0}
            other = {"solo": 0.0, "stalled": 0.0}  # the Tether agent and this process

            def measure(kind: str, rates: list[float]) -> None:
                """One download from the Tether agent, its work counted under ``kind``."""
                before, sw = cpu_seconds(broker.proc.pid), _switches(broker.proc.pid)
                o = cpu_seconds(tether.pid) + _own_cpu()
                rates.append(_download(broker.uds, addrs["127.0.0.3"], total))
                cpu[kind] += cpu_seconds(broker.proc.pid) - before
                other[kind] += cpu_seconds(tether.pid) + _own_cpu() - o
                switches[kind] += _switches(broker.proc.pid) - sw

            for _ in range(args.rounds):
                measure("solo", solo)
                stuck = _connect(broker.uds, addrs["127.0.0.2"])
                time.sleep(0.5)  # the konnectivity tunnel's buffer fills; its stream stalls
                measure("stalled", stalled)
                stuck.close()
            counted: dict[str, int] = {}
            counted["solo"] = syscalls_during(
                [broker.proc.pid], lambda: _download(broker.uds, addrs["127.0.0.3"], total)
            )[0]
            stuck = _connect(broker.uds, addrs["127.0.0.2"])
            time.sleep(0.5)
            counted["stall alone, 3 s"] = syscalls_during([broker.proc.pid], lambda: time.sleep(3))[
                0
            ]
            counted["stalled"] = syscalls_during(
                [broker.proc.pid], lambda: _download(broker.uds, addrs["127.0.0.3"], total)
            )[0]
            stuck.close()
            gib = total * args.rounds / (1024 * MiB)
            m_solo, m_stalled = statistics.median(solo), statistics.median(stalled)
            ratio = m_stalled / m_solo
            print(f"size {args.size_mib} MiB x {args.rounds} rounds, interleaved")
            for name, med in (("solo", m_solo), ("stalled", m_stalled)):
                print(
                    f"{name:8s}median {med / MiB:8.1f} MiB/s  broker CPU "
                    f"{cpu[name] / gib:.2f} s/GiB, {switches[name] / gib:.0f} context switches/GiB; "
                    f"agent + clients CPU {other[name] / gib:.2f} s/GiB"
                )
            paired = statistics.median(b / a for a, b in zip(solo, stalled, strict=True))
            print(f"ratio of medians stalled/solo {ratio:.3f} (target >= 0.95)")
            print(f"median of per-round ratios {paired:.3f}")
            print(
                f"samples MiB/s solo {[round(x / MiB, 1) for x in solo]} "
                f"stalled {[round(x / MiB, 1) for x in stalled]}"
            )
            one = total / (1024 * MiB)
            print(
                "broker syscalls (strace -c -f): "
                f"solo {counted['solo'] / one:.0f}/GiB, stalled {counted['stalled'] / one:.0f}/GiB, "
                f"the stall alone {counted['stall alone, 3 s']} in 3 s"
            )
            return 0 if max(ratio, paired) >= 0.95 else 1
        finally:
            if konn is not None:
                konn.close()
            for srv in servers:
                srv.close()
            tether.stop(timeout=5)
            broker.proc.stop(timeout=5)


if __name__ == "__main__":
    sys.exit(main())
