"""``--help`` and usage errors of both commands (issue 15 row 14): real
defaults only, never ``(default: )`` or a default shown twice, and a usage
error is the one relevant line plus where to look."""

from __future__ import annotations

import re
import subprocess

import pytest

from tether.tools.launch import BIN

COMMANDS = ["tether-broker", "tether-agent"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_only_real_defaults(command: str) -> None:
    out = subprocess.run(
        [str(BIN / command), "--help"], capture_output=True, text=True, timeout=20, check=True
    ).stdout
    text = re.sub(r"\s+", " ", out)
    assert "(default: )" not in text
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text), text


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", COMMANDS)
def test_usage_error_is_one_line_and_a_pointer(command: str) -> None:
    result = subprocess.run(
        [str(BIN / command), "--no-such-flag"], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{command}: error: unrecognized arguments: --no-such-flag",
        f"see {command} --help",
    ]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tether-agent", "--proxy-server-port=99999"], "port out of range (1-65535): 99999"),
        (["tether-agent", "--proxy-server-port=0"], "port out of range (1-65535): 0"),
        (["tether-agent", "--health-server-port=70000"], "port out of range (0-65535): 70000"),
        (["tether-broker", "--agent-port=65536"], "port out of range (0-65535): 65536"),
    ],
)
def test_ports_are_range_checked_on_both_commands(args: list[str], message: str) -> None:
    """``tether-agent --proxy-server-port 99999`` was accepted and retried
    forever (issue 15 row 8)."""
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:], "--print-config"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[0]


@pytest.mark.parametrize("command", ["broker", "agent"])
def test_every_flag_has_help(command: str) -> None:
    from broker.config import build_parser as broker_parser
    from edge_agent.config import build_parser as agent_parser

    parser = broker_parser() if command == "broker" else agent_parser()
    missing = [a.option_strings[-1] for a in parser._actions if a.option_strings and not a.help]
    assert not missing, missing
