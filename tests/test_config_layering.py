"""Config files, TETHER_* environment and --print-config for both commands.

Precedence is flags > environment > file > defaults; a bad value anywhere
stops the command with exit status 2 and a message naming the key.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from procs import BrokerHandle, Proc, free_port

from broker import config as broker_config
from edge_agent import config as agent_config
from tether.tools.certs import PkiPaths
from tether.tools.launch import BIN

AGENT_CREDS = ["--ca-cert=ca.crt", "--agent-cert=a.crt", "--agent-key=a.key"]


def broker_creds(pki: PkiPaths) -> list[str]:
    return [
        f"--cluster-cert={pki.broker_cert}",
        f"--cluster-key={pki.broker_key}",
        f"--cluster-ca-cert={pki.ca_cert}",
        "--server-port=0",
        "--uds-name=/tmp/x.sock",
    ]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def exits(fn: Callable[[], object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        fn()
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


# ------------------------------------------------------------------ precedence


@pytest.mark.timeout(10)
def test_agent_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        "keepalive_time = 20\nkeepalive_timeout = 21\nconnect_timeout = 22\n"
        'proxy_server_host = "broker.example"\n',
    )
    env = {"TETHER_AGENT_KEEPALIVE_TIMEOUT": "31", "TETHER_AGENT_CONNECT_TIMEOUT": "32"}
    cfg = agent_config.from_args(
        [f"--config-file={path}", "--connect-timeout=42", *AGENT_CREDS], env
    )
    assert cfg.keepalive_time == 20.0  # file
    assert cfg.keepalive_timeout == 31.0  # env beats file
    assert cfg.connect_timeout == 42.0  # flag beats env
    assert cfg.drain_timeout == 10.0  # default
    assert cfg.proxy_server_host == "broker.example"
    assert cfg.config_file == path


@pytest.mark.timeout(10)
def test_broker_precedence_and_broker_table(tmp_path: Path, pki: PkiPaths) -> None:
    path = write(
        tmp_path / "broker.toml",
        "[broker]\nagent_port = 9001\nhealth_port = 9002\ndrain_retry = 7\n"
        'proxy_strategies = ["destHost", "default"]\n',
    )
    env = {"TETHER_BROKER_AGENT_PORT": "9101", "TETHER_BROKER_HEALTH_PORT": "9102"}
    cfg = broker_config.from_args(
        [f"--config-file={path}", "--health-port=9202", *broker_creds(pki)], env
    )
    assert cfg.agent_port == 9101
    assert cfg.health_port == 9202
    assert cfg.drain_retry == 7.0
    assert cfg.proxy_strategies == ("destHost", "default")
    assert cfg.server_port == 0
    # --config keeps naming the multi-cluster file; it can come from the file too.
    clusters = write(tmp_path / "clusters.toml", "")
    path2 = write(tmp_path / "b2.toml", f'[broker]\nconfig = "{clusters}"\n')
    assert broker_config.from_args([f"--config-file={path2}", *broker_creds(pki)], {}).config == (
        clusters
    )


@pytest.mark.timeout(10)
def test_defaults_and_flags_unchanged_without_file_or_env(pki: PkiPaths) -> None:
    agent = agent_config.from_args([*AGENT_CREDS, "--agent-id=agent-1"], {})
    expected = agent_config.AgentConfig(
        ca_cert="ca.crt",
        agent_cert="a.crt",
        agent_key="a.key",
        agent_id="agent-1",
        agent_id_source="flag --agent-id",
    )
    assert agent == expected
    broker = broker_config.from_args([*broker_creds(pki), "--server-id=b1"], {})
    assert attrs.evolve(broker, cluster_cert="", cluster_key="", cluster_ca_cert="") == (
        broker_config.BrokerConfig(server_id="b1", server_port=0, uds_name="/tmp/x.sock")
    )


@pytest.mark.timeout(10)
def test_lists_booleans_and_env_values(tmp_path: Path) -> None:
    path = write(tmp_path / "a.toml", 'allow = ["10.0.0.0/8:10250", "0.0.0.0/0:443"]\n')
    cfg = agent_config.from_args(
        [f"--config-file={path}", *AGENT_CREDS], {"TETHER_AGENT_METRICS": "yes"}
    )
    assert cfg.allow == "10.0.0.0/8:10250,0.0.0.0/0:443"
    assert cfg.metrics is True
    cfg = agent_config.from_args(
        [f"--config-file={path}", "--no-metrics", *AGENT_CREDS], {"TETHER_AGENT_METRICS": "on"}
    )
    assert cfg.metrics is False


@pytest.mark.timeout(10)
def test_agent_config_file_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = write(tmp_path / "default.toml", "agent_id = 'from-default'\n")
    other = write(tmp_path / "other.toml", "agent_id = 'from-env-file'\n")
    spec = attrs.evolve(agent_config.SPEC, default_file=default)
    monkeypatch.setattr(agent_config, "SPEC", spec)
    assert agent_config.from_args(AGENT_CREDS, {}).agent_id == "from-default"
    env = {"TETHER_AGENT_CONFIG_FILE": other}
    assert agent_config.from_args(AGENT_CREDS, env).agent_id == "from-env-file"
    # An empty --config-file turns the default off.
    assert agent_config.from_args(["--config-file=", *AGENT_CREDS], {}).agent_id not in (
        "from-default",
        "from-env-file",
    )
    monkeypatch.setattr(agent_config, "SPEC", attrs.evolve(spec, default_file=str(tmp_path / "no")))
    assert agent_config.from_args(AGENT_CREDS, {}).config_file == ""


# ---------------------------------------------------------------------- errors


AGENT_FILE_ERRORS = [
    ('keepalive_time = "soon"', "agent.toml: keepalive_time: invalid duration 'soon'"),
    ('keepalive_time = "5x"', "agent.toml: keepalive_time: invalid duration '5x'"),
    ("keepalive_time = -1", "agent.toml: keepalive_time: must be positive"),
    ("proxy_server_port = 1.5", "agent.toml: proxy_server_port: must be an integer"),
    ("agent_id = 7", "agent.toml: agent_id: must be a string"),
    ('log_format = "xml"', "agent.toml: log_format: must be one of text, json"),
    ('metrics = "yes"', "agent.toml: metrics: must be true or false"),
    ("keepalive = 3", "agent.toml: keepalive: unknown key (did you mean keepalive_time?)"),
    ('allow = ["10.0.0.0/8"]', "agent.toml: allow: "),
    ('agent_identifiers = "planet=mars"', "agent.toml: agent_identifiers: "),
    ("keepalive_time = ", "agent.toml: "),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("text", "message"), AGENT_FILE_ERRORS)
def test_agent_file_errors_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path / "agent.toml", text + "\n")
    code, _, err = exits(
        lambda: agent_config.from_args([f"--config-file={path}", *AGENT_CREDS], {}), capsys
    )
    assert code == 2
    assert message in err, err


BROKER_FILE_ERRORS = [
    ("agent_port = 1\n", "unknown top-level key(s) agent_port; settings go in a [broker] table"),
    ("[broker]\nagent_port = 70000\n", "broker.toml: broker.agent_port: port out of range"),
    ('[broker]\nproxy_strategies = ["nearest"]\n', "broker.proxy_strategies: unknown proxy"),
    ('[broker]\nmode = "socks"\n', "broker.toml: broker.mode: must be one of http-connect, grpc"),
    ("broker = 3\n", "broker.toml: broker: must be a table"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("text", "message"), BROKER_FILE_ERRORS)
def test_broker_file_errors_name_the_key(
    tmp_path: Path, pki: PkiPaths, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path / "broker.toml", text)
    code, _, err = exits(
        lambda: broker_config.from_args([f"--config-file={path}", *broker_creds(pki)], {}), capsys
    )
    assert code == 2
    assert message in err, err


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TETHER_AGENT_KEEPALIVE_TIME": "soon"},
            "TETHER_AGENT_KEEPALIVE_TIME: invalid duration 'soon'",
        ),
        ({"TETHER_AGENT_METRICS": "maybe"}, "TETHER_AGENT_METRICS: must be true or false"),
        ({"TETHER_AGENT_CONFIG_FILE": "/nonexistent.toml"}, "cannot read config file"),
    ],
)
def test_env_errors_name_the_variable(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], message: str
) -> None:
    code, _, err = exits(lambda: agent_config.from_args(AGENT_CREDS, env), capsys)
    assert code == 2
    assert message in err, err


# ---------------------------------------------------------------- print-config


@pytest.mark.timeout(10)
def test_print_config_round_trips_and_shows_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("tok-sekr1t-value-123\n")
    path = write(tmp_path / "agent.toml", f'service_account_token_path = "{token}"\n')
    env = {"TETHER_AGENT_KEEPALIVE_TIME": "9", "TETHER_AGENT_NO_SUCH_THING": "1"}
    argv = [f"--config-file={path}", "--ca-cert=ca.crt", "--agent-id=edge-7"]
    cfg = agent_config.from_args(argv, env)
    code, out, _ = exits(lambda: agent_config.from_args([*argv, "--print-config"], env), capsys)
    assert code == 0
    printed = tomllib.loads(out)
    assert printed["keepalive_time"] == 9.0
    assert printed["service_account_token_path"] == str(token)  # the path, never the token
    assert "tok-sekr1t-value-123" not in out
    assert "keepalive_time = 9.0  # env TETHER_AGENT_KEEPALIVE_TIME" in out
    assert 'agent_id = "edge-7"  # flag --agent-id' in out
    assert f'service_account_token_path = "{token}"  # file' in out
    assert "ignored (no such setting): TETHER_AGENT_NO_SUCH_THING" in out
    # The output is itself a config file that reproduces the same settings.
    again = write(tmp_path / "printed.toml", out)
    assert agent_config.from_args([f"--config-file={again}"], {}) == attrs.evolve(
        cfg, config_file=again, agent_id_source="file"
    )


@pytest.mark.timeout(10)
def test_broker_print_config_is_a_broker_table_and_checks(
    tmp_path: Path, pki: PkiPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*broker_creds(pki), "--server-id=b1"]
    cfg = broker_config.from_args(argv, {"TETHER_BROKER_AGENT_PORT": "9911"})
    code, out, _ = exits(
        lambda: broker_config.from_args(
            [*argv, "--print-config"], {"TETHER_BROKER_AGENT_PORT": "9911"}
        ),
        capsys,
    )
    assert code == 0
    assert tomllib.loads(out)["broker"]["agent_port"] == 9911
    again = write(tmp_path / "printed.toml", out)
    assert broker_config.from_args([f"--config-file={again}"], {}) == attrs.evolve(
        cfg, config_file=again
    )
    # Settings that parse but do not fit together: printed, then exit 2.
    code, out, err = exits(lambda: broker_config.from_args(["--print-config"], {}), capsys)
    assert code == 2
    assert "[broker]" in out
    assert "--cluster-cert and --cluster-key are required" in err


# --------------------------------------------------------- the real commands


@pytest.mark.timeout(30)
async def test_commands_run_from_config_files_and_env(
    tmp_path: Path, pki: PkiPaths, procs_started: list[Proc]
) -> None:
    agent_port, health_port, admin_port = free_port(), free_port(), free_port()
    broker_toml = write(
        tmp_path / "broker.toml",
        f"""[broker]
agent_bind_address = "127.0.0.1"
health_bind_address = "127.0.0.1"
server_port = 0
uds_name = "{tmp_path / "b.sock"}"
cluster_cert = "{pki.broker_cert}"
cluster_key = "{pki.broker_key}"
cluster_ca_cert = "{pki.ca_cert}"
""",
    )
    cert, key = pki.agent("agent-1")
    agent_toml = write(
        tmp_path / "agent.toml",
        f"""proxy_server_host = "127.0.0.1"
proxy_server_port = {agent_port}
ca_cert = "{pki.ca_cert}"
agent_cert = "{cert}"
agent_key = "{key}"
agent_id = "agent-1"
health_server_port = 0
""",
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    broker_env = {
        **base,
        "TETHER_BROKER_CONFIG_FILE": broker_toml,
        "TETHER_BROKER_AGENT_PORT": str(agent_port),
        "TETHER_BROKER_HEALTH_PORT": str(health_port),
        "TETHER_BROKER_ADMIN_PORT": str(admin_port),
    }
    broker = Proc("broker", [str(BIN / "tether-broker")], tmp_path / "broker.log", env=broker_env)
    procs_started.append(broker)
    agent = Proc(
        "agent",
        [str(BIN / "tether-agent"), f"--config-file={agent_toml}"],
        tmp_path / "agent.log",
        env=base,
    )
    procs_started.append(agent)
    handle = BrokerHandle(broker, agent_port, 0, health_port, "", pki, admin_port)
    await handle.ready(agents=1)

    # A bad file stops the command before it starts anything.
    bad = write(tmp_path / "bad.toml", 'keepalive_time = "soon"\n')
    result = subprocess.run(
        [str(BIN / "tether-agent"), f"--config-file={bad}"],
        capture_output=True,
        text=True,
        timeout=20,
        env=base,
    )
    assert result.returncode == 2
    assert "bad.toml: keepalive_time: invalid duration 'soon'" in result.stderr
