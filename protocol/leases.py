"""Broker replicas counted with coordination.k8s.io/v1 Leases, as
konnectivity does (``--enable-lease-controller`` on the server,
``--count-server-leases`` on the agent).

Each broker holds one Lease named after its server id, labelled with the
lease label, and renews it well within its duration; agents list the Leases
with that label and count the ones still live. This module is the sans-IO
part: the objects and the arithmetic, with the time passed in.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import attrs

#: konnectivity's defaults.
DEFAULT_NAMESPACE = "kube-system"
DEFAULT_LABEL = "k8s-app=konnectivity-server"
#: How long a Lease lives without renewal, and how often it is renewed.
DURATION_S = 30
RENEW_S = 10

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` as Kubernetes label syntax; ValueError names the bad part."""
    labels: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        if not eq or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise ValueError(f"invalid label {part.strip()!r} (want key=value)")
        labels[key] = value
    if not labels:
        raise ValueError("at least one label is needed")
    return labels


def selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def lease_name(server_id: str) -> str:
    """A valid object name for ``server_id`` (lower case, DNS subdomain)."""
    name = re.sub(r"[^a-z0-9.-]+", "-", server_id.lower()).strip("-.")
    name = f"tether-broker-{name}"[:253].rstrip("-.")
    if not _NAME.match(name):
        raise ValueError(f"server id {server_id!r} gives no valid Lease name")
    return name


def rfc3339_micro(t: float) -> str:
    """Kubernetes MicroTime: ``2026-12-01T18:00:00.123456Z``."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError, TypeError):
        return None


def lease_body(
    namespace: str,
    name: str,
    server_id: str,
    labels: Mapping[str, str],
    now: float,
    *,
    resource_version: str = "",
    duration_s: int = DURATION_S,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": server_id,
            "leaseDurationSeconds": duration_s,
            "renewTime": rfc3339_micro(now),
        },
    }


@attrs.frozen
class LeaseState:
    name: str
    holder: str
    expires_at: float | None  # None: malformed, counts as expired


def read_leases(items: Iterable[Any]) -> list[LeaseState]:
    """The Leases of a list answer; anything malformed is kept as expired."""
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        meta = item.get("metadata")
        spec = item.get("spec")
        meta = meta if isinstance(meta, dict) else {}
        spec = spec if isinstance(spec, dict) else {}
        renew = parse_time(spec.get("renewTime", ""))
        duration = spec.get("leaseDurationSeconds")
        ok = renew is not None and isinstance(duration, int) and 0 < duration <= 3600
        out.append(
            LeaseState(
                str(meta.get("name", "")),
                str(spec.get("holderIdentity", "")),
                renew + duration
                if ok and renew is not None and isinstance(duration, int)
                else None,
            )
        )
    return out


def live(leases: Iterable[LeaseState], now: float) -> list[LeaseState]:
    return [lease for lease in leases if lease.expires_at is not None and lease.expires_at > now]


def expired(leases: Iterable[LeaseState], now: float) -> list[LeaseState]:
    return [lease for lease in leases if lease.expires_at is None or lease.expires_at <= now]


def collection_path(namespace: str, labels: Mapping[str, str] | None = None) -> str:
    path = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace, safe='')}/leases"
    return path + (f"?labelSelector={quote(selector(labels), safe='')}" if labels else "")


def object_path(namespace: str, name: str) -> str:
    return f"{collection_path(namespace)}/{quote(name, safe='')}"
