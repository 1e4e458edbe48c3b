"""Every flag of konnectivity's proxy-server and proxy-agent (v0.34, kept as
data in tests/data/konnectivity_flags.py) is accepted by the matching
command with konnectivity's meaning (issue 15 items 1 and 3)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from broker import config as broker_config
from edge_agent import config as agent_config
from tether import compat
from tether.tools.certs import PkiPaths

sys.path.insert(0, str(Path(__file__).parent / "data"))
import konnectivity_flags


def _value(raw: str | None, files: dict[str, str]) -> str | None:
    return files[raw[1:]] if raw is not None and raw.startswith("@") else raw


def _argv(name: str, raw: str | None, files: dict[str, str]) -> list[str]:
    value = _value(raw, files)
    return [f"--{name}"] if value is None else [f"--{name}={value}"]


@pytest.fixture
def files(pki: PkiPaths, tmp_path: Path) -> dict[str, str]:
    token = tmp_path / "token"
    token.write_text("t0ken")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    return {
        "broker_cert": str(pki.broker_cert),
        "broker_key": str(pki.broker_key),
        "frontend_ca": str(pki.frontend_ca_cert),
        "ca_cert": str(pki.ca_cert),
        "agent_cert": str(pki.agent("agent-1")[0]),
        "agent_key": str(pki.agent("agent-1")[1]),
        "uds": str(tmp_path / "k.sock"),
        "token": str(token),
        "kubeconfig": str(kubeconfig),
    }


def _no_meaning(flags: list[compat.Flag]) -> set[str]:
    return {f.name for f in flags if f.kind is compat.Kind.IGNORED}


@pytest.mark.parametrize(("name", "value"), konnectivity_flags.SERVER)
def test_every_proxy_server_flag_is_accepted(
    name: str, value: str | None, files: dict[str, str]
) -> None:
    base = [
        f"--cluster-cert={files['broker_cert']}",
        f"--cluster-key={files['broker_key']}",
        f"--cluster-ca-cert={files['ca_cert']}",
        f"--uds-name={files['uds']}",
    ]
    cfg = broker_config.from_args([*base, *_argv(name, value, files)], {})
    warned = any(w.startswith(f"--{name}") for w in cfg.compat_warnings)
    assert warned == (name in _no_meaning(list(compat.SERVER))), cfg.compat_warnings


@pytest.mark.parametrize(("name", "value"), konnectivity_flags.AGENT)
def test_every_proxy_agent_flag_is_accepted(
    name: str, value: str | None, files: dict[str, str]
) -> None:
    base = [
        f"--ca-cert={files['ca_cert']}",
        f"--agent-cert={files['agent_cert']}",
        f"--agent-key={files['agent_key']}",
        "--agent-id=node-1",
    ]
    cfg = agent_config.from_args([*base, *_argv(name, value, files)], {})
    warned = any(w.startswith(f"--{name}") for w in cfg.compat_warnings)
    assert warned == (name in _no_meaning(list(compat.AGENT))), cfg.compat_warnings


def test_meanings_that_exist_here_are_applied(files: dict[str, str]) -> None:
    base = [
        f"--cluster-cert={files['broker_cert']}",
        f"--cluster-key={files['broker_key']}",
        f"--cluster-ca-cert={files['ca_cert']}",
        f"--uds-name={files['uds']}",
    ]
    cfg = broker_config.from_args(
        [
            *base,
            "--keepalive-time=1h",
            "--graceful-shutdown-timeout=15s",
            "--backend-dial-timeout=5s",
            "--admin-port=8133",
            "--v=4",
            "--tls-min-version=VersionTLS12",
        ],
        {},
    )
    assert cfg.keepalive_time == 3600 and cfg.drain_timeout == 15
    assert cfg.backend_dial_timeout == 5 and cfg.admin_port == 8133
    assert cfg.log_level == "debug" and cfg.agent_tls_min_version == "1.2"
    agent = agent_config.from_args(
        [
            f"--ca-cert={files['ca_cert']}",
            f"--service-account-token-path={files['token']}",
            "--health-server-host=0.0.0.0",
            "--sync-interval=5s",
            "--sync-interval-cap=30s",
            "--admin-server-port=8133",
        ],
        {"NODE_NAME": "node-7"},
    )
    assert agent.health_server_bind_address == "0.0.0.0"
    assert (agent.sync_interval, agent.sync_interval_cap) == (5, 30)
    assert agent.admin_server_port == 8133 and agent.agent_id == "node-7"
