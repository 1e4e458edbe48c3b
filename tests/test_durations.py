"""Durations take konnectivity's Go syntax as well as plain seconds, in
flags, environment and files alike; flags are never abbreviated."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import config as broker_config
from edge_agent import config as agent_config
from tether.settings import duration
from tether.tools.launch import BIN

AGENT_CREDS = ["--ca-cert=ca.crt", "--agent-cert=a.crt", "--agent-key=a.key"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20", 20.0),
        ("0.5", 0.5),
        ("1h", 3600.0),
        ("5s", 5.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("2h45m", 9900.0),
        ("300us", 300e-6),
        ("300\u00b5s", 300e-6),
        ("10ns", 10e-9),
        (".5s", 0.5),
        ("0", 0.0),
        ("-1s", -1.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1x", "1h30", "h1", "1 h", "1e3s", "nan", "inf", "--1s"])
def test_bad_durations_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        duration(text)


@given(st.integers(0, 10**6), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_composite_durations_add_up(h: int, m: int, s: int, ms: int) -> None:
    assert duration(f"{h}h{m}m{s}s{ms}ms") == pytest.approx(h * 3600 + m * 60 + s + ms / 1000)


def test_konnectivity_values_in_flags_env_and_file(tmp_path: Path) -> None:
    cfg = agent_config.from_args([*AGENT_CREDS, "--keepalive-time=1h", "--sync-interval=5s"], {})
    assert (cfg.keepalive_time, cfg.sync_interval) == (3600.0, 5.0)
    env = {"TETHER_AGENT_SYNC_INTERVAL_CAP": "1m30s"}
    assert agent_config.from_args(AGENT_CREDS, env).sync_interval_cap == 90.0
    path = tmp_path / "agent.toml"
    path.write_text('keepalive_timeout = "500ms"\nconnect_timeout = 7\n')
    cfg = agent_config.from_args([*AGENT_CREDS, f"--config-file={path}"], {})
    assert (cfg.keepalive_timeout, cfg.connect_timeout) == (0.5, 7.0)
    bcfg = broker_config.from_args(
        [
            "--cluster-cert=b.crt",
            "--cluster-key=b.key",
            "--cluster-ca-cert=ca.crt",
            "--server-port=0",
            "--uds-name=/tmp/x.sock",
            "--backend-dial-timeout=2s",
            "--drain-timeout=1m",
        ],
        {},
    )
    assert (bcfg.backend_dial_timeout, bcfg.drain_timeout) == (2.0, 60.0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["tether-agent", "tether-broker"])
def test_flags_are_never_abbreviated(command: str) -> None:
    """``--probe-interval`` (a konnectivity agent flag, now accepted as such
    with a warning) once silently meant ``--probe-interval-cap``; a prefix
    of a flag is an unknown flag."""
    flag = "--probe-interval-c=5" if command == "tether-agent" else "--drain-time=5"
    result = subprocess.run(
        [str(BIN / command), flag, "--print-config"], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
    assert flag in result.stderr
