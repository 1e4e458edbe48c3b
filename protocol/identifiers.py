"""Agent identifiers in konnectivity's form:
``host=n1&ipv4=10.0.0.5&ipv6=fd00::5&cidr=10.1.0.0/16&default-route=true``.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from urllib.parse import parse_qsl, urlencode

import attrs

from protocol.addresses import BadAddress, check_host_name
from protocol.flood import MAX_IDENTIFIER_ENTRIES

MAX_IDENTIFIERS_LEN = 4096
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def valid_name(name: str) -> bool:
    """Agent ids and cluster names: ``[A-Za-z0-9][A-Za-z0-9._-]{0,62}``."""
    return 0 < len(name) <= 63 and name[0].isalnum() and name.isascii() and set(name) <= _NAME_CHARS


_KEYS = {"host", "ipv4", "ipv6", "cidr", "default-route"}


@attrs.frozen
class AgentIdentifiers:
    hosts: frozenset[str] = frozenset()
    ipv4: frozenset[ipaddress.IPv4Address] = frozenset()
    ipv6: frozenset[ipaddress.IPv6Address] = frozenset()
    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    default_route: bool = False

    @classmethod
    def parse(cls, text: str, *, check_hosts: bool = False) -> AgentIdentifiers:
        """Parse the query-string form; raise ValueError naming the bad part.
        ``check_hosts``: ``host=`` values must be host names, as an agent's own
        ``--agent-identifiers`` must (allowances may hold glob patterns)."""
        if len(text) > MAX_IDENTIFIERS_LEN:
            raise ValueError(f"identifiers longer than {MAX_IDENTIFIERS_LEN}")
        if text.count("&") >= MAX_IDENTIFIER_ENTRIES:  # before any parsing
            raise ValueError(f"more than {MAX_IDENTIFIER_ENTRIES} identifiers")
        hosts: set[str] = set()
        v4: set[ipaddress.IPv4Address] = set()
        v6: set[ipaddress.IPv6Address] = set()
        cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        default_route = False
        for key, value in parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text)):
            if key not in _KEYS:
                raise ValueError(f"unknown identifier type {key!r}")
            if key == "host":
                if not value:
                    raise ValueError("empty host identifier")
                try:
                    if check_hosts:
                        check_host_name(value)
                except BadAddress as exc:
                    hint = "; separate identifiers with '&'" if "," in value else ""
                    raise ValueError(f"host={value!r} is not a host name: {exc}{hint}") from None
                hosts.add(value.lower())
            elif key == "ipv4":
                try:
                    v4.add(ipaddress.IPv4Address(value))
                except ValueError as exc:
                    raise ValueError(f"ipv4={value!r}: {exc}") from None
            elif key == "ipv6":
                try:
                    v6.add(ipaddress.IPv6Address(value))
                except ValueError as exc:
                    raise ValueError(f"ipv6={value!r}: {exc}") from None
            elif key == "cidr":
                try:
                    cidrs.append(ipaddress.ip_network(value, strict=False))
                except ValueError as exc:
                    raise ValueError(f"cidr={value!r}: {exc}") from None
            else:
                if value not in ("true", "false"):
                    raise ValueError(f"default-route must be true or false, got {value!r}")
                default_route = value == "true"
        return cls(frozenset(hosts), frozenset(v4), frozenset(v6), tuple(cidrs), default_route)

    def matches_host(self, host: str) -> bool:
        """destHost: does this agent own ``host`` (a name or an address)?"""
        if host.lower() in self.hosts:  # konnectivity matches host= as a plain string
            return True
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        if addr in self.ipv4 or addr in self.ipv6:
            return True
        return any(addr.version == net.version and addr in net for net in self.cidrs)

    def render(self) -> str:
        pairs = [("host", h) for h in sorted(self.hosts)]
        pairs += [("ipv4", str(a)) for a in sorted(self.ipv4)]
        pairs += [("ipv6", str(a)) for a in sorted(self.ipv6)]
        pairs += [("cidr", str(n)) for n in self.cidrs]
        if self.default_route:
            pairs.append(("default-route", "true"))
        return urlencode(pairs)


# ------------------------------------------------------------ specificity

#: Rank of an exact ``host=``, ``ipv4=`` or ``ipv6=`` match: above any CIDR
#: prefix length (at most 128), so the exact owner of an address always wins.
EXACT_RANK = 1000


def match_rank(idents: AgentIdentifiers, host: str) -> int | None:
    """How specifically ``idents`` names ``host``: :data:`EXACT_RANK` for an
    exact host or address, the longest containing CIDR's prefix length, or
    None when nothing matches. Higher is more specific."""
    if host.lower() in idents.hosts:
        return EXACT_RANK
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if addr in idents.ipv4 or addr in idents.ipv6:
        return EXACT_RANK
    best: int | None = None
    for net in idents.cidrs:
        if addr.version == net.version and addr in net and (best is None or net.prefixlen > best):
            best = net.prefixlen
    return best


# ----------------------------------------------------------------- claims


@attrs.frozen
class Allowance:
    """Which identifiers one credential may declare. ``hosts`` are
    case-insensitive glob patterns; an ``ipv4=``/``ipv6=`` claim must be an
    allowed address (an exact claim needs an exact permission, since it
    outranks every CIDR); a ``cidr=`` claim must lie within an allowed CIDR
    (or be the /32 or /128 of an allowed address); ``default-route`` must be
    allowed itself."""

    hosts: frozenset[str] = frozenset()
    addresses: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] = frozenset()
    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    default_route: bool = False

    @classmethod
    def parse(cls, text: str) -> Allowance:
        """The identifiers form (``host=*.edge&cidr=10.0.0.0/24``); ValueError if bad."""
        idents = AgentIdentifiers.parse(text)
        return cls(
            idents.hosts,
            frozenset([*idents.ipv4, *idents.ipv6]),
            idents.cidrs,
            idents.default_route,
        )

    def union(self, other: Allowance) -> Allowance:
        return Allowance(
            self.hosts | other.hosts,
            self.addresses | other.addresses,
            self.cidrs + tuple(c for c in other.cidrs if c not in self.cidrs),
            self.default_route or other.default_route,
        )

    def _address_ok(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return addr in self.addresses

    def _network_ok(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        if net.num_addresses == 1 and self._address_ok(net.network_address):
            return True
        return any(
            net.version == allowed.version and net.subnet_of(allowed)  # type: ignore[arg-type]
            for allowed in self.cidrs
        )

    def restrict(self, claimed: AgentIdentifiers) -> tuple[AgentIdentifiers, list[str]]:
        """The allowed part of ``claimed`` and the refused parts, rendered
        (``cidr=0.0.0.0/0``) for the log."""
        hosts = frozenset(
            h for h in claimed.hosts if any(fnmatch.fnmatchcase(h, p) for p in self.hosts)
        )
        v4 = frozenset(a for a in claimed.ipv4 if self._address_ok(a))
        v6 = frozenset(a for a in claimed.ipv6 if self._address_ok(a))
        cidrs = tuple(n for n in claimed.cidrs if self._network_ok(n))
        default_route = claimed.default_route and self.default_route
        refused = [f"host={h}" for h in sorted(claimed.hosts - hosts)]
        refused += [f"ipv4={a}" for a in sorted(claimed.ipv4 - v4)]
        refused += [f"ipv6={a}" for a in sorted(claimed.ipv6 - v6)]
        refused += [f"cidr={n}" for n in claimed.cidrs if n not in cidrs]
        if claimed.default_route and not default_route:
            refused.append("default-route=true")
        return AgentIdentifiers(hosts, v4, v6, cidrs, default_route), refused
