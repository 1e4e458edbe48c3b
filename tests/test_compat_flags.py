"""konnectivity's flags through tether.compat: renamed, mapped or accepted
with a WARNING, in Go's flag syntax (issue 15 items 1 and 10)."""

from __future__ import annotations

import pytest

from tether.compat import AGENT, SERVER, CompatError, translate


def test_ours_pass_through_untouched() -> None:
    argv = ["--agent-port=8132", "--keepalive-time", "1h", "pos", "--", "--v=9"]
    got = translate(argv, SERVER)
    assert got.argv == argv and got.warnings == []


def test_klog_flags_map_to_our_logging() -> None:
    got = translate(["--logtostderr=true", "--v=4", "--alsologtostderr"], SERVER)
    assert got.argv == ["--log-level=debug"]
    assert got.warnings == []
    assert translate(["-v", "1"], AGENT).argv == ["--log-level=info"]
    # an explicit --log-level after it still wins (argparse: the last one)
    assert translate(["--v=5", "--log-level=warning"], AGENT).argv == [
        "--log-level=debug",
        "--log-level=warning",
    ]


def test_renamed_flags_keep_their_value() -> None:
    assert translate(["--graceful-shutdown-timeout", "30s"], SERVER).argv == ["--drain-timeout=30s"]
    assert translate(["--health-server-host=0.0.0.0"], AGENT).argv == [
        "--health-server-bind-address=0.0.0.0"
    ]


def test_meaningless_flags_are_dropped_with_one_warning_each() -> None:
    got = translate(
        [
            "--enable-profiling",
            "--xfr-channel-size=150",
            "--xfr-channel-size",
            "200",
            "--sync-forever=true",
            "--probe-interval=5s",
            "--agent-id=edge-1",
        ],
        AGENT,
    )
    assert got.argv == ["--agent-id=edge-1"]
    assert len(got.warnings) == 3  # profiling, channel size (once), probe interval
    assert all("accepted for konnectivity compatibility, ignored" in w for w in got.warnings)
    assert any(w.startswith("--xfr-channel-size=150:") for w in got.warnings)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--v=loud"], "invalid value 'loud' for --v"),
        (["--enable-profiling=maybe"], "invalid boolean value 'maybe'"),
        (["--xfr-channel-size"], "flag needs an argument: --xfr-channel-size"),
    ],
)
def test_bad_values_are_one_line_errors(argv: list[str], message: str) -> None:
    with pytest.raises(CompatError, match=message):
        translate(argv, SERVER if "agent" not in argv[0] else AGENT)


def test_go_booleans_do_not_swallow_the_next_argument() -> None:
    assert translate(["--enable-profiling", "--agent-port=1"], SERVER).argv == ["--agent-port=1"]


def test_tls_min_version_maps_to_the_agent_port() -> None:
    assert translate(["--tls-min-version=VersionTLS13"], SERVER).argv == [
        "--agent-tls-min-version=1.3"
    ]
    got = translate(["--tls-min-version", "VersionTLS10"], SERVER)
    assert got.argv == ["--agent-tls-min-version=1.2"]
    assert "never offered" in got.warnings[0]
    with pytest.raises(CompatError, match="VersionTLS12 or VersionTLS13"):
        translate(["--tls-min-version=1.3"], SERVER)
