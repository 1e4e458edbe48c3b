"""The agent's destination allowlist (``--allow``).

``10.0.0.0/8:10250,0.0.0.0/0:443,192.168.1.7:*`` allows a dial when the
target's address is inside a CIDR and its port matches. Host names are
resolved first and every resolved address must be allowed, so a name cannot
smuggle a dial to a forbidden address. No policy means everything is allowed.
"""

from __future__ import annotations

import ipaddress

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class Rule:
    network: Network
    port: int | None  # None: any port

    def allows(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        return (
            addr.version == self.network.version
            and addr in self.network
            and (self.port is None or self.port == port)
        )


@attrs.frozen
class Policy:
    rules: tuple[Rule, ...] = ()

    @property
    def open(self) -> bool:
        return not self.rules

    @classmethod
    def parse(cls, text: str) -> Policy:
        """Parse ``CIDR:PORT`` entries separated by commas; ``*`` is any port."""
        rules = []
        for raw in text.split(","):
            entry = raw.strip()
            if not entry:
                continue
            net_text, sep, port_text = entry.rpartition(":")
            if not sep or not net_text:
                raise ValueError(f"allow entry {entry!r}: want CIDR:PORT, e.g. 10.0.0.0/8:10250")
            net_text = net_text.strip("[]")
            try:
                network = ipaddress.ip_network(net_text, strict=False)
            except ValueError as exc:
                raise ValueError(f"allow entry {entry!r}: {exc}") from None
            if port_text == "*":
                port = None
            elif port_text.isdigit() and 0 < int(port_text) < 65536:
                port = int(port_text)
            else:
                raise ValueError(f"allow entry {entry!r}: port must be 1-65535 or *")
            rules.append(Rule(network, port))
        return cls(tuple(rules))

    def allows(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        if self.open:
            return True
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(rule.allows(addr, port) for rule in self.rules)
