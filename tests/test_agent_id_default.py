"""A unique, stable agent id by default (issue 15 row 4): the konnectivity
DaemonSet sets no ``--agent-id``, and every agent used to be ``agent-1``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edge_agent import config as agent_config
from edge_agent.config import default_agent_id

CREDS = ["--ca-cert=ca.crt", "--agent-cert=a.crt", "--agent-key=a.key"]


def test_explicit_id_wins(tmp_path: Path) -> None:
    cfg = agent_config.from_args([*CREDS, "--agent-id=edge-7", f"--state-dir={tmp_path}"], {})
    assert cfg.agent_id == "edge-7"
    assert cfg.agent_id_source == "flag --agent-id"


def test_node_name_from_the_downward_api(tmp_path: Path) -> None:
    cfg = agent_config.from_args([*CREDS, f"--state-dir={tmp_path}"], {"NODE_NAME": "node-a"})
    assert (cfg.agent_id, cfg.agent_id_source) == ("node-a", "NODE_NAME")


def test_host_name_then_a_kept_uuid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "Gateway-12.example.net")
    assert default_agent_id({}, str(tmp_path)) == ("gateway-12", "host name")
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    first, source = default_agent_id({"NODE_NAME": "not valid!"}, str(tmp_path / "state"))
    assert first.startswith("agent-") and "new UUID" in source
    again, source = default_agent_id({}, str(tmp_path / "state"))
    assert again == first and source.startswith("state file")  # stable across restarts
    assert (tmp_path / "state" / "agent-id").read_text().strip() == first
    other, _ = default_agent_id({}, str(tmp_path / "elsewhere"))
    assert other != first  # unique per device


def test_unusable_state_dir_is_a_start_up_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        agent_config.from_args([*CREDS, f"--state-dir={blocker}/sub"], {})
    assert exc.value.code == 2
    assert "--agent-id: not given" in capsys.readouterr().err


def test_invalid_id_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        agent_config.from_args([*CREDS, "--agent-id=bad id"], {})
    assert "'bad id' is not a valid id" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host=edge-01,ipv4=10.0.0.5", "separate identifiers with '&'"),
        ("host=a b", "host='a b' is not a host name"),
        ("ipv4=999.1.1.1", "ipv4='999.1.1.1'"),
        ("cidr=10.0.0.0/33", "cidr='10.0.0.0/33'"),
        ("colour=blue", "unknown identifier type 'colour'"),
        ("default-route=yes", "default-route must be true or false"),
    ],
)
def test_agent_identifiers_are_validated(
    text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """konnectivity's syntax or a start-up error naming the bad part (issue
    15 row 13: a comma-separated list was taken as one odd host name)."""
    with pytest.raises(SystemExit) as exc:
        agent_config.from_args([*CREDS, "--agent-id=a", f"--agent-identifiers={text}"], {})
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_valid_identifiers_pass() -> None:
    cfg = agent_config.from_args(
        [
            *CREDS,
            "--agent-id=a",
            "--agent-identifiers=host=edge-01&ipv4=10.0.0.5&default-route=true",
        ],
        {},
    )
    assert cfg.agent_identifiers.startswith("host=edge-01")
