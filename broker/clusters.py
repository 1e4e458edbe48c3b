"""Clusters served by one broker, from the single-cluster flags or from a
TOML file (``--config``).

Every agent and every frontend belongs to exactly one cluster, and a dial
only ever reaches agents of its frontend's cluster. Example::

    [[clusters]]
    name = "tenant-a"
    agent_ca = "/etc/tether/tenant-a/ca.crt"     # agents: mTLS against this CA
    frontend_uds = "/run/tether/tenant-a.sock"   # kube-apiserver of tenant-a
    frontend_mode = "http-connect"               # or "grpc"
    frontend_uds_group = "tenant-a-apiserver"    # who may open the socket:
    frontend_uds_mode = "0660"                   #   owner and group (names or ids)

    [[clusters]]
    name = "tenant-b"
    token_agents = true                          # agents: bearer tokens (--agent-token-file)
    frontend_uds = "/run/tether/tenant-b.sock"

On the TCP mTLS CONNECT frontend the client certificate's ``O`` names the
cluster. Each frontend socket has its own ``frontend_uds_owner``,
``frontend_uds_group`` (names or numbers; default: the broker's) and
``frontend_uds_mode`` (default ``"0660"``), so one tenant's apiserver group
cannot open another tenant's socket.
"""

from __future__ import annotations

import tomllib
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
    token_agents: bool = False
    frontend_uds: str = ""
    frontend_mode: str = "http-connect"
    #: TokenReview against this cluster's apiserver for bearer-token agents.
    tokenreview_kubeconfig: str = ""
    tokenreview_audience: str = ""
    #: ServiceAccounts allowed to register, as ``namespace:name``.
    allowed_service_accounts: tuple[str, ...] = ()
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
        ("frontend_uds", str),
        ("frontend_mode", str),
        ("token_agents", bool),
        ("tokenreview_kubeconfig", str),
        ("tokenreview_audience", str),
        ("allowed_service_accounts", list),
    ):
        if key in entry and not isinstance(entry[key], kind):
            raise ConfigError(f"{where}.{key}: must be a {kind.__name__}")
    for sa in entry.get("allowed_service_accounts", []):
        if not isinstance(sa, str) or sa.count(":") != 1:
            raise ConfigError(f"{where}.allowed_service_accounts: want 'namespace:name' entries")
    name = entry.get("name", "")
    if not valid_name(name):
        raise ConfigError(f"{where}.name: {name!r} is not a valid cluster name")
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
        **{**entry, "allowed_service_accounts": tuple(entry.get("allowed_service_accounts", ()))}
    )
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
    return cluster
