"""Named link profiles, read from ``benchmarks/profiles.toml``.

A profile table holds the keys of a direction (applied to both directions),
optionally overridden per direction by a ``cloud_to_edge`` / ``edge_to_cloud``
sub-table, and may ``inherit`` another profile.  Unknown keys are errors so a
typo cannot silently turn into "no emulation".
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .model import DirectionParams, GilbertElliott, Outage

Direction = Literal["cloud_to_edge", "edge_to_cloud"]
DIRECTIONS: tuple[Direction, Direction] = ("cloud_to_edge", "edge_to_cloud")

DEFAULT_PROFILES_PATH = Path(__file__).resolve().parent.parent / "profiles.toml"

#: Frames of queue a shaped direction gets at least, whatever its BDP.
MIN_QUEUE_FRAMES = 32

_DIRECTION_KEYS = frozenset(
    {
        "rate_bps",
        "queue_bytes",
        "delay_ms",
        "jitter_ms",
        "reorder",
        "loss",
        "gilbert_elliott",
        "outages",
        "outage_every_s",
        "outage_duration_s",
        "outage_offset_s",
    }
)
_PROFILE_KEYS = _DIRECTION_KEYS | {"description", "inherit", "emulate", "mtu", *DIRECTIONS}
_GE_KEYS = frozenset({"p_good_to_bad", "p_bad_to_good", "loss_in_bad", "loss_in_good"})


class ProfileError(ValueError):
    """The profile file or a profile in it is malformed."""


def default_queue_bytes(rate_bps: float, rtt_s: float, mtu: int = 1500) -> int:
    """One bandwidth-delay product, but never less than ``MIN_QUEUE_FRAMES``
    full frames.  A 1xBDP drop-tail buffer is the classic size that lets one
    loss-based TCP flow keep the link busy through its sawtooth; the floor keeps
    short-RTT links from dropping an ordinary burst (a TSO-sized write)."""
    bdp = math.ceil(rate_bps * rtt_s / 8.0)
    return max(bdp, MIN_QUEUE_FRAMES * (mtu + 14))


@dataclass(frozen=True)
class LinkProfile:
    """A named pair of directions.  ``emulate=False`` (the ``loopback`` profile)
    means no namespaces at all: contenders talk over 127.0.0.1."""

    name: str
    description: str = ""
    emulate: bool = True
    mtu: int = 1500
    cloud_to_edge: DirectionParams = field(default_factory=DirectionParams)
    edge_to_cloud: DirectionParams = field(default_factory=DirectionParams)

    def direction(self, d: Direction) -> DirectionParams:
        return self.cloud_to_edge if d == "cloud_to_edge" else self.edge_to_cloud

    @property
    def rtt_s(self) -> float:
        """Configured round trip without queueing: the sum of the one-way delays."""
        return self.cloud_to_edge.delay_s + self.edge_to_cloud.delay_s

    @property
    def has_outages(self) -> bool:
        return self.cloud_to_edge.has_outages or self.edge_to_cloud.has_outages

    def with_directions(self, **changes: Any) -> LinkProfile:
        """The same profile with ``changes`` applied to both directions (e.g.
        ``loss=0.0`` to isolate the shaper in a measurement)."""
        return dataclasses.replace(
            self,
            cloud_to_edge=dataclasses.replace(self.cloud_to_edge, **changes),
            edge_to_cloud=dataclasses.replace(self.edge_to_cloud, **changes),
        )

    def without_outages(self) -> LinkProfile:
        return self.with_directions(
            outages=(), outage_every_s=None, outage_duration_s=0.0, outage_offset_s=None
        )

    def summary(self) -> str:
        if not self.emulate:
            return f"{self.name}: no emulation (127.0.0.1)"
        parts = []
        for d in DIRECTIONS:
            p = self.direction(d)
            rate = f"{p.rate_bps / 1e6:g} Mbit/s" if p.rate_bps else "unlimited"
            s = f"{rate}, {p.delay_s * 1e3:g} ms"
            if p.jitter_s:
                s += f" ±{p.jitter_s * 1e3:g} ms"
            if p.expected_loss:
                s += f", loss {p.expected_loss * 100:.2g}%"
                if p.gilbert_elliott:
                    s += " (bursty)"
            if p.has_outages:
                s += ", outages"
            parts.append(s)
        if parts[0] == parts[1]:
            return f"{self.name}: {parts[0]} each way"
        return f"{self.name}: cloud->edge {parts[0]}; edge->cloud {parts[1]}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "emulate": self.emulate,
            "mtu": self.mtu,
            "cloud_to_edge": self.cloud_to_edge.to_json(),
            "edge_to_cloud": self.edge_to_cloud.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LinkProfile:
        return cls(
            name=d["name"],
            description=d.get("description", ""),
            emulate=d.get("emulate", True),
            mtu=d.get("mtu", 1500),
            cloud_to_edge=DirectionParams.from_json(d["cloud_to_edge"]),
            edge_to_cloud=DirectionParams.from_json(d["edge_to_cloud"]),
        )


def _number(name: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProfileError(f"profile {name!r}: {key} must be a number, got {v!r}")
    return float(v)


def _direction(name: str, raw: Mapping[str, Any], mtu: int) -> DirectionParams:
    kw: dict[str, Any] = {}
    if "rate_bps" in raw:
        kw["rate_bps"] = _number(name, "rate_bps", raw["rate_bps"])
    delay = _number(name, "delay_ms", raw.get("delay_ms", 0)) / 1e3
    kw["delay_s"] = delay
    kw["jitter_s"] = _number(name, "jitter_ms", raw.get("jitter_ms", 0)) / 1e3
    kw["loss"] = _number(name, "loss", raw.get("loss", 0))
    reorder = raw.get("reorder", False)
    if not isinstance(reorder, bool):
        raise ProfileError(f"profile {name!r}: reorder must be true or false")
    kw["reorder"] = reorder
    if "queue_bytes" in raw:
        kw["queue_bytes"] = int(_number(name, "queue_bytes", raw["queue_bytes"]))
    elif "rate_bps" in kw:
        # BDP on the configured round trip; the reverse delay is assumed equal.
        kw["queue_bytes"] = default_queue_bytes(kw["rate_bps"], 2 * delay, mtu)
    ge = raw.get("gilbert_elliott")
    if ge is not None:
        if not isinstance(ge, Mapping) or not set(ge) <= _GE_KEYS:
            raise ProfileError(f"profile {name!r}: gilbert_elliott takes keys {sorted(_GE_KEYS)}")
        kw["gilbert_elliott"] = GilbertElliott(
            **{k: _number(name, f"gilbert_elliott.{k}", v) for k, v in ge.items()}
        )
    outages = []
    for o in raw.get("outages", ()):
        if not isinstance(o, Mapping) or set(o) != {"start_s", "duration_s"}:
            raise ProfileError(f"profile {name!r}: each outage needs start_s and duration_s")
        outages.append(
            Outage(
                _number(name, "start_s", o["start_s"]), _number(name, "duration_s", o["duration_s"])
            )
        )
    kw["outages"] = tuple(outages)
    if "outage_every_s" in raw:
        kw["outage_every_s"] = _number(name, "outage_every_s", raw["outage_every_s"])
        kw["outage_duration_s"] = _number(name, "outage_duration_s", raw.get("outage_duration_s"))
        if "outage_offset_s" in raw:
            kw["outage_offset_s"] = _number(name, "outage_offset_s", raw["outage_offset_s"])
    elif "outage_duration_s" in raw or "outage_offset_s" in raw:
        raise ProfileError(f"profile {name!r}: outage_duration_s needs outage_every_s")
    try:
        return DirectionParams(**kw)
    except ValueError as e:
        raise ProfileError(f"profile {name!r}: {e}") from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if k in DIRECTIONS and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _resolve(name: str, tables: Mapping[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise ProfileError(f"profile inheritance cycle: {' -> '.join((*seen, name))}")
    raw = tables.get(name)
    if not isinstance(raw, Mapping):
        raise ProfileError(f"no profile named {name!r} (have: {', '.join(sorted(tables))})")
    unknown = set(raw) - _PROFILE_KEYS
    for d in DIRECTIONS:
        sub = raw.get(d, {})
        if not isinstance(sub, Mapping):
            raise ProfileError(f"profile {name!r}: {d} must be a table")
        unknown |= {f"{d}.{k}" for k in set(sub) - _DIRECTION_KEYS}
    if unknown:
        raise ProfileError(f"profile {name!r}: unknown keys {sorted(unknown)}")
    parent = raw.get("inherit")
    if parent is None:
        return dict(raw)
    merged = _merge(_resolve(parent, tables, (*seen, name)), raw)
    merged.pop("inherit", None)
    # A child's own description should not be replaced by the parent's.
    merged["description"] = raw.get("description", "")
    return merged


def profile_from_table(name: str, tables: Mapping[str, Any]) -> LinkProfile:
    """Build profile ``name`` from already-parsed TOML ``tables`` (name -> table)."""
    raw = _resolve(name, tables)
    mtu = int(_number(name, "mtu", raw.get("mtu", 1500)))
    if not 576 <= mtu <= 9000:
        raise ProfileError(f"profile {name!r}: mtu {mtu} out of range")
    emulate = raw.get("emulate", True)
    if not isinstance(emulate, bool):
        raise ProfileError(f"profile {name!r}: emulate must be true or false")
    shared = {k: v for k, v in raw.items() if k in _DIRECTION_KEYS}
    dirs = {d: _direction(name, {**shared, **raw.get(d, {})}, mtu) for d in DIRECTIONS}
    return LinkProfile(
        name=name,
        description=str(raw.get("description", "")),
        emulate=emulate,
        mtu=mtu,
        cloud_to_edge=dirs["cloud_to_edge"],
        edge_to_cloud=dirs["edge_to_cloud"],
    )


def _read_tables(path: Path | None) -> dict[str, Any]:
    p = path or DEFAULT_PROFILES_PATH
    with open(p, "rb") as f:
        return tomllib.load(f)


def load_profiles(path: str | Path | None = None) -> dict[str, LinkProfile]:
    """Every profile in the file, in file order."""
    tables = _read_tables(Path(path) if path else None)
    return {name: profile_from_table(name, tables) for name in tables}


def load_profile(name: str, path: str | Path | None = None) -> LinkProfile:
    return profile_from_table(name, _read_tables(Path(path) if path else None))
