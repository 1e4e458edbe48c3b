"""Agent settings. Flag names follow konnectivity's proxy-agent where the
meaning is the same.

Every flag can also come from a ``TETHER_AGENT_*`` variable or a top-level
key of a TOML file (see :mod:`tether.settings`): ``--config-file``, else
``TETHER_AGENT_CONFIG_FILE``, else ``/etc/tether/agent.toml`` when it exists,
so a device's settings live in one file the systemd unit need not name.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

import attrs

from edge_agent.policy import Policy
from protocol import budget, leases
from protocol.identifiers import AgentIdentifiers, valid_name
from tether import compat, settings

#: Read when neither --config-file nor TETHER_AGENT_CONFIG_FILE names a file.
DEFAULT_CONFIG_FILE = "/etc/tether/agent.toml"


@attrs.frozen
class AgentConfig:
    proxy_server_host: str = "127.0.0.1"
    proxy_server_port: int = 8091
    #: TLS server name (SNI, and the name the broker certificate must carry);
    #: ``{cluster}`` stands for ``cluster``. Empty: ``proxy_server_host``.
    server_name: str = ""
    ca_cert: str = ""
    agent_cert: str = ""
    agent_key: str = ""
    agent_id: str = ""
    cluster: str = ""
    agent_identifiers: str = ""
    health_server_bind_address: str = "127.0.0.1"
    health_server_port: int = 8093
    admin_bind_address: str = "127.0.0.1"
    admin_server_port: int = 8094
    sync_interval: float = 1.0
    sync_interval_cap: float = 30.0
    probe_interval_cap: float = 3.0
    stable_after: float = 30.0
    keepalive_time: float = 15.0
    keepalive_timeout: float = 15.0
    tcp_congestion: str = ""
    tcp_notsent_lowat: int = 0
    connect_timeout: float = 10.0
    #: Seconds of silence before a probe, then a hedged reconnect (0: off).
    hedge_after: float = 10.0
    #: Spacing of fresh connection attempts while a hedge races.
    hedge_interval: float = 0.4
    #: How the agent notices address and route changes: netlink, poll or off.
    watch_network: str = "netlink"
    #: Seconds between checks when polling (no netlink).
    network_poll_interval: float = 2.0
    drain_timeout: float = 10.0
    allow: str = ""
    service_account_token_path: str = ""
    stream_window: int = 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    #: Fits the MemoryMax=128M of deploy/systemd/tether-agent.service.
    max_buffered_bytes: int = budget.AGENT_DEFAULT
    log_format: str = "text"
    log_level: str = "info"
    log_file: str = ""
    #: MiB, as klog's flag of the same name (0: unlimited).
    log_file_max_size: int = 1800
    log_stderr: bool = True
    config_file: str = ""
    cert_reload_interval: float = 5.0
    metrics: bool = False
    state_dir: str = "/var/lib/tether-agent"
    count_server_leases: bool = False
    kubeconfig: str = ""
    lease_namespace: str = leases.DEFAULT_NAMESPACE
    lease_label: str = leases.DEFAULT_LABEL
    #: How agent_id was chosen ("flag", "NODE_NAME", "host name", "state file ..."); not a setting.
    agent_id_source: str = "setting"
    #: konnectivity flags accepted without a meaning here (logged at start); not a setting.
    compat_warnings: tuple[str, ...] = ()


def build_parser() -> argparse.ArgumentParser:
    d = AgentConfig()
    p = settings.Parser(
        prog="tether-agent",
        description="Tether edge agent: keeps one outbound tunnel to the broker and "
        "dials local targets on its behalf.",
    )
    b = p.add_argument_group("broker connection")
    b.add_argument("--proxy-server-host", default=d.proxy_server_host, help="broker address")
    b.add_argument(
        "--proxy-server-port",
        type=settings.remote_port,
        default=d.proxy_server_port,
        help="broker agent port",
    )
    b.add_argument(
        "--server-name",
        default=d.server_name,
        help="TLS server name sent to the broker (SNI) and checked against its certificate; "
        "{cluster} stands for --cluster (e.g. {cluster}.brokers.example, for a load balancer "
        "routing clusters to broker sets by SNI). Default: --proxy-server-host",
    )
    b.add_argument("--ca-cert", default=d.ca_cert, help="CA that the broker certificate chains to")
    b.add_argument("--agent-cert", default=d.agent_cert, help="this agent's client certificate")
    b.add_argument("--agent-key", default=d.agent_key, help="this agent's client key")
    b.add_argument(
        "--agent-id",
        default=d.agent_id,
        help="agent id; must match the certificate's CN. Default: $NODE_NAME (the DaemonSet "
        "sets it), else the host name, else a UUID kept in --state-dir",
    )
    b.add_argument(
        "--count-server-leases",
        action=argparse.BooleanOptionalAction,
        default=d.count_server_leases,
        help="learn the number of broker replicas from their live coordination.k8s.io Leases "
        "(brokers with --enable-lease-controller), as konnectivity's agent does",
    )
    b.add_argument(
        "--kubeconfig",
        default=d.kubeconfig,
        help="kubeconfig for --count-server-leases; empty: the pod's ServiceAccount",
    )
    b.add_argument(
        "--lease-namespace", default=d.lease_namespace, help="namespace of the brokers' Leases"
    )
    b.add_argument(
        "--lease-label",
        default=d.lease_label,
        help="label selector of the brokers' Leases (key=value[,key=value])",
    )
    b.add_argument(
        "--state-dir",
        default=d.state_dir,
        help="where the agent keeps the UUID it made up as its id when neither --agent-id, "
        "$NODE_NAME nor the host name gives one",
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
        "--hedge-after",
        type=settings.non_negative,
        default=d.hedge_after,
        help="seconds a broker connection may hear nothing before the agent sends a probe "
        "PING and, unanswered, races fresh connections beside it (hedged reconnect); the "
        "first accepted takes new dials, streams on the old one finish or die with it; "
        "0 disables",
    )
    b.add_argument(
        "--hedge-interval",
        type=settings.positive,
        default=d.hedge_interval,
        help="seconds between fresh connection attempts while a hedge races (0.4: with the "
        "kernel's SYN retransmission 1 s into each attempt, a SYN leaves every 0.2 s)",
    )
    b.add_argument(
        "--watch-network",
        choices=("netlink", "poll", "off"),
        default=d.watch_network,
        help="notice local address and route changes (netlink, falling back to polling "
        "where netlink is unavailable): reconnect at once when the tunnel's address "
        "disappears, hedge when the route to the broker moves",
    )
    b.add_argument(
        "--network-poll-interval",
        type=settings.positive,
        default=d.network_poll_interval,
        help="seconds between address and route checks when polling",
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
    o.add_argument(
        "--health-server-bind-address",
        default=d.health_server_bind_address,
        help="address of the /healthz and /readyz listener",
    )
    o.add_argument(
        "--health-server-port",
        type=settings.port,
        default=d.health_server_port,
        help="/healthz and /readyz; 0 disables",
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
        help="serve Prometheus /metrics on the admin port",
    )
    o.add_argument(
        "--admin-bind-address",
        default=d.admin_bind_address,
        help="address of the admin port (/metrics, unauthenticated)",
    )
    o.add_argument(
        "--admin-server-port",
        type=int,
        default=d.admin_server_port,
        help="/metrics with --metrics, as konnectivity-agent's admin port; 0 disables",
    )
    settings.add_tunnel_arguments(b, d, "broker connection")
    settings.add_common_arguments(o, d, default_file=DEFAULT_CONFIG_FILE)
    return p


_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def tls_server_name(template: str, cluster: str, host: str) -> str:
    """The name the agent sends as SNI and verifies the broker certificate
    against: ``template`` with ``{cluster}`` replaced, or ``host`` when the
    template is empty. ValueError (one line) for a name TLS cannot carry."""
    if not template:
        return host.strip("[]")
    rest = template.replace("{cluster}", "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"{template!r}: only {{cluster}} may be substituted")
    if "{cluster}" in template and not cluster:
        raise ValueError(f"{template!r} uses {{cluster}}, but --cluster is not set")
    name = template.replace("{cluster}", cluster)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return name  # no SNI is sent for an address; the certificate must carry it
    labels = name.split(".")
    if (
        len(name) > 253
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError(
            f"{name!r} is not a DNS name (labels of letters, digits and inner '-', "
            "joined by '.'; no wildcard, no trailing dot) nor an IP address"
        )
    return name


def _own_identifiers(text: str) -> AgentIdentifiers:
    """konnectivity's syntax (``host=a&ipv4=10.0.0.5&cidr=...&default-route=true``),
    with host names that are host names."""
    return AgentIdentifiers.parse(text, check_hosts=True)


#: Settings whose value must parse. A file or environment value is checked as
#: it is read (the error names the key there); a flag's in :func:`from_args`.
CHECKS = {"allow": Policy.parse, "agent_identifiers": _own_identifiers}

SPEC = settings.Spec(
    config_class=AgentConfig,
    env_prefix="TETHER_AGENT_",
    default_file=DEFAULT_CONFIG_FILE,
    list_keys=frozenset({"allow"}),
    checks=CHECKS,
    compat=compat.AGENT,
)


def default_agent_id(environ: Mapping[str, str] | None, state_dir: str) -> tuple[str, str]:
    """An agent id when none is configured, stable across restarts: the node
    name the DaemonSet passes in ``NODE_NAME``, else the host name, else a
    UUID made up once and kept in ``state_dir``. Returns (id, where from)."""
    env = os.environ if environ is None else environ
    node = env.get("NODE_NAME", "").strip()
    if valid_name(node):
        return node, "NODE_NAME"
    host = socket.gethostname().split(".", 1)[0].lower()
    if valid_name(host) and host not in ("localhost", "localhost6"):
        return host, "host name"
    path = Path(state_dir) / "agent-id"
    try:
        kept = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        kept = ""
    if valid_name(kept):
        return kept, f"state file {path}"
    import uuid  # only to make a new id

    made = f"agent-{uuid.uuid4()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".agent-id.{os.getpid()}")
    tmp.write_text(made + "\n", encoding="ascii")
    os.replace(tmp, path)
    return made, f"new UUID, kept in {path}"


def from_args(argv: list[str] | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Flags, then ``TETHER_AGENT_*`` variables, then the config file, then defaults."""
    parser = build_parser()
    resolved = settings.resolve(parser, build_parser, argv, SPEC, environ)
    cfg = AgentConfig(
        config_file=resolved.config_file,
        compat_warnings=resolved.compat_warnings,
        **resolved.values,
    )
    problems = []
    if cfg.agent_id:
        cfg = attrs.evolve(cfg, agent_id_source=resolved.sources.get("agent_id", "setting"))
    else:
        try:
            agent_id, source = default_agent_id(environ, cfg.state_dir)
        except OSError as exc:
            problems.append(
                f"--agent-id: not given, and no id could be kept in --state-dir "
                f"{cfg.state_dir}: {exc.strerror or exc}"
            )
        else:
            cfg = attrs.evolve(cfg, agent_id=agent_id, agent_id_source=source)
    if cfg.agent_id and not valid_name(cfg.agent_id):
        problems.append(
            f"--agent-id: {cfg.agent_id!r} is not a valid id "
            "(letters, digits, '.', '_', '-'; at most 63; starts with a letter or digit)"
        )
    if not cfg.ca_cert:
        problems.append("--ca-cert is required")
    if bool(cfg.agent_cert) != bool(cfg.agent_key):
        problems.append("--agent-cert and --agent-key go together")
    if not cfg.agent_cert and not cfg.service_account_token_path:
        problems.append("give --agent-cert/--agent-key or --service-account-token-path")
    try:
        tls_server_name(cfg.server_name, cfg.cluster, cfg.proxy_server_host)
    except ValueError as exc:
        problems.append(f"{settings.where(resolved, 'server_name')}: {exc}")
    if cfg.sync_interval_cap < cfg.sync_interval:
        problems.append("--sync-interval-cap must be >= --sync-interval")
    for key, check in CHECKS.items():
        if resolved.sources.get(key, "").startswith("flag "):  # others: checked as read
            try:
                check(getattr(cfg, key))
            except ValueError as exc:
                problems.append(f"{settings.where(resolved, key)}: {exc}")
    if cfg.count_server_leases:
        try:
            leases.parse_labels(cfg.lease_label)
        except ValueError as exc:
            problems.append(f"--lease-label: {exc}")
    if resolved.print_config:
        settings.print_config(parser, resolved, SPEC, problems)
    if problems:
        parser.error("; ".join(problems))
    return cfg
