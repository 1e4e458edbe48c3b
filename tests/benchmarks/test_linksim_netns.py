"""The link emulator for real: namespaces, TAP devices, the forwarder process,
and measurements through real sockets.  Needs root and /dev/net/tun; every test
removes what it created, and the namespaces of this run carry their own prefix
so that the check for leftovers looks only at them."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.linksim import (
    DirectionParams,
    LinkProfile,
    LinkSim,
    LinkSimUnavailable,
    check_available,
    cleanup_stale,
    default_queue_bytes,
    list_namespaces,
    load_profile,
)
from benchmarks.linksim.netns import _is_zombie, _stale_forwarders, ip, pid_alive
from benchmarks.linksim.selfcheck import (
    CheckSettings,
    measure_rtt,
    measure_throughput,
    run_probe_streams,
    run_self_check,
)

ROOT = Path(__file__).resolve().parents[2]
PREFIX = f"tlt{os.getpid()}"


def _unavailable() -> str | None:
    try:
        check_available()
    except LinkSimUnavailable as e:
        return str(e)
    return None


_REASON = _unavailable()
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"link emulation: {_REASON}")


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    yield
    leftovers = list_namespaces(PREFIX)
    forwarders = _stale_forwarders(PREFIX, include_live=True)
    if leftovers or forwarders:
        cleanup_stale(PREFIX, include_live=True)
    assert leftovers == [], "namespaces left behind"
    assert forwarders == [], "forwarder processes left behind"


def gone(pid: int) -> bool:
    """Exited (a zombie whose new parent has not reaped it yet counts as gone)."""
    return not pid_alive(pid) or _is_zombie(pid)


def shaped(rate: float, delay_s: float, loss: float = 0.0) -> LinkProfile:
    q = default_queue_bytes(rate, 2 * delay_s)
    d = DirectionParams(rate_bps=rate, queue_bytes=q, delay_s=delay_s, loss=loss)
    return LinkProfile(name=f"{rate / 1e6:g}mbit", cloud_to_edge=d, edge_to_cloud=d)


# -- measurements -------------------------------------------------------------------------


@needs_netns
@pytest.mark.timeout(30)
def test_rtt_on_the_lte_profile() -> None:
    lte = load_profile("lte")
    report = run_self_check(
        lte, checks=["rtt"], settings=CheckSettings(rtt_probes=30), prefix=PREFIX
    )
    assert report.ok, report.table()
    rtt = report.data["rtt"]
    assert len(rtt.rtts_s) >= 25
    assert abs(rtt.mean_s - 0.060) <= 0.006, report.table()
    # ±5 ms of jitter each way shows up as spread, but FIFO keeps it bounded.
    assert 0.002 < rtt.stdev_s < 0.008, report.table()


@needs_netns
@pytest.mark.timeout(30)
def test_tcp_goodput_at_10_mbit() -> None:
    report = run_self_check(
        shaped(10e6, 0.005),
        checks=["throughput"],
        settings=CheckSettings(
            throughput_s=2.0, warmup_s=1.0, throughput_directions=("cloud_to_edge",)
        ),
        prefix=PREFIX,
    )
    assert report.ok, report.table()
    res = report.data["throughput"]["cloud_to_edge"]
    expected = 10e6 * res.mss / 1514
    assert abs(res.goodput_bps - expected) <= 0.1 * expected, report.table()
    assert abs(res.app_goodput_bps - expected) <= 0.15 * expected, report.table()


@needs_netns
@pytest.mark.timeout(30)
def test_forwarder_sustains_100_mbit() -> None:
    with LinkSim(load_profile("5g").with_directions(loss=0.0), prefix=PREFIX) as link:
        res = measure_throughput(link, "edge_to_cloud", seconds=2.0, warmup_s=1.0)
        stats = link.stats()["directions"]["edge_to_cloud"]
    expected = 100e6 * res.mss / 1514
    assert abs(res.goodput_bps - expected) <= 0.1 * expected, res
    # Plain MTU-sized frames (no GSO super-frames), and the TAP took every write.
    assert stats["max_frame"] <= 1514
    assert stats["write_errors"] == 0


@needs_netns
@pytest.mark.timeout(30)
def test_random_loss_is_observed_within_binomial_tolerance() -> None:
    report = run_self_check(
        shaped(10e6, 0.005, loss=0.05),
        checks=["loss"],
        settings=CheckSettings(loss_probes=500, loss_probes_max=1000, loss_pps=1000),
        prefix=PREFIX,
    )
    assert report.ok, report.table()
    for d in ("cloud_to_edge", "edge_to_cloud"):
        log = report.data["loss"][d]
        n = len(log.sent)
        assert n == 1000
        lost = n - len(log.received)
        # 4 binomial standard deviations: 21..79 of 1000 at 5%.
        assert abs(lost / n - 0.05) <= 4 * math.sqrt(0.05 * 0.95 / n) + 1 / n, report.table()
        assert log.reordered == 0


@needs_netns
@pytest.mark.timeout(40)
def test_scheduled_outage_of_the_flaky_profile_blocks_everything() -> None:
    report = run_self_check(
        load_profile("flaky"),
        checks=["outage"],
        settings=CheckSettings(outage_observe_s=1.0),
        prefix=PREFIX,
    )
    assert report.ok, report.table()
    # Both edges of the 30..50 s window were observed, in both directions.
    assert len(report.rows) == 4
    assert "(start)" in report.rows[0].check and "(end)" in report.rows[2].check


@needs_netns
@pytest.mark.timeout(30)
def test_set_down_blocks_and_up_restores() -> None:
    report = run_self_check(
        load_profile("lte"), checks=["down"], settings=CheckSettings(down_s=0.5), prefix=PREFIX
    )
    assert report.ok, report.table()


@needs_netns
@pytest.mark.timeout(30)
def test_one_direction_down_leaves_the_other_up() -> None:
    with LinkSim(shaped(10e6, 0.005), prefix=PREFIX) as link:
        marks: dict[str, float] = {}

        def down() -> None:
            link.set_down(True, direction="edge_to_cloud")
            marks["down"] = time.monotonic()

        def up() -> None:
            marks["up"] = time.monotonic()
            link.set_down(False, direction="edge_to_cloud")

        logs = run_probe_streams(link, 120, 100.0, 0.2, actions=[(0.3, down), (0.8, up)])
        stats = link.stats()["directions"]
    inside = {
        d: sum(1 for t in log.received.values() if marks["down"] < t < marks["up"])
        for d, log in logs.items()
    }
    assert inside["edge_to_cloud"] == 0
    assert inside["cloud_to_edge"] >= 40
    assert stats["edge_to_cloud"]["dropped"]["down"] >= 40
    assert stats["cloud_to_edge"]["dropped"]["down"] == 0


@needs_netns
@pytest.mark.timeout(30)
def test_reconfigure_changes_the_delay_of_a_running_link() -> None:
    with LinkSim(shaped(10e6, 0.030), prefix=PREFIX) as link:
        slow = measure_rtt(link, 10, 0.02)
        link.reconfigure(shaped(10e6, 0.005))
        fast = measure_rtt(link, 10, 0.02)
    assert 0.054 <= slow.mean_s <= 0.066
    assert 0.009 <= fast.mean_s <= 0.011


# -- plumbing and cleanup --------------------------------------------------------------------


@needs_netns
@pytest.mark.timeout(30)
def test_run_in_places_processes_on_their_side() -> None:
    client = textwrap.dedent(
        """
        import socket, sys
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        s.sendall(b"ping")
        print(s.recv(16).decode(), s.getsockname()[0])
        """
    )
    with LinkSim(load_profile("lte"), prefix=PREFIX) as link:
        assert link.cloud_addr.startswith("198.18.") and link.edge_addr.startswith("198.18.")
        srv = link.socket("cloud")
        srv.bind((link.cloud_addr, 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        proc = link.run_in(
            "edge",
            [sys.executable, "-c", client, link.cloud_addr, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        srv.settimeout(5)
        conn, peer = srv.accept()
        assert peer[0] == link.edge_addr
        assert conn.recv(16) == b"ping"
        conn.sendall(b"pong")
        out, _ = proc.communicate(timeout=5)
        conn.close()
        srv.close()
        # The edge namespace sees only its own link and loopback.
        links = ip("-n", link.edge_ns or "", "-br", "link").stdout.split()
    assert out.split() == ["pong", link.edge_addr]
    assert "link0" in links and "lo" in links and "eth0" not in links


@needs_netns
@pytest.mark.timeout(30)
def test_close_stops_children_forwarder_and_namespaces() -> None:
    with LinkSim(load_profile("lte"), prefix=PREFIX) as link:
        sleeper = link.run_in("edge", ["sleep", "60"])
        fwd = link.forwarder_pid
        assert fwd is not None and pid_alive(fwd)
        assert list_namespaces(PREFIX) == sorted([str(link.cloud_ns), str(link.edge_ns)])
    assert sleeper.poll() is not None
    assert gone(fwd)
    assert list_namespaces(PREFIX) == []


@needs_netns
@pytest.mark.timeout(30)
def test_exception_inside_the_block_still_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="boom"), LinkSim(load_profile("lte"), prefix=PREFIX):
        assert len(list_namespaces(PREFIX)) == 2
        raise RuntimeError("boom")
    assert list_namespaces(PREFIX) == []


@needs_netns
@pytest.mark.timeout(30)
def test_killed_owner_forwarder_exits_and_stale_cleanup_removes_namespaces() -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from benchmarks.linksim import LinkSim, load_profile
        link = LinkSim(load_profile("lte"), prefix={PREFIX!r}).start()
        print(link.forwarder_pid, flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        fwd = int(owner.stdout.readline())
        assert len(list_namespaces(PREFIX)) == 2
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    # Its stdin closed with the owner: the forwarder ends by itself.
    deadline = time.monotonic() + 5
    while not gone(fwd) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(fwd)
    # SIGKILL left the namespaces behind; they belong to a dead pid now.
    assert len(list_namespaces(PREFIX)) == 2
    removed = cleanup_stale(PREFIX)
    assert sorted(removed) == sorted(n for n in removed if n.startswith(PREFIX))
    assert len(removed) == 2
    assert list_namespaces(PREFIX) == []


@needs_netns
@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_terminated_owner_cleans_up_on_its_way_out(sig: signal.Signals) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from benchmarks.linksim import LinkSim, load_profile
        link = LinkSim(load_profile("lte"), prefix={PREFIX!r}).start()  # no `with`: atexit
        print(link.forwarder_pid, flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        fwd = int(owner.stdout.readline())
        assert len(list_namespaces(PREFIX)) == 2
        owner.send_signal(sig)
        owner.wait(timeout=10)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert owner.returncode != 0
    assert list_namespaces(PREFIX) == []
    assert gone(fwd)


@needs_netns
@pytest.mark.timeout(30)
def test_stale_cleanup_spares_live_owners() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}-cloud-{dead.pid}-0"
    live = f"{PREFIX}-edge-{os.getpid()}-999"
    ip("netns", "add", stale)
    ip("netns", "add", live)
    try:
        assert cleanup_stale(PREFIX) == [stale]
        assert list_namespaces(PREFIX) == [live]
        assert cleanup_stale(PREFIX, include_live=True) == [live]
    finally:
        for n in (stale, live):
            ip("netns", "del", n, check=False)


@needs_netns
@pytest.mark.timeout(60)
def test_cli_check_and_cleanup() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "benchmarks.linksim", "--prefix", PREFIX]
    res = subprocess.run(
        [*base, "check", "--profile", "lte", "--checks", "rtt", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rtt (mean of" in res.stdout and "all checks passed" in res.stdout
    bad = subprocess.run(
        [*base, "check", "--profile", "nope"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2
    clean = subprocess.run([*base, "cleanup"], capture_output=True, text=True, env=env)
    assert clean.returncode == 0 and "nothing to clean up" in clean.stdout


# -- no root needed ------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_loopback_profile_needs_no_namespaces() -> None:
    with LinkSim("loopback", prefix=PREFIX) as link:
        assert not link.emulated and link.cloud_ns is None and link.edge_ns is None
        assert link.cloud_addr == link.edge_addr == "127.0.0.1"
        out = link.run_in("edge", [sys.executable, "-c", "print('hi')"], stdout=subprocess.PIPE)
        assert out.communicate(timeout=5)[0].strip() == b"hi"
        s = link.socket("cloud", socket.AF_INET, socket.SOCK_DGRAM)
        s.close()
        with pytest.raises(LinkSimUnavailable):
            link.set_down(True)
    assert list_namespaces(PREFIX) == []


@pytest.mark.timeout(10)
def test_unavailable_says_why() -> None:
    with pytest.raises(LinkSimUnavailable, match=r"root|/nonexistent/tun"):
        check_available(tun_path="/nonexistent/tun")
