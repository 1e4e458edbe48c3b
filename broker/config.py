"""Broker settings. Flag names follow konnectivity's proxy-server where the
meaning is the same, so existing manifests translate one to one.

Every flag can also come from a ``TETHER_BROKER_*`` variable or from the
``[broker]`` table of ``--config-file`` (see :mod:`tether.settings`); the
table leaves room for other sections in the same file, and ``--config``
keeps naming the multi-cluster file.
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Mapping

import attrs

from broker.clusters import parse_allowed_identifiers
from broker.registry import parse_strategies
from protocol import budget, leases
from tether import compat, settings
from tether.netio.listeners import parse_mode

#: How a worker of ``--workers`` finds its inherited descriptors (JSON, set
#: by the supervisor; broker/workers.py). Here so that a broker without
#: workers need not import that module to check it.
WORKER_ENV = "TETHER_WORKER_CHANNEL"


@attrs.frozen
class BrokerConfig:
    mode: str = "http-connect"
    uds_name: str = ""
    uds_owner: str = ""
    uds_group: str = ""
    uds_mode: str = "0660"
    server_bind_address: str = ""
    server_port: int = 8090
    server_cert: str = ""
    server_key: str = ""
    server_ca_cert: str = ""
    frontend_allowed_subjects: str = "tether-frontend"
    agent_bind_address: str = ""
    agent_port: int = 8091
    cluster_cert: str = ""
    cluster_key: str = ""
    cluster_ca_cert: str = ""
    agent_tls_min_version: str = "1.3"
    agent_tls_ticket_key_file: str = ""
    cluster_name: str = "default"
    health_bind_address: str = ""
    health_port: int = 8092
    admin_bind_address: str = "127.0.0.1"
    admin_port: int = 8095
    server_id: str = attrs.Factory(lambda: uuid.uuid4().hex[:12])
    server_count: int = 1
    proxy_strategies: tuple[str, ...] = ("default",)
    backend_dial_timeout: float = 10.0
    agent_return_wait: float = 2.0
    agent_return_window: float = 300.0
    keepalive_time: float = 15.0
    keepalive_timeout: float = 15.0
    tcp_congestion: str = ""
    tcp_notsent_lowat: int = 0
    handshake_timeout: float = 10.0
    frontend_header_timeout: float = 10.0
    stream_window: int = 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    max_buffered_bytes: int = budget.BROKER_DEFAULT
    max_frontend_connections: int = 10_000
    optimistic_connect: bool = False
    max_handshakes_per_ip: int = 128
    max_concurrent_handshakes: int = 32
    agent_accept_rate: float = 1000.0
    agent_accept_queue: int = 16384
    #: Seconds between full collections of everything (tether/netio/gc_tenure.py); 0: off.
    gc_full_interval: float = 300.0
    flood_penalty_after: int = 3
    max_grpc_message_size: int = 4 * 1024 * 1024
    max_grpc_streams: int = 1000
    drain_timeout: float = 10.0
    #: Worker processes sharing this host's listeners (broker/workers.py); 1: none.
    workers: int = 1
    drain_retry: float = 5.0
    config: str = ""
    agent_token_file: str = ""
    kubeconfig: str = ""
    enable_lease_controller: bool = False
    lease_namespace: str = leases.DEFAULT_NAMESPACE
    lease_label: str = leases.DEFAULT_LABEL
    authentication_audience: str = ""
    agent_namespace: str = ""
    agent_service_account: str = ""
    tokenreview_bind_node_name: bool = True
    tokenreview_source_rate: float = 5.0
    tokenreview_source_burst: int = 20
    agent_identifiers_policy: str = "credential"
    agent_allowed_identifiers: str = ""
    log_format: str = "text"
    log_level: str = "info"
    log_file: str = ""
    #: MiB, as klog's flag of the same name (0: unlimited).
    log_file_max_size: int = 1800
    log_stderr: bool = True
    config_file: str = ""
    cert_reload_interval: float = 5.0
    #: konnectivity flags accepted without a meaning here (logged at start); not a setting.
    compat_warnings: tuple[str, ...] = ()


def _mode(text: str) -> str:
    try:
        return f"{parse_mode(text):04o}"
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    if text.strip() == "auto":
        return max(1, os.cpu_count() or 1)
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from None
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError("must be between 1 and 64, or 'auto'")
    return n


def build_parser() -> argparse.ArgumentParser:
    d = BrokerConfig(server_id="")
    p = settings.Parser(
        prog="tether-broker",
        description="Tether broker: fronts kube-apiserver egress and routes dials to edge agents.",
    )
    fe = p.add_argument_group("frontends (kube-apiserver side)")
    fe.add_argument(
        "--mode",
        choices=["http-connect", "grpc"],
        default=d.mode,
        help="protocol served on --uds-name",
    )
    fe.add_argument(
        "--uds-name",
        default=d.uds_name,
        help="Unix socket for the egress frontend; empty disables it. A live socket at "
        "the path (another broker's) is never replaced: the broker refuses to start",
    )
    fe.add_argument(
        "--uds-owner",
        default=d.uds_owner,
        help="owner of --uds-name, a user name or uid (empty: the broker's user)",
    )
    fe.add_argument(
        "--uds-group",
        default=d.uds_group,
        help="group of --uds-name, a group name or gid (empty: the broker's group); "
        "kube-apiserver must run as the owner or in this group",
    )
    fe.add_argument("--uds-mode", type=_mode, default=d.uds_mode, help="mode of --uds-name, octal")
    fe.add_argument(
        "--server-bind-address",
        default=d.server_bind_address,
        help="address of the TCP mTLS CONNECT frontend (empty: all)",
    )
    fe.add_argument(
        "--server-port",
        type=settings.port,
        default=d.server_port,
        help="port of the TCP mTLS CONNECT frontend; 0 disables it. With --uds-name "
        "the TCP frontend is off unless this is given",
    )
    fe.add_argument("--server-cert", default=d.server_cert, help="frontend TLS certificate")
    fe.add_argument("--server-key", default=d.server_key, help="frontend TLS key")
    fe.add_argument(
        "--server-ca-cert",
        default=d.server_ca_cert,
        help="frontend CA (frontend-ca.crt of `tether certs init`) that TCP frontend client "
        "certificates must be issued by; it decides their cluster (the implicit one)",
    )
    fe.add_argument(
        "--frontend-allowed-subjects",
        default=d.frontend_allowed_subjects,
        help="comma-separated common names a TCP frontend client certificate without the "
        "OU=tether-frontend role marker may carry; an agent may never use one",
    )
    fe.add_argument(
        "--optimistic-connect",
        action=argparse.BooleanOptionalAction,
        default=d.optimistic_connect,
        help="answer CONNECT with 200 at once and send the client's first bytes with the "
        "dial (saves a link round trip; a failed dial then shows as a reset, not a 502)",
    )
    fe.add_argument(
        "--max-grpc-message-size",
        type=int,
        default=d.max_grpc_message_size,
        help="largest gRPC message (bytes) a --mode grpc client may send; "
        "grpc-go's default, as in konnectivity-server",
    )
    fe.add_argument(
        "--max-grpc-streams",
        type=int,
        default=d.max_grpc_streams,
        help="concurrent Proxy calls per --mode grpc connection (HTTP/2 "
        "MAX_CONCURRENT_STREAMS); grpc clients queue calls beyond it",
    )
    ag = p.add_argument_group("agents")
    ag.add_argument(
        "--agent-bind-address",
        default=d.agent_bind_address,
        help="address agents connect to (empty: all)",
    )
    ag.add_argument("--agent-port", type=settings.port, default=d.agent_port, help="agent TLS port")
    ag.add_argument("--cluster-cert", default=d.cluster_cert, help="broker certificate for agents")
    ag.add_argument("--cluster-key", default=d.cluster_key, help="broker key for agents")
    ag.add_argument(
        "--cluster-ca-cert",
        default=d.cluster_ca_cert,
        help="CA that agent client certificates must chain to",
    )
    ag.add_argument(
        "--agent-tls-min-version",
        choices=["1.2", "1.3"],
        default=d.agent_tls_min_version,
        help="lowest TLS version on the agent port; 1.2 (AEAD suites only) for old agents",
    )
    ag.add_argument(
        "--agent-tls-ticket-key-file",
        default=d.agent_tls_ticket_key_file,
        help="80 random bytes (head -c 80 /dev/urandom; mode 0600) that encrypt TLS session "
        "tickets on the agent port: with the same file on every replica and across restarts "
        "a reconnecting agent resumes its session instead of a full handshake; reloaded "
        "with the certificates (empty: a per-process random key)",
    )
    ag.add_argument(
        "--cluster-name", default=d.cluster_name, help="cluster served by the single-cluster flags"
    )
    ag.add_argument(
        "--config",
        default=d.config,
        help="TOML file declaring several clusters (see docs/operations.md); the "
        "single-cluster flags then add an implicit cluster --cluster-name",
    )
    ag.add_argument(
        "--kubeconfig",
        default=d.kubeconfig,
        help="this cluster's apiserver: agent bearer tokens are checked with a TokenReview "
        "(with --agent-namespace and --agent-service-account), and the Lease of "
        "--enable-lease-controller lives there; empty with the lease controller: in-cluster",
    )
    ag.add_argument(
        "--enable-lease-controller",
        action=argparse.BooleanOptionalAction,
        default=d.enable_lease_controller,
        help="publish this replica's coordination.k8s.io Lease and remove expired ones, so "
        "agents with --count-server-leases learn how many replicas there are (konnectivity's)",
    )
    ag.add_argument(
        "--lease-namespace", default=d.lease_namespace, help="namespace of the replicas' Leases"
    )
    ag.add_argument(
        "--lease-label",
        default=d.lease_label,
        help="labels of the replicas' Leases (key=value[,key=value]), as agents select them",
    )
    ag.add_argument(
        "--authentication-audience",
        default=d.authentication_audience,
        help="audience agent tokens must carry (TokenReview)",
    )
    ag.add_argument(
        "--agent-namespace",
        default=d.agent_namespace,
        help="namespace of the ServiceAccount agents authenticate as (TokenReview)",
    )
    ag.add_argument(
        "--agent-service-account",
        default=d.agent_service_account,
        help="ServiceAccount agents authenticate as (TokenReview)",
    )
    ag.add_argument(
        "--tokenreview-bind-node-name",
        action=argparse.BooleanOptionalAction,
        default=d.tokenreview_bind_node_name,
        help="with TokenReview, a node-bound token (node-name in the review's extra) "
        "registers only as the agent id equal to that node name",
    )
    ag.add_argument(
        "--tokenreview-source-rate",
        type=settings.positive,
        default=d.tokenreview_source_rate,
        help="TokenReviews per second one source address may cause (failed ones are "
        "also cached for 10 s)",
    )
    ag.add_argument(
        "--tokenreview-source-burst",
        type=int,
        default=d.tokenreview_source_burst,
        help="burst of TokenReviews one source address may cause",
    )
    ag.add_argument(
        "--agent-identifiers-policy",
        choices=["credential", "any"],
        default=d.agent_identifiers_policy,
        help="credential: agents may declare only identifiers their credential (certificate "
        "SANs, token entry) or --agent-allowed-identifiers allow, others are dropped; "
        "any: trust every claim",
    )
    ag.add_argument(
        "--agent-allowed-identifiers",
        default=d.agent_allowed_identifiers,
        help="identifiers agents may declare, as AGENT-ID-GLOB:IDENTIFIERS entries separated "
        "by commas, e.g. 'edge-*:cidr=10.20.0.0/16,gw-1:default-route=true'",
    )
    ag.add_argument(
        "--agent-token-file",
        default=d.agent_token_file,
        help="bearer tokens for agents: lines of 'sha256:<hex> <cluster> <agent-id or glob> "
        "[max=N] [identifiers=...]' (a glob needs max=N), re-read when the file changes",
    )
    ag.add_argument("--server-id", default="", help="this replica's id (default: random)")
    ag.add_argument(
        "--server-count",
        type=int,
        default=d.server_count,
        help="number of broker replicas agents should connect to",
    )
    ag.add_argument(
        "--proxy-strategies",
        default=",".join(d.proxy_strategies),
        help="agent selection strategies in order: destHost, defaultRoute, default",
    )
    ag.add_argument(
        "--backend-dial-timeout",
        type=settings.positive,
        default=d.backend_dial_timeout,
        help="seconds a dial may take end to end",
    )
    ag.add_argument(
        "--agent-return-wait",
        type=settings.non_negative,
        default=d.agent_return_wait,
        help="seconds a dial that finds no agent waits for one to register when an agent "
        "it would have gone to left within --agent-return-window (a restart, a reconnect "
        "after an outage); a dial no departed agent matches fails at once; 0 disables",
    )
    ag.add_argument(
        "--agent-return-window",
        type=settings.positive,
        default=d.agent_return_window,
        help="seconds a departed agent is remembered for --agent-return-wait",
    )
    ag.add_argument(
        "--handshake-timeout",
        type=settings.positive,
        default=d.handshake_timeout,
        help="seconds for the TLS handshake and control stream",
    )
    ops = p.add_argument_group("operations")
    ops.add_argument(
        "--health-bind-address", default=d.health_bind_address, help="(empty: all addresses)"
    )
    ops.add_argument(
        "--health-port",
        type=settings.port,
        default=d.health_port,
        help="/healthz and /readyz; 0 disables",
    )
    ops.add_argument(
        "--admin-bind-address",
        default=d.admin_bind_address,
        help="address of the admin port (Prometheus /metrics, unauthenticated: keep it "
        "on loopback or a trusted network)",
    )
    ops.add_argument(
        "--admin-port",
        type=settings.port,
        default=d.admin_port,
        help="/metrics, as konnectivity-server's admin port; 0 disables",
    )
    ops.add_argument(
        "--frontend-header-timeout",
        type=settings.positive,
        default=d.frontend_header_timeout,
        help="seconds a frontend (or health endpoint) client has to send its request",
    )
    ops.add_argument(
        "--max-frontend-connections",
        type=int,
        default=d.max_frontend_connections,
        help="connections all frontends together may hold; beyond it new ones are closed",
    )
    ops.add_argument(
        "--max-handshakes-per-ip",
        type=int,
        default=d.max_handshakes_per_ip,
        help="concurrent not-yet-authenticated connections one source address may hold "
        "on the agent port and the TCP frontend (TLS handshake and control stream); "
        "more are closed at once",
    )
    ops.add_argument(
        "--max-concurrent-handshakes",
        type=int,
        default=d.max_concurrent_handshakes,
        help="agent-port TLS handshakes in progress at once (all sources); more connections "
        "queue for a slot, so /healthz, the frontends and connected agents stay served "
        "through a reconnect storm",
    )
    ops.add_argument(
        "--agent-accept-rate",
        type=float,
        default=d.agent_accept_rate,
        help="new agent-port connections accepted per second (burst: a tenth of it); "
        "the rest wait in the kernel's listen backlog",
    )
    ops.add_argument(
        "--agent-accept-queue",
        type=int,
        default=d.agent_accept_queue,
        help="accepted agent connections that may wait for a handshake slot (each at most "
        "0.7 of --handshake-timeout); beyond it they are shed: answered 503 overloaded with "
        "a tether-retry-after hint",
    )
    ops.add_argument(
        "--gc-full-interval",
        type=float,
        default=d.gc_full_interval,
        help="seconds between garbage collections of every object, taken when no agent "
        "handshake is queued; the others scan only objects newer than the last full one, "
        "so pauses stay short with many agents (0: CPython's own schedule)",
    )
    ops.add_argument(
        "--flood-penalty-after",
        type=int,
        default=d.flood_penalty_after,
        help="agent-port floods (GOAWAY ENHANCE_YOUR_CALM) one source address is forgiven "
        "within 60 s; after that its new connections are closed at accept for 1 s, "
        "doubling up to 60 s; 0 turns the penalty off (many agents behind one NAT address)",
    )
    ops.add_argument(
        "--workers",
        type=_workers,
        default=d.workers,
        help="worker processes sharing the listening sockets, so one host uses every "
        "core; 'auto': one per core. Each agent keeps one connection (to the worker "
        "that accepted it); a dial that lands on another worker is handed to the owner",
    )
    ops.add_argument(
        "--drain-timeout",
        type=settings.positive,
        default=d.drain_timeout,
        help="seconds open tunnels may finish after SIGTERM",
    )
    ops.add_argument(
        "--drain-retry",
        type=settings.positive,
        default=d.drain_retry,
        help="window (seconds) in which drained agents reconnect",
    )
    settings.add_tunnel_arguments(ag, d, "agent connection")
    settings.add_common_arguments(ops, d, table="broker")
    return p


SPEC = settings.Spec(
    config_class=BrokerConfig,
    env_prefix="TETHER_BROKER_",
    table="broker",
    list_keys=frozenset({"agent_allowed_identifiers"}),
    checks={
        "proxy_strategies": parse_strategies,
        "agent_allowed_identifiers": parse_allowed_identifiers,
        "uds_mode": parse_mode,
    },
    compat=compat.SERVER,
)


def from_args(argv: list[str] | None, environ: Mapping[str, str] | None = None) -> BrokerConfig:
    """Flags, then ``TETHER_BROKER_*`` variables, then ``--config-file``, then defaults."""
    parser = build_parser()
    resolved = settings.resolve(parser, build_parser, argv, SPEC, environ)
    values = dict(resolved.values)
    try:
        strategies = parse_strategies(values.pop("proxy_strategies"))
    except ValueError as exc:
        settings.fail(parser, f"{settings.where(resolved, 'proxy_strategies')}: {exc}")
    server_id = values.pop("server_id")
    if values["uds_name"] and resolved.sources.get("server_port") == "default":
        # A Unix socket is the frontend in use: TCP only when asked for.
        values["server_port"] = resolved.values["server_port"] = 0
        resolved.sources["server_port"] = "default: off, --uds-name is set"
    cfg = BrokerConfig(
        proxy_strategies=strategies,
        config_file=resolved.config_file,
        compat_warnings=resolved.compat_warnings,
        **({"server_id": server_id} if server_id else {}),
        **values,
    )
    problems = validate(cfg)
    if resolved.print_config:
        settings.print_config(parser, resolved, SPEC, problems)
    if problems:
        parser.error("; ".join(problems))
    return cfg


def reviews_tokens(cfg: BrokerConfig) -> bool:
    """TokenReview of agent tokens is on: konnectivity's rule, any of the
    agent namespace, service account or audience given with a kubeconfig."""
    return bool(cfg.kubeconfig) and bool(
        cfg.agent_namespace or cfg.agent_service_account or cfg.authentication_audience
    )


def validate(cfg: BrokerConfig) -> list[str]:
    problems = []
    if not (cfg.cluster_cert and cfg.cluster_key):
        problems.append("--cluster-cert and --cluster-key are required")
    if not (cfg.cluster_ca_cert or cfg.config or cfg.agent_token_file or reviews_tokens(cfg)):
        problems.append(
            "no agent trust: give --cluster-ca-cert, --agent-token-file, --kubeconfig or --config"
        )
    if reviews_tokens(cfg) and not (cfg.agent_namespace and cfg.agent_service_account):
        problems.append("TokenReview needs --agent-namespace and --agent-service-account")
    if cfg.enable_lease_controller:
        try:
            leases.parse_labels(cfg.lease_label)
            leases.lease_name(cfg.server_id)
        except ValueError as exc:
            problems.append(f"--lease-label / --server-id: {exc}")
    if cfg.server_port and not (cfg.server_cert and cfg.server_key and cfg.server_ca_cert):
        problems.append(
            "the TCP frontend needs --server-cert, --server-key and --server-ca-cert "
            "(or --server-port=0 to turn it off)"
        )
    if not cfg.uds_name and not cfg.server_port and not cfg.config:
        problems.append("no frontend: give --uds-name and/or a nonzero --server-port")
    try:
        parse_allowed_identifiers(cfg.agent_allowed_identifiers)
    except ValueError as exc:
        problems.append(f"--agent-allowed-identifiers: {exc}")
    if cfg.tokenreview_source_burst < 1:
        problems.append("--tokenreview-source-burst must be at least 1")
    if cfg.max_grpc_message_size < 1024:
        problems.append("--max-grpc-message-size must be at least 1024")
    if cfg.max_grpc_streams < 1:
        problems.append("--max-grpc-streams must be at least 1")
    if cfg.max_concurrent_handshakes < 1:
        problems.append("--max-concurrent-handshakes must be at least 1")
    if not cfg.agent_accept_rate > 0:
        problems.append("--agent-accept-rate must be above 0")
    if not cfg.gc_full_interval >= 0:
        problems.append("--gc-full-interval must be 0 (off) or more")
    if cfg.agent_accept_queue < 0:
        problems.append("--agent-accept-queue must be 0 or more")
    if cfg.flood_penalty_after < 0:
        problems.append("--flood-penalty-after must be 0 (off) or more")
    if cfg.server_count < 1:
        problems.append("--server-count must be at least 1")
    if cfg.stream_window < 65536 or cfg.connection_window < cfg.stream_window:
        problems.append("--stream-window must be >= 65536 and <= --connection-window")
    return problems
