"""Scenarios S1-S8: each measures every contender on the stacks it is given
and returns plain JSON-able data. Failures of one contender are recorded
under ``errors`` and do not stop the others (a broken contender must show up
in the report, not hide the rest of it).

S9 (broker scale) lives in :mod:`benchmarks.many_agents`.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from benchmarks import measure
from benchmarks.contenders import Stacks
from benchmarks.linksim import LinkProfile

Progress = Callable[[str], None]


@attrs.frozen
class Durations:
    """How long each scenario runs; presets in :data:`PRESETS`."""

    s1_mib: int = 256
    s1_reps: int = 3
    s2_loopback_rounds: int = 2000
    s2_rounds: int = 200
    s2_max_s: float = 6.0
    s3_dials: int = 20
    s3_satellite_dials: int = 8
    s4_min_warmup_s: float = 1.5  # slow start: at least this, and 10 RTT
    s4_measure_s: float = 8.0
    s4_long_measure_s: float = 12.0  # high-RTT / low-rate profiles
    s5_warmup_s: float = 2.0
    s5_measure_s: float = 8.0
    s6_loopback_s: float = 1.5
    s6_loopback_pairs: int = 3
    s6_link_s: float = 5.0
    s6_on_link: bool = True
    s7_outages: tuple[float, ...] = (5.0, 20.0, 60.0)
    s7_cap_s: float = 90.0
    #: Rounds of every outage length (interleaved), for p50/p99 and spread.
    s7_repeats: int = 5
    #: S4 runs per contender on the lossy profiles (LOSSY_PROFILES), interleaved.
    s4_lossy_runs: int = 5
    #: S4 on flaky: long enough to span one outage period of the profile.
    s4_flaky_measure_s: float = 60.0
    #: S10 address changes, and how long each may take to recover.
    s10_moves: int = 5
    s10_cap_s: float = 60.0
    s8_idle_s: float = 60.0
    s9_agents: int = 1000
    s9_dial_s: float = 5.0
    selfcheck: bool = True


PRESETS = {
    "full": Durations(),
    "quick": Durations(
        s1_mib=64,
        s1_reps=2,
        s2_loopback_rounds=500,
        s2_rounds=60,
        s2_max_s=3.0,
        s3_dials=8,
        s3_satellite_dials=4,
        s4_measure_s=4.0,
        s4_long_measure_s=6.0,
        s5_warmup_s=1.5,
        s5_measure_s=4.0,
        s6_loopback_s=1.0,
        s6_link_s=3.0,
        s7_outages=(5.0, 20.0),
        s7_cap_s=60.0,
        s7_repeats=2,
        s4_lossy_runs=2,
        s4_flaky_measure_s=30.0,
        s10_moves=2,
        s8_idle_s=15.0,
        s9_agents=200,
        s9_dial_s=3.0,
    ),
    "smoke": Durations(
        s1_mib=8,
        s1_reps=1,
        s2_loopback_rounds=30,
        s2_rounds=5,
        s2_max_s=1.0,
        s3_dials=2,
        s3_satellite_dials=1,
        s4_measure_s=1.0,
        s4_long_measure_s=1.0,
        s5_warmup_s=0.5,
        s5_measure_s=1.0,
        s6_loopback_s=0.5,
        s6_loopback_pairs=1,
        s6_link_s=0.5,
        s6_on_link=False,
        s4_min_warmup_s=0.5,
        s7_outages=(1.0,),
        s7_cap_s=30.0,
        s7_repeats=1,
        s4_lossy_runs=1,
        s4_flaky_measure_s=2.0,
        s10_moves=1,
        s10_cap_s=10.0,
        s8_idle_s=1.0,
        s9_agents=20,
        s9_dial_s=1.0,
        selfcheck=True,
    ),
}


def rtt_s(profile: LinkProfile) -> float:
    """The configured round trip (one-way delays added)."""
    if not profile.emulate:
        return 0.0
    return sum(profile.direction(d).delay_s for d in ("cloud_to_edge", "edge_to_cloud"))


def _guard(errors: dict[str, str], key: str, progress: Progress) -> Any:
    """Context manager recording an exception under ``key`` instead of raising."""

    @contextlib.contextmanager
    def guard() -> Any:
        try:
            yield
        except Exception as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"
            progress(f"    ! {key}: {errors[key][:200]}")

    return guard()


# ------------------------------------------------------------------ S1


def s1_bulk(st: Stacks, d: Durations, errors: dict[str, str], progress: Progress) -> dict[str, Any]:
    """Loopback single-stream throughput, best of interleaved repetitions,
    and the CPU seconds per GB of the tunnel processes on either side."""
    size = d.s1_mib << 20
    out: dict[str, Any] = {"bytes": size, "reps": d.s1_reps, "contenders": {}}
    for name in st.contenders:  # warm-up: caches, JIT-free but lazy imports, windows
        with _guard(errors, f"S1/{name}/warmup", progress):
            measure.bulk_download(st.opener(name), st.source_port, min(size, 16 << 20))
    for rep in range(d.s1_reps):  # interleaved so that drift hits everyone alike
        for name in st.contenders:
            with _guard(errors, f"S1/{name}", progress):
                edge = st.edge_pid(name)
                cloud = st.cloud_pids(name)
                c0 = measure.tree_cpu(cloud)
                e0 = measure.cpu_seconds(edge) if edge else 0.0
                bps = measure.bulk_download(st.opener(name), st.source_port, size)
                c1 = measure.tree_cpu(cloud)
                e1 = measure.cpu_seconds(edge) if edge else 0.0
                r = out["contenders"].setdefault(
                    name, {"MBps": [], "cloud_cpu_s_per_GB": [], "edge_cpu_s_per_GB": []}
                )
                r["MBps"].append(bps / 1e6)
                gb = size / 1e9
                if edge or cloud:
                    r["cloud_cpu_s_per_GB"].append((c1 - c0) / gb)
                    r["edge_cpu_s_per_GB"].append((e1 - e0) / gb)
                progress(f"    S1 {name} rep {rep + 1}: {bps / 1e6:.0f} MB/s")
    for r in out["contenders"].values():
        r["best_MBps"] = max(r["MBps"])
        if r["edge_cpu_s_per_GB"]:
            r["edge_cpu_per_GB"] = statistics.median(r["edge_cpu_s_per_GB"])
            r["cloud_cpu_per_GB"] = statistics.median(r["cloud_cpu_s_per_GB"])
            r["total_cpu_per_GB"] = r["edge_cpu_per_GB"] + r["cloud_cpu_per_GB"]
    return out


# ------------------------------------------------------------------ S2


def s2_echo(
    st: Stacks, profile: LinkProfile, d: Durations, errors: dict[str, str], progress: Progress
) -> dict[str, Any]:
    """64-byte request/response on one open connection per contender."""
    rounds = d.s2_loopback_rounds if not profile.emulate else d.s2_rounds
    max_s = d.s2_max_s if profile.emulate else 30.0
    out: dict[str, Any] = {"rtt_ms": rtt_s(profile) * 1000, "contenders": {}}
    for name in st.contenders:
        with _guard(errors, f"S2/{profile.name}/{name}", progress):
            conn = st.opener(name)(st.echo_port, 30)
            try:
                for _ in range(min(20 if not profile.emulate else 3, rounds)):  # warm-up
                    measure.echo_once(conn)
                samples = measure.echo_series(conn, rounds=rounds, max_s=max_s)
            finally:
                conn.close()
            out["contenders"][name] = measure.latency_summary(samples)
            s = out["contenders"][name]
            progress(
                f"    S2 {profile.name} {name}: p50 {s['p50_ms']:.3f} ms, "
                f"p99 {s['p99_ms']:.3f} ms (n={s['n']})"
            )
    return out


# ------------------------------------------------------------------ S3


def s3_dial(
    st: Stacks,
    profile: LinkProfile,
    dials: int,
    errors: dict[str, str],
    progress: Progress,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Connect request to first echoed byte, fresh connection each time;
    interleaved across contenders."""
    rtt = rtt_s(profile)
    names = [*st.contenders, *extra]
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(dials):
        for name in names:
            with _guard(errors, f"S3/{profile.name}/{name}", progress):
                samples[name].append(measure.dial_time(st.opener(name), st.echo_port))
    out: dict[str, Any] = {"rtt_ms": rtt * 1000, "contenders": {}}
    for name, xs in samples.items():
        if not xs:
            continue
        s = measure.latency_summary(xs)
        if rtt:
            s["p50_rtts"] = s["p50_ms"] / (rtt * 1000)
        out["contenders"][name] = s
        progress(
            f"    S3 {profile.name} {name}: p50 {s['p50_ms']:.1f} ms"
            + (f" = {s['p50_rtts']:.2f} RTT" if rtt else "")
        )
    return out


# ------------------------------------------------------------------ S4 (+ S8 during)


def congestion_by_contender(st: Stacks) -> dict[str, str | None]:
    """Which congestion control the edge-side sender of each path uses."""
    conns = measure.tcp_connections(st.link.exec_prefix("edge"))
    out: dict[str, str | None] = {}
    for name in st.contenders:
        if name == "direct":
            match = [c for c in conns if c["local_port"] == st.source_port]
        else:
            port = st.tunnel_port(name)
            match = [c for c in conns if c["peer_port"] == port]
        out[name] = match[0]["cc"] if match else None
    return out


def s4_goodput(
    st: Stacks,
    profile: LinkProfile,
    measure_s: float,
    errors: dict[str, str],
    progress: Progress,
    footprint: dict[str, Any],
    min_warmup_s: float = 1.5,
    runs: int = 1,
) -> dict[str, Any]:
    """Time-boxed download per contender after slow start; the edge-side
    tunnel process's memory is sampled meanwhile (S8 'during S4'). With
    ``runs`` > 1 the contenders take turns, round after round, and each
    reports the median with its samples (lossy links vary run to run)."""
    rtt = rtt_s(profile)
    warmup = max(min_warmup_s, 10 * rtt)
    out: dict[str, Any] = {
        "warmup_s": warmup,
        "measure_s": measure_s,
        "runs": runs,
        "contenders": {},
    }
    for round_ in range(runs):
        for name in st.contenders:
            _s4_one(st, profile, name, warmup, measure_s, errors, progress, footprint, out)
        if runs > 1:
            progress(f"    S4 {profile.name}: round {round_ + 1}/{runs} done")
    for c in out["contenders"].values():
        c["mbps"] = statistics.median(c["mbps_samples"])
    return out


def _s4_one(
    st: Stacks,
    profile: LinkProfile,
    name: str,
    warmup: float,
    measure_s: float,
    errors: dict[str, str],
    progress: Progress,
    footprint: dict[str, Any],
    out: dict[str, Any],
) -> None:
    with _guard(errors, f"S4/{profile.name}/{name}", progress):
        cc: dict[str, str | None] = {}
        edge = st.edge_pid(name)
        sampler = measure.MemorySampler({name: edge} if edge else {})

        def snapshot(name: str = name, cc: dict[str, str | None] = cc) -> None:
            cc.update(congestion_by_contender(st))

        with sampler:
            g = measure.goodput(
                st.opener(name),
                st.source_port,
                warmup_s=warmup,
                measure_s=measure_s,
                on_running=snapshot,
            )
        entry = out["contenders"].setdefault(name, {"mbps_samples": []})
        entry["mbps_samples"].append(g.bps / 1e6)
        entry["cc"] = cc.get(name)
        entry["timeline"] = g.timeline
        if edge:
            peak = footprint.setdefault(name, {"rss": 0, "uss": 0})
            peak["rss"] = max(peak["rss"], sampler.peak[name]["rss"])
            peak["uss"] = max(peak["uss"], sampler.peak[name]["uss"])
        progress(f"    S4 {profile.name} {name}: {g.bps / 1e6:.2f} Mbit/s (cc {cc.get(name)})")


# ------------------------------------------------------------------ S5


def s5_under_load(
    st: Stacks, profile: LinkProfile, d: Durations, errors: dict[str, str], progress: Progress
) -> dict[str, Any]:
    """Echo latency while a bulk download shares the tunnel (the same agent
    connection, the same ssh connection; direct uses its own connections)."""
    out: dict[str, Any] = {"rtt_ms": rtt_s(profile) * 1000, "contenders": {}}
    for name in st.contenders:
        with _guard(errors, f"S5/{profile.name}/{name}", progress):
            opener = st.opener(name)
            echo_conn = opener(st.echo_port, 60)
            stop = threading.Event()
            running = threading.Event()
            bulk: dict[str, Any] = {}

            def download(
                opener: Any = opener,
                bulk: dict[str, Any] = bulk,
                stop: threading.Event = stop,
                running: threading.Event = running,
            ) -> None:
                try:
                    g = measure.goodput(
                        opener,
                        st.source_port,
                        warmup_s=d.s5_warmup_s,
                        measure_s=3600,
                        stop=stop,
                        on_running=running.set,
                    )
                    bulk["mbps"] = g.bps / 1e6
                except Exception as exc:
                    bulk["error"] = repr(exc)
                    running.set()

            t = threading.Thread(target=download, daemon=True)
            t.start()
            try:
                running.wait(d.s5_warmup_s + 30)
                if "error" in bulk:
                    raise RuntimeError(f"bulk transfer failed: {bulk['error']}")
                samples = measure.echo_series(echo_conn, rounds=1 << 30, max_s=d.s5_measure_s)
            finally:
                stop.set()
                echo_conn.close()
                t.join(60)
            s = measure.latency_summary(samples)
            s["bulk_mbps"] = bulk.get("mbps")
            out["contenders"][name] = s
            progress(
                f"    S5 {profile.name} {name}: p50 {s['p50_ms']:.1f} ms, p99 "
                f"{s['p99_ms']:.1f} ms (n={s['n']}) beside {bulk.get('mbps') or 0:.1f} Mbit/s"
            )
    return out


# ------------------------------------------------------------------ S6


class _Stalled:
    """A download whose reader never reads: its window fills and stays full."""

    def __init__(self, st: Stacks, name: str) -> None:
        self.conn = st.opener(name)(st.source_port, 120)
        self.conn.sendall(measure.ENDLESS.to_bytes(8, "big"))

    def close(self) -> None:
        self.conn.close()


def s6_slow_consumer(
    st: Stacks,
    profile: LinkProfile,
    seconds: float,
    errors: dict[str, str],
    progress: Progress,
    pairs: int = 1,
) -> dict[str, Any]:
    """Stream B's goodput alone, then while stream A (same tunnel) is
    stalled; ``pairs`` alternations, medians compared (loopback is CPU-bound
    and noisy, so one pair of short windows says little)."""
    warmup = max(0.5, 10 * rtt_s(profile)) if profile.emulate else min(0.5, seconds)
    out: dict[str, Any] = {"measure_s": seconds, "pairs": pairs, "contenders": {}}
    for name in st.contenders:
        with _guard(errors, f"S6/{profile.name}/{name}", progress):
            opener = st.opener(name)
            pids = {"edge": st.edge_pid(name)} | {
                f"cloud{i}": p for i, p in enumerate(st.cloud_pids(name))
            }
            pids = {k: v for k, v in pids.items() if v}
            before = {k: measure.memory_kib(v) for k, v in pids.items()}
            sampler = measure.MemorySampler(pids)  # type: ignore[arg-type]
            solos: list[float] = []
            boths: list[float] = []
            with sampler:
                for _ in range(pairs):
                    g = measure.goodput(opener, st.source_port, warmup_s=warmup, measure_s=seconds)
                    solos.append(g.bps)
                    stalled = _Stalled(st, name)
                    try:
                        time.sleep(max(0.3, 4 * rtt_s(profile)))  # let A's windows fill up
                        g = measure.goodput(
                            opener, st.source_port, warmup_s=warmup, measure_s=seconds
                        )
                        boths.append(g.bps)
                    finally:
                        stalled.close()
            solo_bps, both_bps = statistics.median(solos), statistics.median(boths)
            r = {
                "solo_mbps": solo_bps / 1e6,
                "with_stalled_mbps": both_bps / 1e6,
                "fraction": both_bps / solo_bps if solo_bps else None,
                "solo_mbps_samples": [x / 1e6 for x in solos],
                "with_stalled_mbps_samples": [x / 1e6 for x in boths],
                "rss_kib_before": {k: v["rss"] for k, v in before.items()},
                "rss_kib_peak_stalled": {k: v["rss"] for k, v in sampler.peak.items()},
            }
            out["contenders"][name] = r
            progress(
                f"    S6 {profile.name} {name}: B solo {r['solo_mbps']:.1f}, with A stalled "
                f"{r['with_stalled_mbps']:.1f} Mbit/s ({r['fraction'] or 0:.2f})"
            )
    return out


# ------------------------------------------------------------------ S7


class LogWatch:
    """Notes when a line matching ``pattern`` first appears in a log file
    (polled every 50 ms: the log's own timestamps have 1 ms to 1 s
    resolution depending on the format, polling is uniform)."""

    def __init__(self, path: Path, pattern: str) -> None:
        self.path = path
        self.pattern = re.compile(pattern)
        self.offset = path.stat().st_size if path.exists() else 0
        self.seen_at: float | None = None
        self.line: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = ""
        while not self._stop.is_set() and self.seen_at is None:
            with contextlib.suppress(OSError), open(self.path, errors="replace") as f:
                f.seek(self.offset)
                data = f.read()
                self.offset += len(data.encode())
                buf += data
                for line in buf.splitlines():
                    if self.pattern.search(line):
                        self.seen_at = time.monotonic()
                        self.line = line.strip()[-300:]
                        return
                buf = buf[buf.rfind("\n") + 1 :]
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _first_success(
    opener: Any, port: int, start: float, cap_s: float, attempt_timeout: float = 10.0
) -> tuple[float | None, int]:
    """Start an attempt (fresh connection + echo) every 0.5 s from ``start``,
    overlapping, until one succeeds; returns (seconds after ``start`` of the
    first success, attempts made)."""
    done = threading.Event()
    first: list[float] = []
    lock = threading.Lock()

    def attempt() -> None:
        try:
            conn = opener(port, attempt_timeout)
            try:
                measure.echo_once(conn)
            finally:
                conn.close()
        except Exception:
            return
        with lock:
            if not first:
                first.append(time.monotonic() - start)
                done.set()

    n = 0
    threads = []
    while not done.is_set() and time.monotonic() - start < cap_s:
        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        threads.append(t)
        n += 1
        done.wait(0.5)
    for t in threads:
        t.join(attempt_timeout + 5)
    return (first[0] if first else None), n


def wait_healthy(st: Stacks, timeout: float) -> dict[str, float | None]:
    """Seconds until each contender carries an echo again (None: not within
    ``timeout``)."""
    start = time.monotonic()
    result: dict[str, float | None] = {}

    def probe(name: str) -> None:
        result[name] = _first_success(st.opener(name), st.echo_port, start, timeout, 5)[0]

    threads = [threading.Thread(target=probe, args=(n,), daemon=True) for n in st.contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return result


def s7_recovery(
    st: Stacks, d: Durations, errors: dict[str, str], progress: Progress
) -> dict[str, Any]:
    """Force the link down for each outage length, then measure, per
    contender, the time from restore to the first new request that succeeds,
    and each tunnel's own dead-link detection (from its log). The outage
    lengths take turns for ``d.s7_repeats`` rounds; each contender reports
    the median, p50 and p99 (nearest rank) and every sample."""
    rounds: dict[float, list[dict[str, Any]]] = {o: [] for o in d.s7_outages}
    for round_ in range(d.s7_repeats):
        for outage in d.s7_outages:
            with _guard(errors, f"S7/{outage:g}s/{round_ + 1}", progress):
                rounds[outage].append(_s7_one(st, outage, d, progress))
    out: dict[str, Any] = {"repeats": d.s7_repeats, "outages": []}
    for outage, runs in rounds.items():
        contenders: dict[str, Any] = {}
        for name in st.contenders:
            recs = [r[name]["recovery_s"] for r in runs if name in r]
            got = [x for x in recs if x is not None]
            detected = [r[name].get("detected_s") for r in runs if name in r]
            det = [x for x in detected if x is not None]
            contenders[name] = {
                "recovery_s": statistics.median(got) if got else None,
                "p50_s": measure.pct(got, 0.50) if got else None,
                "p99_s": measure.pct(got, 0.99) if got else None,
                "recovery_samples": recs,
                "failed": len(recs) - len(got),
                "attempts": [r[name]["attempts"] for r in runs if name in r],
                "detected_s": statistics.median(det) if det else None,
                "detected_line": next(
                    (
                        r[name].get("detected_line")
                        for r in runs
                        if r.get(name, {}).get("detected_line")
                    ),
                    None,
                ),
            }
        out["outages"].append({"outage_s": outage, "contenders": contenders})
        summary = ", ".join(
            f"{n} p50 {c['p50_s']:.2f}s p99 {c['p99_s']:.2f}s"
            if c["p50_s"] is not None
            else f"{n} none"
            for n, c in contenders.items()
        )
        progress(f"    S7 {outage:g} s outage, {len(runs)} round(s): {summary}")
    return out


def _s7_one(st: Stacks, outage: float, d: Durations, progress: Progress) -> dict[str, Any]:
    pre = wait_healthy(st, 120)
    if any(v is None for v in pre.values()):
        raise RuntimeError(f"contenders not healthy before the outage: {pre}")
    time.sleep(1.0)
    watches: dict[str, LogWatch] = {}
    for name, b in st.brokers.items():
        if name in st.contenders:
            watches[name] = LogWatch(b.agent.log_path, r"disconnected from broker")
    if st.ssh is not None:
        watches["ssh"] = LogWatch(
            st.ssh.client.log_path, r"Timeout, server|Connection .*(reset|closed)|Broken"
        )
    t_down = time.monotonic()
    st.link.set_down(True)
    progress(f"    S7 link down for {outage:g} s")
    time.sleep(outage)
    st.link.set_down(False)
    t_up = time.monotonic()
    results = _first_success_each(st, st.contenders, t_up, d.s7_cap_s)
    for name, w in watches.items():
        w.stop()
        if name in results:
            results[name]["detected_s"] = None if w.seen_at is None else w.seen_at - t_down
            results[name]["detected_line"] = w.line
    summary = ", ".join(
        f"{n} {r['recovery_s']:.2f}s" if r["recovery_s"] is not None else f"{n} none"
        for n, r in results.items()
    )
    progress(f"    S7 {outage:g} s outage, recovered after restore: {summary}")
    return results


def _first_success_each(
    st: Stacks, names: list[str], start: float, cap_s: float
) -> dict[str, dict[str, Any]]:
    """Per contender, in parallel: seconds from ``start`` to its first working request."""
    results: dict[str, dict[str, Any]] = {}

    def run(name: str) -> None:
        rec, n = _first_success(st.opener(name), st.echo_port, start, cap_s)
        results[name] = {"recovery_s": rec, "attempts": n}

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(cap_s + 60)
    return results


# ------------------------------------------------------------------ S10

#: S10 contenders: the tunnels that must follow a moving edge (direct TCP
#: dials the edge's old address, which is gone).
S10_CONTENDERS = ("ssh", "tether-connect", "tether-grpc")


def s10_mobility(
    st: Stacks, d: Durations, errors: dict[str, str], progress: Progress
) -> dict[str, Any]:
    """The edge moves mid-transfer: a download runs through every tunnel;
    the edge's address is removed, a new one (another subnet) added and the
    default route moved to it. Per contender: seconds from the new address
    and route being up to its first working request (fresh connection and
    echo, attempts every 0.5 s), ``d.s10_moves`` times, moving back and forth."""
    names = [n for n in S10_CONTENDERS if n in st.contenders]
    runs: list[dict[str, Any]] = []
    lost: dict[str, int] = {}  # contenders that never came back, and after which move
    for move in range(d.s10_moves):
        with _guard(errors, f"S10/{move + 1}", progress):
            pre = wait_healthy(st, 60 if runs else 120)
            for n in names:
                if pre.get(n) is None and runs:
                    lost[n] = move
                    progress(f"    S10 {n} did not come back after move {move}; left out")
            names = [n for n in names if n not in lost]
            if not names or any(pre.get(n) is None for n in names):
                raise RuntimeError(f"contenders not healthy before the move: {pre}")
            transfers = [_Transfer(st, n) for n in names]
            time.sleep(1.0)  # the downloads are flowing
            before = st.link.edge_addr
            t_up = st.link.move_edge()
            progress(f"    S10 edge moved {before} -> {st.link.edge_addr}")
            results = _first_success_each(st, names, t_up, d.s10_cap_s)
            for t in transfers:
                results[t.name]["transfer"] = t.close()
            runs.append(results)
            summary = ", ".join(
                f"{n} {r['recovery_s']:.2f}s" if r["recovery_s"] is not None else f"{n} none"
                for n, r in results.items()
            )
            progress(f"    S10 move {move + 1}: first working request after {summary}")
    out: dict[str, Any] = {"moves": len(runs), "contenders": {}, "lost_after_move": lost}
    for name in [n for n in S10_CONTENDERS if n in st.contenders]:
        recs = [r[name]["recovery_s"] for r in runs if name in r]
        got = [x for x in recs if x is not None]
        out["contenders"][name] = {
            "recovery_s": statistics.median(got) if got else None,
            "p50_s": measure.pct(got, 0.50) if got else None,
            "p99_s": measure.pct(got, 0.99) if got else None,
            "recovery_samples": recs,
            "transfers": [r[name].get("transfer") for r in runs if name in r],
        }
    return out


class _Transfer:
    """A download through one contender while the edge moves: how many
    bytes it got and how it ended (it may die with the old address)."""

    def __init__(self, st: Stacks, name: str) -> None:
        self.name = name
        self.received = 0
        self.ended = "running"
        self._stop = threading.Event()
        self._conn: Any = None
        self._thread = threading.Thread(
            target=self._run, args=(st.opener(name), st.source_port), daemon=True
        )
        self._thread.start()

    def _run(self, opener: Any, port: int) -> None:
        try:
            self._conn = opener(port, 10.0)
            self._conn.sendall(measure.ENDLESS.to_bytes(8, "big"))
            while not self._stop.is_set():
                chunk = self._conn.recv(65536)
                if not chunk:
                    self.ended = "eof"
                    return
                self.received += len(chunk)
        except Exception as exc:
            self.ended = "stopped" if self._stop.is_set() else f"error: {type(exc).__name__}"

    def close(self) -> dict[str, Any]:
        self._stop.set()
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        self._thread.join(5)
        return {"received": self.received, "ended": self.ended}


# ------------------------------------------------------------------ S8


def s8_idle(st: Stacks, idle_s: float, progress: Progress) -> dict[str, Any]:
    """Memory and CPU of the edge-side tunnel processes with nothing to do."""
    pids = {n: st.edge_pid(n) for n in st.contenders}
    pids = {n: p for n, p in pids.items() if p}
    mem = {n: measure.memory_kib(p) for n, p in pids.items()}
    c0 = {n: measure.cpu_seconds(p) for n, p in pids.items()}
    progress(f"    S8 measuring idle CPU for {idle_s:g} s")
    t0 = time.monotonic()
    time.sleep(idle_s)
    elapsed = time.monotonic() - t0
    cpu = {n: (measure.cpu_seconds(p) - c0[n]) / elapsed * 100 for n, p in pids.items()}
    out = {
        "idle_s": elapsed,
        "contenders": {
            n: {
                "idle_rss_kib": mem[n]["rss"],
                "idle_uss_kib": mem[n]["uss"],
                "idle_cpu_pct": cpu[n],
            }
            for n in pids
        },
    }
    for n, r in out["contenders"].items():
        progress(
            f"    S8 {n}: RSS {r['idle_rss_kib'] / 1024:.1f} MiB, USS "
            f"{r['idle_uss_kib'] / 1024:.1f} MiB, idle CPU {r['idle_cpu_pct']:.3f}%"
        )
    return out
