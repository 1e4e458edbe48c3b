"""``tether demo``: a broker, an agent and a target on this machine, with
real traffic through the tunnel.

It generates certificates in a temporary directory, starts ``tether-broker``
and ``tether-agent`` as real processes, serves a small HTTP target next to
the agent, sends requests through both CONNECT frontends (TCP with mTLS and
the Unix socket), prints what happened, and stops everything cleanly.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from tether.tools.certs import init_pki
from tether.tools.launch import BrokerHandle, Proc, connect_tunnel, start_agent, start_broker

BULK = 32 * 1024 * 1024


async def _serve_loopback(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def _http_target(nursery: trio.Nursery) -> int:
    """A tiny HTTP server: ``/`` says hello, ``/bytes/N`` sends N bytes."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 16384:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            path = request.split(b" ", 2)[1].decode("ascii", "replace")
            if path.startswith("/bytes/"):
                size = int(path.rsplit("/", 1)[1])
                await stream.send_all(
                    f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                block = b"t" * (1 << 20)
                while size > 0:
                    await stream.send_all(block[: min(size, len(block))])
                    size -= len(block)
            else:
                body = b"hello from the edge, through the tether\n"
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (len(body), body)
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError, IndexError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    return await _serve_loopback(nursery, handler)


async def _get(broker: BrokerHandle, target: str, path: str, via: str) -> tuple[int, bytes, float]:
    start = time.perf_counter()
    tunnel = await connect_tunnel(broker, target, via=via)
    if tunnel.status != 200:
        return tunnel.status, tunnel.body, time.perf_counter() - start
    await tunnel.send_all(f"GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    response = await tunnel.read_all()
    await tunnel.aclose()
    return tunnel.status, response, time.perf_counter() - start


async def _echo_latency(broker: BrokerHandle, nursery: trio.Nursery, rounds: int) -> list[float]:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    port = await _serve_loopback(nursery, echo)
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{port}", via="uds")
    samples = []
    msg = b"x" * 64
    for _ in range(rounds):
        start = time.perf_counter()
        await tunnel.send_all(msg)
        got = b""
        while len(got) < len(msg):
            got += await tunnel.receive_some()
        samples.append(time.perf_counter() - start)
    await tunnel.aclose()
    return samples


def _say(text: str) -> None:
    print(text, flush=True)


async def _run(workdir: Path, keep_running: bool) -> int:
    pki = init_pki(workdir / "pki", agents=("agent-1",))
    _say(f"certificates: {workdir / 'pki'}")
    broker = start_broker(workdir, pki, "--log-level=info")
    agent: Proc | None = None
    try:
        agent = start_agent(workdir, broker, "--log-level=info")
        _say(
            f"broker pid {broker.proc.pid}: agents on :{broker.agent_port}, CONNECT+mTLS on "
            f":{broker.server_port}, UDS {broker.uds}, health :{broker.health_port}, "
            f"metrics :{broker.admin_port}"
        )
        _say(f"agent  pid {agent.pid}: dialing the broker from the 'edge'")
        with trio.fail_after(30):
            await broker.ready(agents=1)
        _say("agent connected: broker /readyz is 200\n")
        async with trio.open_nursery() as nursery:
            port = await _http_target(nursery)
            target = f"127.0.0.1:{port}"
            for via in ("tcp", "uds"):
                status, response, took = await _get(broker, target, "/", via)
                first = response.split(b"\r\n", 1)[0].decode(errors="replace")
                body = response.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
                _say(
                    f"[{via:3}] CONNECT {target} -> {status}; {first}; {len(response)} bytes "
                    f"in {took * 1000:.1f} ms: {body!r}"
                )
            status, response, took = await _get(broker, target, f"/bytes/{BULK}", "uds")
            mb = len(response) / 1e6
            _say(
                f"[uds] bulk GET of {BULK >> 20} MiB -> {status}; {mb:.1f} MB in "
                f"{took:.2f} s ({mb / took:.0f} MB/s)"
            )
            samples = await _echo_latency(broker, nursery, 200)
            p50 = statistics.median(samples) * 1000
            p99 = sorted(samples)[int(len(samples) * 0.99) - 1] * 1000
            _say(f"[uds] 64-byte echo x{len(samples)}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
            status, response, _ = await _get(broker, "127.0.0.1:1", "/", "uds")
            _say(
                f"[uds] CONNECT 127.0.0.1:1 (nothing listens) -> {status}: "
                f"{response.decode(errors='replace').strip()}"
            )
            if keep_running:
                _say(
                    "\nRunning until Ctrl-C. Try:\n  curl -p --proxy "
                    f"https://localhost:{broker.server_port} "
                    f"--proxy-cacert {shlex.quote(str(pki.ca_cert))} "
                    f"--proxy-cert {shlex.quote(str(pki.frontend_cert))} "
                    f"--proxy-key {shlex.quote(str(pki.frontend_key))} http://{target}/"
                )
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()
        return 0
    finally:
        codes = []
        for proc in (agent, broker.proc):
            if proc is not None:
                codes.append(f"{proc.name} exit {proc.stop()}")
        _say("\nstopped: " + ", ".join(codes))


async def run_demo(workdir: Path, keep_running: bool) -> int:
    """The demo, stopped cleanly by SIGINT (Ctrl-C) or SIGTERM: the broker
    and agent are stopped and reaped, and the caller removes the work
    directory with the keys; exit 0 and no traceback."""
    result = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    _say(f"\n{signal.Signals(signum).name}: stopping")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            result = await _run(workdir, keep_running)
            nursery.cancel_scope.cancel()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the broker, agent and target up until Ctrl-C",
    )
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as tmp:
        workdir = args.dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            return trio.run(run_demo, workdir, args.keep_running)
        except KeyboardInterrupt:
            return 0
        except Exception as exc:  # the demo explains failures instead of dumping a trace
            print(f"demo failed: {exc!r}", file=sys.stderr)
            for log in sorted(workdir.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
