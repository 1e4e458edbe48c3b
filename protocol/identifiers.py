"""Agent identifiers in konnectivity's form:
``host=n1&ipv4=10.0.0.5&ipv6=fd00::5&cidr=10.1.0.0/16&default-route=true``.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import parse_qsl, urlencode

import attrs

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
    def parse(cls, text: str) -> AgentIdentifiers:
        """Parse the query-string form; raise ValueError naming the bad part."""
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
                hosts.add(value.lower())
            elif key == "ipv4":
                v4.add(ipaddress.IPv4Address(value))
            elif key == "ipv6":
                v6.add(ipaddress.IPv6Address(value))
            elif key == "cidr":
                cidrs.append(ipaddress.ip_network(value, strict=False))
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
