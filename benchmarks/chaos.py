"""Chaos with data integrity: tunneled transfers over an emulated link while
the agent and the broker are killed (-9) and the link goes down at random.

Used by ``tests/test_chaos.py`` (a fixed number of transfers) and by the soak
(``python -m benchmarks.soak``, a fixed duration). Every transfer sends
random bytes to an echo target next to the agent and compares what comes
back byte for byte: it either completes with identical bytes or fails with
a clear error (an HTTP status, or the connection ending early). Bytes that
come back *different* are corruption, and the only acceptable count is 0.

Topology: the broker runs in the link's "cloud" namespace, the agent and
the echo target in the "edge" namespace; the client reaches the broker's
CONNECT frontend through its Unix socket, which the namespaces share.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from benchmarks.linksim import LinkSim
from tether.tools.certs import init_pki
from tether.tools.launch import BrokerHandle, Proc, connect_tunnel, start_agent, start_broker

CLOUD = "198.18.0.1"


@attrs.define
class ChaosReport:
    profile: str
    transfers: int = 0
    ok: int = 0
    failed: dict[str, int] = attrs.Factory(dict)
    bytes_verified: int = 0
    corrupted_bytes: int = 0
    slowest_s: float = 0.0
    faults: list[tuple[float, str]] = attrs.Factory(list)
    recovered_s: float | None = None
    duration_s: float = 0.0
    #: Hedged reconnects that won (agent logs): hedging was exercised.
    hedges_won: int = 0

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1

    def summary(self) -> str:
        faults: dict[str, int] = {}
        for _, kind in self.faults:
            faults[kind] = faults.get(kind, 0) + 1
        recovered = "never" if self.recovered_s is None else f"{self.recovered_s:.1f} s"
        return (
            f"[{self.profile}] {self.transfers} transfers in {self.duration_s:.0f} s: "
            f"{self.ok} ok, failed {dict(sorted(self.failed.items()))}, "
            f"{self.bytes_verified} bytes verified, {self.corrupted_bytes} corrupted, "
            f"slowest {self.slowest_s:.1f} s; faults {faults}; ready again after {recovered}; "
            f"{self.hedges_won} hedged reconnect(s) won"
        )


class Stack:
    """Broker, agent and echo target across the emulated link."""

    def __init__(self, link: LinkSim, workdir: Path, agent_args: Sequence[str] = ()) -> None:
        self.link = link
        self.workdir = workdir
        #: Appended to the agent's flags (a later flag wins).
        self.agent_args = tuple(agent_args)
        self.pki = init_pki(workdir / "pki", extra_sans=(CLOUD,))
        self.broker: BrokerHandle = start_broker(
            workdir,
            self.pki,
            "--agent-bind-address=",
            "--health-bind-address=127.0.0.1",
            "--backend-dial-timeout=5",
            "--keepalive-time=2",
            "--keepalive-timeout=3",
            "--drain-timeout=2",
            "--log-level=info",
            tcp=False,
            prefix=link.exec_prefix("cloud"),
        )
        self.agent = self._agent()
        portfile = workdir / "echo-port"
        self.target = Proc(
            "echo target",
            [*link.exec_prefix("edge"), sys.executable, "-m", "benchmarks.targets", str(portfile)],
            workdir / "target.log",
        )
        deadline = time.monotonic() + 20
        while not portfile.exists() or not portfile.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("echo target did not start")
            time.sleep(0.05)
        self.echo_port = int(portfile.read_text().split()[0])

    def _agent(self) -> Proc:
        return start_agent(
            self.workdir,
            self.broker,
            f"--proxy-server-host={CLOUD}",
            "--sync-interval=0.5",
            "--sync-interval-cap=3",
            "--keepalive-time=2",
            "--keepalive-timeout=3",
            # Hedging well inside the 5 s keepalive budget, so the link-down
            # faults race fresh connections beside the quiet one.
            "--hedge-after=1",
            "--log-level=info",
            *self.agent_args,
            prefix=self.link.exec_prefix("edge"),
        )

    def restart_agent(self) -> None:
        self.agent.kill9()
        self.agent.stop()
        self.agent = self._agent()

    def restart_broker(self) -> None:
        self.broker = self.broker.crash_and_restart(self.workdir / f"broker-{time.time_ns()}.log")

    async def ready(self) -> bool:
        """Broker /readyz (asked from inside its namespace) says an agent is up."""
        sock = trio.socket.from_stdlib_socket(self.link.socket("cloud"))
        try:
            with trio.move_on_after(2):
                await sock.connect(("127.0.0.1", self.broker.health_port))
                stream = trio.SocketStream(sock)
                await stream.send_all(b"GET /readyz HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := await stream.receive_some(4096):
                    data += chunk
                return data.startswith(b"HTTP/1.1 200")
            return False
        except OSError:
            return False
        finally:
            sock.close()

    def close(self) -> None:
        for proc in (self.target, self.agent, self.broker.proc):
            proc.stop(timeout=5)


async def _transfer(stack: Stack, rng: random.Random, report: ChaosReport, deadline: float) -> None:
    size = rng.randint(256, 32 * 1024)
    payload = rng.randbytes(size)
    started = trio.current_time()
    reason = None
    with trio.move_on_after(deadline) as scope:
        try:
            tunnel = await connect_tunnel(stack.broker, f"127.0.0.1:{stack.echo_port}", via="uds")
        except OSError:
            reason = "broker unreachable"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "connection reset before the answer"
        else:
            try:
                if tunnel.status == 0:
                    reason = "closed before the answer"
                elif tunnel.status != 200:
                    reason = f"HTTP {tunnel.status}"
                else:
                    got = bytearray()
                    try:
                        await tunnel.send_all(payload)
                        while len(got) < size:
                            chunk = await tunnel.receive_some(65536)
                            if not chunk:
                                break
                            got += chunk
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    # Whatever came back must be a prefix of what was sent.
                    same = sum(1 for a, b in zip(got, payload, strict=False) if a == b)
                    report.corrupted_bytes += len(got[:size]) - same
                    report.corrupted_bytes += max(0, len(got) - size)
                    report.bytes_verified += same
                    if len(got) < size:
                        reason = "connection ended early"
            finally:
                await tunnel.aclose()
    if scope.cancelled_caught:
        reason = "client deadline"
    report.transfers += 1
    report.slowest_s = max(report.slowest_s, trio.current_time() - started)
    if reason is None:
        report.ok += 1
    else:
        report.fail(reason)
        # Like a real client (kube-apiserver retries), do not spin on an
        # outage: pause a moment before the next attempt.
        await trio.sleep(0.5)


async def _inject_faults(
    stack: Stack, rng: random.Random, report: ChaosReport, t0: float, mean_gap: float
) -> None:
    kinds: list[str] = []
    while True:
        await trio.sleep(rng.uniform(0.5, 1.5) * mean_gap)
        if not kinds:  # every kind once per round, in random order
            kinds = ["kill -9 agent", "kill -9 broker", "link down"]
            rng.shuffle(kinds)
        kind = kinds.pop()
        report.faults.append((round(trio.current_time() - t0, 1), kind))
        if kind == "kill -9 agent":
            await trio.to_thread.run_sync(stack.restart_agent)
        elif kind == "kill -9 broker":
            await trio.to_thread.run_sync(stack.restart_broker)
        else:
            await trio.to_thread.run_sync(stack.link.set_down, True)
            await trio.sleep(rng.uniform(1, 4))
            await trio.to_thread.run_sync(stack.link.set_down, False)


async def run_chaos(
    workdir: Path,
    profile: str,
    *,
    transfers: int | None = None,
    duration: float | None = None,
    concurrency: int = 12,
    deadline: float = 30.0,
    fault_gap: float = 4.0,
    seed: int = 1,
    progress: bool = False,
) -> ChaosReport:
    """Run transfers (a count, or for ``duration`` seconds) under faults."""
    rng = random.Random(seed)
    report = ChaosReport(profile)
    with LinkSim(profile, seed=seed) as link:
        stack = Stack(link, workdir)
        try:
            with trio.fail_after(30):
                while not await stack.ready():
                    await trio.sleep(0.2)
            t0 = trio.current_time()
            started = 0
            limiter = trio.Semaphore(concurrency)

            def more() -> bool:
                if transfers is not None:
                    return started < transfers
                assert duration is not None
                return trio.current_time() - t0 < duration

            async with trio.open_nursery() as faults:
                faults.start_soon(_inject_faults, stack, rng, report, t0, fault_gap)
                async with trio.open_nursery() as work:
                    while more():
                        await limiter.acquire()
                        started += 1

                        async def one() -> None:
                            try:
                                await _transfer(stack, rng, report, deadline)
                            finally:
                                limiter.release()

                        work.start_soon(one)
                        if progress and started % 250 == 0:
                            print(
                                f"  {trio.current_time() - t0:5.0f} s: {report.transfers} "
                                f"transfers, {report.ok} ok, {report.corrupted_bytes} "
                                f"corrupted, {len(report.faults)} faults",
                                flush=True,
                            )
                faults.cancel_scope.cancel()
            report.duration_s = trio.current_time() - t0
            # Faults are over: the system must come back on its own.
            link.set_down(False)
            for proc in (stack.agent, stack.broker.proc):
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} died: {proc.log()[-1500:]}")
            recover_started = trio.current_time()
            with trio.move_on_after(60):
                while not await stack.ready():
                    await trio.sleep(0.2)
                report.recovered_s = trio.current_time() - recover_started
        finally:
            stack.close()
            report.hedges_won = sum(
                len(
                    re.findall(r"hedged reconnect to broker \S+ won", p.read_text(errors="replace"))
                )
                for p in workdir.glob("agent-*.log")
            )
    return report
