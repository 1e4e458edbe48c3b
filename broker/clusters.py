"""Clusters served by one broker, from the single-cluster flags or from a
TOML file (``--config``).

Every agent and every frontend belongs to exactly one cluster, and a dial
only ever reaches agents of its frontend's cluster. Example::

    [[clusters]]
    name = "tenant-a"
    agent_ca = "/etc/tether/tenant-a/ca.crt"     # agents: mTLS against this CA
    frontend_ca = "/etc/tether/tenant-a/frontend-ca.crt"  # TCP frontend clients of tenant-a
    frontend_uds = "/run/tether/tenant-a.sock"   # kube-apiserver of tenant-a
    frontend_mode = "http-connect"               # or "grpc"
    frontend_uds_group = "tenant-a-apiserver"    # who may open the socket:
    frontend_uds_mode = "0660"                   #   owner and group (names or ids)

    [[clusters]]
    name = "tenant-b"
    token_agents = true                          # agents: bearer tokens (--agent-token-file)
    frontend_uds = "/run/tether/tenant-b.sock"

Which identifiers an agent may declare (``agent_identifiers``): with
``"credential"`` (the default) only what its credential allows (its
certificate's DNS and IP SANs, its token entry's ``identifiers=``) plus the
cluster's ``allowed_identifiers``, a table of agent-id glob to identifiers
(``allowed_identifiers = { "edge-*" = "cidr=10.20.0.0/16" }``); a claim
beyond that is dropped with a WARNING. ``"any"`` trusts every claim.

On the TCP mTLS CONNECT frontend the CA that issued the client certificate
names the cluster (``frontend_ca``; the single-cluster ``--server-ca-cert``
for the implicit cluster); a subject ``O`` naming another cluster is refused.
A cluster without ``frontend_ca`` falls back to its ``agent_ca`` (a PKI from
before the frontend CA), with a startup warning (see broker/roles.py).

Each frontend socket has its own ``frontend_uds_owner``,
``frontend_uds_group`` (names or numbers; default: the broker's) and
``frontend_uds_mode`` (default ``"0660"``), so one tenant's apiserver group
cannot open another tenant's socket.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from protocol.identifiers import valid_name
from tether.netio.listeners import UnixSocketSpec, parse_mode, resolve_group, resolve_user


class ConfigError(Exception):
    """The cluster configuration is invalid; the message names the key."""


@attrs.frozen
class ClusterConfig:
    name: str
    agent_ca: str = ""
    #: CA(s) issuing this cluster's TCP frontend client certificates.
    frontend_ca: str = ""
    token_agents: bool = False
    frontend_uds: str = ""
    frontend_mode: str = "http-connect"
    #: TokenReview against this cluster's apiserver for bearer-token agents.
    tokenreview_kubeconfig: str = ""
    tokenreview_audience: str = ""
    #: ServiceAccounts allowed to register, as ``namespace:name``.
    allowed_service_accounts: tuple[str, ...] = ()
    #: The agent id must equal a node-bound token's node name (TokenReview).
    tokenreview_bind_node_name: bool = True
    #: TokenReviews per second (and burst) one source address may cause.
    tokenreview_source_rate: float = 5.0
    tokenreview_source_burst: int = 20
    #: "credential": identifiers must be allowed; "any": every claim is trusted.
    agent_identifiers: str = "credential"
    #: (agent-id glob, identifiers) pairs the cluster allows on top of credentials.
    allowed_identifiers: tuple[tuple[str, str], ...] = ()
    #: Owner and group (name or number; empty: the broker's own) and mode
    #: of the frontend socket.
    frontend_uds_owner: str = ""
    frontend_uds_group: str = ""
    frontend_uds_mode: int = 0o660


def socket_spec(cluster: ClusterConfig, where: Mapping[str, str]) -> UnixSocketSpec:
    """The frontend socket of ``cluster``, owner and group resolved; errors
    name the key through ``where`` (key -> how to name it in a message)."""
    try:
        uid = resolve_user(cluster.frontend_uds_owner) if cluster.frontend_uds_owner else -1
    except KeyError as exc:
        raise ConfigError(f"{where['frontend_uds_owner']}: {exc.args[0]}") from None
    try:
        gid = resolve_group(cluster.frontend_uds_group) if cluster.frontend_uds_group else -1
    except KeyError as exc:
        raise ConfigError(f"{where['frontend_uds_group']}: {exc.args[0]}") from None
    return UnixSocketSpec(cluster.frontend_uds, cluster.frontend_uds_mode, uid, gid)


_SOCKET_KEYS = ("frontend_uds_owner", "frontend_uds_group", "frontend_uds_mode")


_KEYS = {f.name for f in attrs.fields(ClusterConfig)}


def load_clusters(path: str) -> list[ClusterConfig]:
    import tomllib  # only with --config (issue 16)

    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    raw = data.get("clusters")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: needs at least one [[clusters]] table")
    clusters = [_cluster(f"{path}: clusters[{i}]", entry) for i, entry in enumerate(raw)]
    names = [c.name for c in clusters]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{path}: duplicate cluster name(s): {', '.join(sorted(dupes))}")
    uds = [c.frontend_uds for c in clusters if c.frontend_uds]
    if len(uds) != len(set(uds)):
        raise ConfigError(f"{path}: two clusters share one frontend_uds path")
    return clusters


def _cluster(where: str, entry: Any) -> ClusterConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key, kind in (
        ("name", str),
        ("agent_ca", str),
        ("frontend_ca", str),
        ("frontend_uds", str),
        ("frontend_mode", str),
        ("token_agents", bool),
        ("tokenreview_kubeconfig", str),
        ("tokenreview_audience", str),
        ("allowed_service_accounts", list),
        ("tokenreview_bind_node_name", bool),
        ("tokenreview_source_rate", (int, float)),
        ("tokenreview_source_burst", int),
        ("agent_identifiers", str),
        ("allowed_identifiers", dict),
    ):
        if key in entry and not isinstance(entry[key], kind):
            name = kind.__name__ if isinstance(kind, type) else "number"
            raise ConfigError(f"{where}.{key}: must be a {name}")
    for sa in entry.get("allowed_service_accounts", []):
        if not isinstance(sa, str) or sa.count(":") != 1:
            raise ConfigError(f"{where}.allowed_service_accounts: want 'namespace:name' entries")
    name = entry.get("name", "")
    if not valid_name(name):
        raise ConfigError(f"{where}.name: {name!r} is not a valid cluster name")
    try:
        allowed_identifiers = parse_allowed_identifiers(entry.get("allowed_identifiers", {}))
    except ValueError as exc:
        raise ConfigError(f"{where}.allowed_identifiers: {exc}") from None
    for key in ("frontend_uds_owner", "frontend_uds_group"):
        if key in entry:
            if isinstance(entry[key], bool) or not isinstance(entry[key], str | int):
                raise ConfigError(f"{where}.{key}: must be a name or a number")
            entry = {**entry, key: str(entry[key])}
    if "frontend_uds_mode" in entry:
        try:
            entry = {**entry, "frontend_uds_mode": parse_mode(entry["frontend_uds_mode"])}
        except ValueError as exc:
            raise ConfigError(f"{where}.frontend_uds_mode: {exc}") from None
    cluster = ClusterConfig(
        **{
            **entry,
            "allowed_service_accounts": tuple(entry.get("allowed_service_accounts", ())),
            "allowed_identifiers": allowed_identifiers,
        }
    )
    if cluster.agent_identifiers not in ("credential", "any"):
        raise ConfigError(f"{where}.agent_identifiers: must be credential or any")
    if cluster.tokenreview_source_rate <= 0 or cluster.tokenreview_source_burst < 1:
        raise ConfigError(f"{where}.tokenreview_source_rate/burst: must be positive")
    socket_spec(cluster, {key: f"{where}.{key}" for key in _SOCKET_KEYS})
    if cluster.frontend_mode not in ("http-connect", "grpc"):
        raise ConfigError(f"{where}.frontend_mode: must be http-connect or grpc")
    if not cluster.agent_ca and not cluster.token_agents and not cluster.tokenreview_kubeconfig:
        raise ConfigError(
            f"{where}: give agent_ca, token_agents = true and/or tokenreview_kubeconfig"
        )
    if cluster.tokenreview_kubeconfig and not cluster.allowed_service_accounts:
        raise ConfigError(f"{where}.allowed_service_accounts: needed with tokenreview_kubeconfig")
    if cluster.agent_ca and not Path(cluster.agent_ca).is_file():
        raise ConfigError(f"{where}.agent_ca: no such file {cluster.agent_ca}")
    if cluster.frontend_ca and not Path(cluster.frontend_ca).is_file():
        raise ConfigError(f"{where}.frontend_ca: no such file {cluster.frontend_ca}")
    return cluster


def parse_allowed_identifiers(
    raw: dict[str, Any] | str,
) -> tuple[tuple[str, str], ...]:
    """``{glob: identifiers}`` (TOML) or ``glob:identifiers,glob:...`` (flag)
    as checked pairs; ValueError names the bad entry."""
    from protocol.identifiers import Allowance

    if isinstance(raw, str):
        items = []
        for part in filter(None, (p.strip() for p in raw.split(","))):
            glob, sep, text = part.partition(":")
            if not sep:
                raise ValueError(f"{part!r}: want AGENT-ID-GLOB:IDENTIFIERS")
            items.append((glob, text))
    else:
        items = list(raw.items())
    pairs = []
    for glob, text in items:
        if not isinstance(text, str) or not glob:
            raise ValueError(f"{glob!r}: want an identifiers string")
        try:
            Allowance.parse(text)
        except ValueError as exc:
            raise ValueError(f"{glob!r}: {exc}") from None
        pairs.append((glob, text))
    return tuple(pairs)
