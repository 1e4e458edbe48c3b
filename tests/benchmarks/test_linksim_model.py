"""The link emulator's sans-IO core and its profiles, without sockets."""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.linksim import (
    DirectionParams,
    DropReason,
    GilbertElliott,
    LinkModel,
    LinkProfile,
    Outage,
    ProfileError,
    default_queue_bytes,
    load_profile,
    load_profiles,
)
from benchmarks.linksim.profiles import profile_from_table
from benchmarks.linksim.selfcheck import loss_probe_count, loss_tolerance

MTU_FRAME = 1514


def run(model: LinkModel, arrivals: list[tuple[float, int]]) -> list[float | None]:
    return [model.offer(t, n) for t, n in arrivals]


# -- serialization, queue, delay ---------------------------------------------------------


@pytest.mark.timeout(10)
def test_no_shaping_is_pure_delay() -> None:
    m = LinkModel(DirectionParams(delay_s=0.03))
    assert run(m, [(0.0, 100), (0.0, 1500), (1.25, 60)]) == [0.03, 0.03, 1.28]


@pytest.mark.timeout(10)
def test_back_to_back_frames_leave_one_serialization_apart() -> None:
    rate = 10e6
    m = LinkModel(DirectionParams(rate_bps=rate, delay_s=0.01))
    out = run(m, [(0.0, MTU_FRAME)] * 5)
    tx = MTU_FRAME * 8 / rate
    assert out == pytest.approx([0.01 + tx * (i + 1) for i in range(5)], abs=1e-12)


@pytest.mark.timeout(10)
def test_idle_link_serializes_from_arrival() -> None:
    m = LinkModel(DirectionParams(rate_bps=1e6))
    first = m.offer(0.0, 125)  # 1 ms on the wire
    later = m.offer(0.5, 125)
    assert first == pytest.approx(0.001)
    assert later == pytest.approx(0.501)


@pytest.mark.timeout(10)
def test_drop_tail_queue_counts_bytes() -> None:
    limit = 10 * MTU_FRAME
    m = LinkModel(DirectionParams(rate_bps=1e6, queue_bytes=limit))
    out = run(m, [(0.0, MTU_FRAME)] * 30)
    accepted = [t for t in out if t is not None]
    # The first frame starts service at once; every later one must fit on top of
    # the whole backlog (the one in service counts until it is fully sent).
    assert len(accepted) == 10
    assert m.stats.dropped["queue"] == 20
    assert m.last_drop is DropReason.QUEUE
    # Once the backlog drains, frames are accepted again.
    drained = 10 * MTU_FRAME * 8 / 1e6
    assert m.offer(drained, MTU_FRAME) is not None


@pytest.mark.timeout(10)
def test_frame_larger_than_queue_passes_an_idle_link() -> None:
    m = LinkModel(DirectionParams(rate_bps=1e6, queue_bytes=1000))
    assert m.offer(0.0, 1500) is not None
    assert m.offer(0.0, 100) is None  # but nothing may queue behind it beyond the limit


@pytest.mark.timeout(10)
def test_long_run_rate_under_overload() -> None:
    rate = 20e6
    m = LinkModel(DirectionParams(rate_bps=rate, queue_bytes=150_000, delay_s=0.03))
    # Offer twice the rate for 10 s of simulated time.
    gap = MTU_FRAME * 8 / (2 * rate)
    n = int(10.0 / gap)
    out = run(m, [(i * gap, MTU_FRAME) for i in range(n)])
    delivered = [t for t in out if t is not None]
    sent_bytes = sum(MTU_FRAME for t in delivered if t <= 10.0 + 0.03)
    assert sent_bytes * 8 / 10.0 == pytest.approx(rate, rel=0.01)
    assert m.stats.dropped["queue"] == pytest.approx(n / 2, rel=0.02)
    # Queueing delay is bounded by the buffer: limit / rate.
    worst = max(t - i * gap for i, t in enumerate(out) if t is not None)
    assert worst <= 0.03 + 150_000 * 8 / rate + MTU_FRAME * 8 / rate + 1e-9


@pytest.mark.timeout(10)
def test_unlimited_rate_ignores_queue_limit() -> None:
    m = LinkModel(DirectionParams(queue_bytes=100, delay_s=0.001))
    assert all(t == 0.001 for t in run(m, [(0.0, 1500)] * 100))


# -- jitter and ordering -------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_jitter_keeps_fifo_order_and_bounds() -> None:
    p = DirectionParams(delay_s=0.03, jitter_s=0.005)
    m = LinkModel(p, seed=7)
    arrivals = [(i * 0.001, 200) for i in range(5000)]
    out = run(m, arrivals)
    times = [t for t in out if t is not None]
    assert len(times) == len(arrivals)
    assert all(b >= a for a, b in itertools.pairwise(times))
    for (t, _), d in zip(arrivals, times, strict=True):
        assert t + 0.025 - 1e-12 <= d <= t + 0.035 + 1e-12


@pytest.mark.timeout(10)
def test_jitter_is_uniform_around_the_delay_when_sparse() -> None:
    m = LinkModel(DirectionParams(delay_s=0.03, jitter_s=0.005), seed=3)
    delays = [m.offer(i * 0.1, 100) - i * 0.1 for i in range(20000)]  # type: ignore[operator]
    assert statistics.fmean(delays) == pytest.approx(0.03, abs=0.0001)
    # Uniform on ±5 ms: standard deviation 5 / sqrt(3) ms.
    assert statistics.stdev(delays) == pytest.approx(0.005 / math.sqrt(3), rel=0.03)
    assert min(delays) >= 0.025 and max(delays) <= 0.035


@pytest.mark.timeout(10)
def test_reorder_flag_lets_jitter_reorder() -> None:
    arrivals = [(i * 0.001, 200) for i in range(2000)]
    fifo = run(LinkModel(DirectionParams(delay_s=0.03, jitter_s=0.005), seed=1), arrivals)
    free = run(
        LinkModel(DirectionParams(delay_s=0.03, jitter_s=0.005, reorder=True), seed=1), arrivals
    )
    free_t = [t for t in free if t is not None]
    fifo_t = [t for t in fifo if t is not None]
    assert len(free_t) == len(fifo_t) == len(arrivals)
    inversions = sum(1 for a, b in itertools.pairwise(free_t) if b < a)
    assert inversions > 100
    assert all(b >= a for a, b in itertools.pairwise(fifo_t))


@pytest.mark.timeout(10)
def test_jitter_never_delivers_before_the_frame_left() -> None:
    m = LinkModel(DirectionParams(delay_s=0.001, jitter_s=0.01, reorder=True), seed=2)
    assert all(m.offer(i * 0.1, 100) >= i * 0.1 for i in range(2000))  # type: ignore[operator]


# -- loss models -----------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_random_loss_rate() -> None:
    n, p = 100_000, 0.05
    m = LinkModel(DirectionParams(loss=p), seed=11)
    lost = sum(1 for i in range(n) if m.offer(i * 1e-4, 100) is None)
    assert abs(lost / n - p) <= 4 * math.sqrt(p * (1 - p) / n)
    assert m.stats.dropped["loss"] == lost


@pytest.mark.timeout(20)
def test_gilbert_elliott_loss_rate_and_burst_length() -> None:
    ge = GilbertElliott(p_good_to_bad=0.01, p_bad_to_good=0.25, loss_in_bad=1.0, loss_in_good=0.0)
    m = LinkModel(DirectionParams(gilbert_elliott=ge), seed=5)
    outcome = [m.offer(i * 1e-4, 100) is None for i in range(200_000)]
    frac = sum(outcome) / len(outcome)
    assert ge.mean_loss == pytest.approx(0.01 / 0.26)
    assert frac == pytest.approx(ge.mean_loss, rel=0.08)
    bursts, run_len = [], 0
    for lost in outcome:
        if lost:
            run_len += 1
        elif run_len:
            bursts.append(run_len)
            run_len = 0
    # With loss_in_bad = 1, a burst is a stay in the bad state: geometric, mean 1/p_bg.
    assert statistics.fmean(bursts) == pytest.approx(1 / 0.25, rel=0.08)


@pytest.mark.timeout(20)
def test_gilbert_elliott_losses_are_bursty_compared_with_random() -> None:
    ge = load_profile("lossy-iot").cloud_to_edge.gilbert_elliott
    assert ge is not None
    bursty = LinkModel(DirectionParams(gilbert_elliott=ge), seed=1)
    flat = LinkModel(DirectionParams(loss=ge.mean_loss), seed=1)

    def p_loss_after_loss(m: LinkModel) -> float:
        lost = [m.offer(i * 1e-4, 100) is None for i in range(100_000)]
        pairs = [b for a, b in itertools.pairwise(lost) if a]
        return sum(pairs) / len(pairs)

    assert p_loss_after_loss(bursty) > 0.5
    assert p_loss_after_loss(flat) < 0.1


@pytest.mark.timeout(10)
def test_lost_frames_still_use_their_airtime() -> None:
    m = LinkModel(DirectionParams(rate_bps=1e6, loss=1.0))
    assert m.offer(0.0, 125) is None
    assert m.backlog_bytes(0.0) == pytest.approx(125)


@pytest.mark.timeout(10)
def test_same_seed_same_verdicts_other_seed_differs() -> None:
    p = load_profile("lte").cloud_to_edge
    arrivals = [(i * 0.0004, 1514 if i % 3 else 66) for i in range(20_000)]
    a = run(LinkModel(p, seed=42), arrivals)
    b = run(LinkModel(p, seed=42), arrivals)
    c = run(LinkModel(p, seed=43), arrivals)
    assert a == b
    assert a != c


# -- outages and forced down ----------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_explicit_outage_drops_arrivals_and_frames_in_flight() -> None:
    p = DirectionParams(delay_s=0.1, outages=(Outage(1.0, 0.5),))
    m = LinkModel(p)
    assert m.offer(0.5, 100) == pytest.approx(0.6)
    assert m.offer(0.95, 100) is None  # would arrive at 1.05, inside the outage
    assert m.last_drop is DropReason.OUTAGE
    assert m.offer(1.2, 100) is None
    assert m.offer(1.5, 100) == pytest.approx(1.6)  # the window is half-open
    assert m.stats.dropped["outage"] == 2


@pytest.mark.timeout(10)
def test_periodic_outage_schedule() -> None:
    p = DirectionParams(outage_every_s=60, outage_duration_s=20, outage_offset_s=30)
    wins = p.outage_windows()
    assert [next(wins) for _ in range(3)] == [Outage(30, 20), Outage(90, 20), Outage(150, 20)]
    assert next(p.outage_windows(start=100)) == Outage(90, 20)
    assert next(p.outage_windows(start=110)) == Outage(150, 20)
    assert [p.in_outage(t) for t in (29.99, 30, 49.99, 50, 89.9, 90, 109.9, 110)] == [
        False,
        True,
        True,
        False,
        False,
        True,
        True,
        False,
    ]
    assert p.outage_overlaps(25, 30) and not p.outage_overlaps(50, 89.99)
    assert p.outage_overlaps(0, 1000)


@pytest.mark.timeout(10)
def test_periodic_default_offset_is_one_period() -> None:
    p = DirectionParams(outage_every_s=10, outage_duration_s=2)
    assert next(p.outage_windows()) == Outage(10, 2)
    assert not p.in_outage(0.0)


@pytest.mark.timeout(10)
def test_outage_windows_merge_explicit_and_periodic() -> None:
    p = DirectionParams(
        outages=(Outage(5, 1), Outage(25, 1)), outage_every_s=10, outage_duration_s=2
    )
    wins = p.outage_windows()
    assert [next(wins) for _ in range(4)] == [
        Outage(5, 1),
        Outage(10, 2),
        Outage(20, 2),
        Outage(25, 1),
    ]


@pytest.mark.timeout(10)
def test_model_follows_periodic_outages() -> None:
    p = DirectionParams(delay_s=0.01, outage_every_s=1.0, outage_duration_s=0.25)
    m = LinkModel(p)
    through = [t for t in (i * 0.001 for i in range(3000)) if m.offer(t, 100) is not None]
    for t in through:
        # Neither the arrival nor the flight [t, t + 10 ms] may touch [k, k + 0.25).
        assert not p.outage_overlaps(t, t + 0.01)
    # Windows [1, 1.25) and [2, 2.25) (the first starts one period in): 250 frames
    # arrive in each, and the 10 sent in the 10 ms before each start (also before
    # the one at 3.0) would still be flying when it begins.
    assert len(through) == 3000 - (250 + 10) * 2 - 10


@pytest.mark.timeout(10)
def test_forced_down_drops_everything_and_recovers_without_backlog() -> None:
    m = LinkModel(DirectionParams(rate_bps=1e6, delay_s=0.05))
    for _ in range(10):
        assert m.offer(0.0, 1250) is not None  # 10 ms each: a 100 ms backlog
    m.set_down(True)
    m.count_flushed(10, 12500)
    assert m.offer(0.01, 100) is None
    assert m.last_drop is DropReason.DOWN
    m.set_down(False)
    # The flushed backlog is gone: the next frame does not wait 100 ms behind it.
    assert m.offer(0.02, 125) == pytest.approx(0.02 + 0.001 + 0.05)
    s = m.stats
    assert s.offered == 12 and s.scheduled == 1 and s.dropped["down"] == 11


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.one_of(st.none(), st.floats(1e5, 1e9)),
    queue=st.one_of(st.none(), st.integers(64, 500_000)),
    delay=st.floats(0, 0.5),
    jitter=st.floats(0, 0.05),
    loss=st.floats(0, 0.5),
    seed=st.integers(0, 2**32),
    gaps=st.lists(st.floats(0, 0.01), min_size=1, max_size=300),
    sizes=st.lists(st.integers(42, 1514), min_size=1, max_size=300),
)
@pytest.mark.timeout(60)
def test_model_invariants(
    rate: float | None,
    queue: int | None,
    delay: float,
    jitter: float,
    loss: float,
    seed: int,
    gaps: list[float],
    sizes: list[int],
) -> None:
    p = DirectionParams(rate_bps=rate, queue_bytes=queue, delay_s=delay, jitter_s=jitter, loss=loss)
    m = LinkModel(p, seed=seed)
    t, last = 0.0, -math.inf
    for gap, size in zip(gaps, sizes * (len(gaps) // len(sizes) + 1), strict=False):
        t += gap
        backlog_before = m.backlog_bytes(t)
        d = m.offer(t, size)
        if rate and queue:
            after = m.backlog_bytes(t)
            if m.last_drop is DropReason.QUEUE:
                assert after == pytest.approx(backlog_before)
            elif backlog_before > 0:
                # Joining a busy queue never takes it past the limit (a lone
                # frame on an idle link may be bigger than the limit).
                assert after <= queue + 1e-6
        if d is None:
            continue
        spb = 8 / rate if rate else 0.0
        assert d >= t + size * spb - 1e-9
        assert d >= last  # FIFO
        # At most: wait for the backlog, send, fly with the worst jitter, or
        # leave right behind the previous frame.
        assert d <= max(last, t + (backlog_before + size) * spb + delay + jitter) + 1e-9
        last = d
    s = m.stats
    assert s.offered == s.scheduled + sum(s.dropped.values())


# -- profiles ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_builtin_profiles_match_their_description() -> None:
    profiles = load_profiles()
    assert list(profiles) == ["loopback", "5g", "lte", "satellite", "lossy-iot", "flaky"]
    assert not profiles["loopback"].emulate
    expect = {
        "5g": (100e6, 0.010, 0.0, 0.001),
        "lte": (20e6, 0.030, 0.005, 0.005),
        "satellite": (10e6, 0.300, 0.0, 0.01),
        "flaky": (20e6, 0.030, 0.005, 0.005),
    }
    for name, (rate, delay, jitter, loss) in expect.items():
        for d in (profiles[name].cloud_to_edge, profiles[name].edge_to_cloud):
            assert (d.rate_bps, d.delay_s, d.jitter_s, d.expected_loss) == pytest.approx(
                (rate, delay, jitter, loss)
            )
            assert d.queue_bytes == default_queue_bytes(rate, 2 * delay)
    iot = profiles["lossy-iot"].cloud_to_edge
    assert iot.rate_bps == 2e6 and iot.delay_s == pytest.approx(0.1)
    assert iot.gilbert_elliott is not None and iot.loss == 0
    assert iot.expected_loss == pytest.approx(0.03, abs=0.002)
    flaky = profiles["flaky"].cloud_to_edge
    assert (flaky.outage_every_s, flaky.outage_duration_s) == (60, 20)
    assert profiles["lte"].rtt_s == pytest.approx(0.06)


@pytest.mark.timeout(10)
def test_default_queue_is_one_bdp_with_a_floor() -> None:
    assert default_queue_bytes(20e6, 0.06) == 150_000
    assert default_queue_bytes(1e6, 0.01) == 32 * 1514


def _tables(**tables: dict[str, object]) -> dict[str, object]:
    return dict(tables)


@pytest.mark.timeout(10)
def test_direction_overrides_and_inheritance() -> None:
    tables = _tables(
        base={"rate_bps": 10e6, "delay_ms": 20, "edge_to_cloud": {"rate_bps": 2e6}},
        child={"inherit": "base", "loss": 0.01, "cloud_to_edge": {"delay_ms": 50}},
    )
    p = profile_from_table("child", tables)
    assert p.cloud_to_edge.rate_bps == 10e6 and p.cloud_to_edge.delay_s == pytest.approx(0.05)
    assert p.edge_to_cloud.rate_bps == 2e6 and p.edge_to_cloud.delay_s == pytest.approx(0.02)
    assert p.cloud_to_edge.loss == p.edge_to_cloud.loss == 0.01


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rate_bsp": 1}, "unknown keys"),
        ({"cloud_to_edge": {"dealy_ms": 1}}, "unknown keys"),
        ({"loss": 1.5}, "loss"),
        ({"rate_bps": -1}, "rate_bps"),
        ({"outage_every_s": 10, "outage_duration_s": 20}, "outage_duration_s"),
        ({"outage_duration_s": 20}, "needs outage_every_s"),
        ({"outages": [{"start_s": 1}]}, "start_s and duration_s"),
        ({"gilbert_elliott": {"p_good_to_bad": 2, "p_bad_to_good": 0.1}}, "gilbert_elliott"),
        ({"inherit": "x"}, "inheritance cycle"),
        ({"delay_ms": "10"}, "must be a number"),
    ],
)
def test_bad_profiles_are_rejected(table: dict[str, object], message: str) -> None:
    tables = {"x": table}
    with pytest.raises(ProfileError, match=message):
        profile_from_table("x", tables)


@pytest.mark.timeout(10)
def test_profiles_file_argument(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[slow]\nrate_bps = 1_000_000\ndelay_ms = 5\nqueue_bytes = 3000\n")
    p = load_profile("slow", f)
    assert p.cloud_to_edge.queue_bytes == 3000
    with pytest.raises(ProfileError, match="no profile named"):
        load_profile("nope", f)


@pytest.mark.timeout(10)
def test_profile_json_round_trip() -> None:
    for p in load_profiles().values():
        assert LinkProfile.from_json(p.to_json()) == p
    odd = dataclasses.replace(
        load_profile("lte"),
        cloud_to_edge=DirectionParams(outages=(Outage(1, 2),), reorder=True),
    )
    assert LinkProfile.from_json(odd.to_json()) == odd


@pytest.mark.timeout(10)
def test_with_directions_and_without_outages() -> None:
    flaky = load_profile("flaky")
    assert flaky.has_outages and not flaky.without_outages().has_outages
    quiet = flaky.with_directions(loss=0.0)
    assert quiet.cloud_to_edge.loss == 0 and quiet.cloud_to_edge.rate_bps == 20e6


@pytest.mark.timeout(10)
def test_loss_tolerance_and_probe_count() -> None:
    flat = DirectionParams(loss=0.03)
    assert flat.loss_variance == pytest.approx(0.03 * 0.97)
    assert loss_tolerance(flat, 1000, 4.0) == pytest.approx(
        4 * math.sqrt(0.03 * 0.97 / 1000) + 0.001
    )
    iot = load_profile("lossy-iot").cloud_to_edge
    assert loss_tolerance(iot, 1000, 4.0) > 2 * loss_tolerance(flat, 1000, 4.0)
    # Enough probes that the tolerance is at most half the loss rate.
    n = loss_probe_count(iot, 2000, 4.0, cap=10**9)
    assert loss_tolerance(iot, n, 4.0) <= iot.expected_loss / 2 + 1 / n
    assert loss_probe_count(DirectionParams(), 500, 4.0, cap=10**9) == 500


@pytest.mark.timeout(60)
def test_burst_statistics_match_simulation() -> None:
    """The closed forms used by the self-check agree with the model itself."""
    p = dataclasses.replace(load_profile("lossy-iot").cloud_to_edge, loss=0.01)
    n, runs = 2000, 300
    fractions: list[float] = []
    after: list[bool] = []
    for seed in range(runs):
        m = LinkModel(dataclasses.replace(p, rate_bps=None), seed=seed)
        lost = [m.offer(i * 1e-3, 100) is None for i in range(n)]
        fractions.append(sum(lost) / n)
        after.extend(b for a, b in itertools.pairwise(lost) if a)
    assert statistics.fmean(fractions) == pytest.approx(p.expected_loss, rel=0.05)
    assert statistics.variance(fractions) == pytest.approx(p.loss_variance / n, rel=0.25)
    assert statistics.fmean(after) == pytest.approx(p.loss_after_loss, abs=0.02)
    assert p.loss_after_loss > 10 * p.expected_loss
    assert DirectionParams(loss=0.05).loss_after_loss == pytest.approx(0.05)
