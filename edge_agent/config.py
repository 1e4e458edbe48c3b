"""Agent settings. Flag names follow konnectivity's proxy-agent where the
meaning is the same.

Every flag can also come from a ``TETHER_AGENT_*`` variable or a top-level
key of a TOML file (see :mod:`tether.settings`): ``--config-file``, else
``TETHER_AGENT_CONFIG_FILE``, else ``/etc/tether/agent.toml`` when it exists,
so a device's settings live in one file the systemd unit need not name.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import attrs

from edge_agent.policy import Policy
from protocol import budget
from protocol.identifiers import AgentIdentifiers
from tether import settings

#: Read when neither --config-file nor TETHER_AGENT_CONFIG_FILE names a file.
DEFAULT_CONFIG_FILE = "/etc/tether/agent.toml"


@attrs.frozen
class AgentConfig:
    proxy_server_host: str = "127.0.0.1"
    proxy_server_port: int = 8091
    ca_cert: str = ""
    agent_cert: str = ""
    agent_key: str = ""
    agent_id: str = "agent-1"
    cluster: str = ""
    agent_identifiers: str = ""
    health_server_bind_address: str = "127.0.0.1"
    health_server_port: int = 8093
    sync_interval: float = 1.0
    sync_interval_cap: float = 30.0
    probe_interval_cap: float = 3.0
    stable_after: float = 30.0
    keepalive_time: float = 15.0
    keepalive_timeout: float = 15.0
    tcp_congestion: str = ""
    tcp_notsent_lowat: int = 0
    connect_timeout: float = 10.0
    drain_timeout: float = 10.0
    allow: str = ""
    service_account_token_path: str = ""
    stream_window: int = 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    #: Fits the MemoryMax=128M of deploy/systemd/tether-agent.service.
    max_buffered_bytes: int = budget.AGENT_DEFAULT
    log_format: str = "text"
    log_level: str = "info"
    config_file: str = ""
    cert_reload_interval: float = 5.0
    metrics: bool = False


def build_parser() -> argparse.ArgumentParser:
    d = AgentConfig()
    p = argparse.ArgumentParser(
        prog="tether-agent",
        description="Tether edge agent: keeps one outbound tunnel to the broker and "
        "dials local targets on its behalf.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b = p.add_argument_group("broker connection")
    b.add_argument("--proxy-server-host", default=d.proxy_server_host, help="broker address")
    b.add_argument(
        "--proxy-server-port", type=int, default=d.proxy_server_port, help="broker agent port"
    )
    b.add_argument("--ca-cert", default=d.ca_cert, help="CA that the broker certificate chains to")
    b.add_argument("--agent-cert", default=d.agent_cert, help="this agent's client certificate")
    b.add_argument("--agent-key", default=d.agent_key, help="this agent's client key")
    b.add_argument(
        "--agent-id", default=d.agent_id, help="agent id; must match the certificate's CN"
    )
    b.add_argument(
        "--cluster",
        default=d.cluster,
        help="cluster name sent as tether-cluster (optional with mTLS)",
    )
    b.add_argument(
        "--agent-identifiers",
        default=d.agent_identifiers,
        help="konnectivity form: host=n1&ipv4=10.0.0.5&cidr=10.1.0.0/16&default-route=true",
    )
    b.add_argument(
        "--sync-interval",
        type=settings.positive,
        default=d.sync_interval,
        help="base reconnect backoff (seconds)",
    )
    b.add_argument(
        "--sync-interval-cap",
        type=settings.positive,
        default=d.sync_interval_cap,
        help="reconnect backoff cap (seconds)",
    )
    b.add_argument(
        "--probe-interval-cap",
        type=settings.positive,
        default=d.probe_interval_cap,
        help="reconnect delay cap (seconds) while the broker cannot be reached at all "
        "(connect refused, timed out, no route): cheap probes, fast recovery",
    )
    b.add_argument(
        "--connect-timeout",
        type=settings.positive,
        default=d.connect_timeout,
        help="seconds for TCP, TLS and the control stream handshake",
    )
    b.add_argument(
        "--service-account-token-path",
        default=d.service_account_token_path,
        help="file holding a bearer token for the broker (re-read on every connect, so "
        "rotated tokens work); with it, --agent-cert/--agent-key are optional",
    )
    b.add_argument(
        "--allow",
        default=d.allow,
        help="destination allowlist, CIDR:PORT entries (PORT may be *), e.g. "
        "10.0.0.0/8:10250,0.0.0.0/0:443; empty allows every destination",
    )
    o = p.add_argument_group("operations")
    o.add_argument("--health-server-bind-address", default=d.health_server_bind_address)
    o.add_argument(
        "--health-server-port",
        type=int,
        default=d.health_server_port,
        help="/healthz, /readyz (and /metrics with --metrics); 0 disables",
    )
    o.add_argument(
        "--drain-timeout",
        type=settings.positive,
        default=d.drain_timeout,
        help="seconds open tunnels may finish after SIGTERM",
    )
    o.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=d.metrics,
        help="serve Prometheus /metrics on the health port",
    )
    settings.add_tunnel_arguments(b, d, "broker connection")
    settings.add_common_arguments(o, d, default_file=DEFAULT_CONFIG_FILE)
    return p


SPEC = settings.Spec(
    config_class=AgentConfig,
    env_prefix="TETHER_AGENT_",
    default_file=DEFAULT_CONFIG_FILE,
    list_keys=frozenset({"allow"}),
    checks={"allow": Policy.parse, "agent_identifiers": AgentIdentifiers.parse},
)


def from_args(argv: list[str] | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Flags, then ``TETHER_AGENT_*`` variables, then the config file, then defaults."""
    parser = build_parser()
    resolved = settings.resolve(parser, build_parser, argv, SPEC, environ)
    cfg = AgentConfig(config_file=resolved.config_file, **resolved.values)
    problems = []
    if not cfg.ca_cert:
        problems.append("--ca-cert is required")
    if bool(cfg.agent_cert) != bool(cfg.agent_key):
        problems.append("--agent-cert and --agent-key go together")
    if not cfg.agent_cert and not cfg.service_account_token_path:
        problems.append("give --agent-cert/--agent-key or --service-account-token-path")
    if cfg.sync_interval_cap < cfg.sync_interval:
        problems.append("--sync-interval-cap must be >= --sync-interval")
    try:
        Policy.parse(cfg.allow)
    except ValueError as exc:
        problems.append(f"--allow: {exc}")
    try:
        AgentIdentifiers.parse(cfg.agent_identifiers)
    except ValueError as exc:
        problems.append(f"--agent-identifiers: {exc}")
    if resolved.print_config:
        settings.print_config(parser, resolved, SPEC, problems)
    if problems:
        parser.error("; ".join(problems))
    return cfg
