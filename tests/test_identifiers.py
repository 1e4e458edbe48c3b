"""Agent identifiers: konnectivity's query-string form, and destHost matching."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.flood import MAX_IDENTIFIER_ENTRIES
from protocol.identifiers import MAX_IDENTIFIERS_LEN, AgentIdentifiers

EXAMPLE = "host=n1&ipv4=10.0.0.5&ipv6=fd00::5&cidr=10.1.0.0/16&default-route=true"

hosts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=20,
)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
nets = st.one_of(
    st.builds(lambda a, p: f"{a}/{p}", v4, st.integers(0, 32)),
    st.builds(lambda a, p: f"{a}/{p}", v6, st.integers(0, 128)),
)


@st.composite
def identifier_texts(draw: st.DrawFn) -> str:
    from urllib.parse import urlencode

    pairs = [("host", h) for h in draw(st.lists(hosts, max_size=3))]
    pairs += [("ipv4", a) for a in draw(st.lists(v4, max_size=3))]
    pairs += [("ipv6", a) for a in draw(st.lists(v6, max_size=3))]
    pairs += [("cidr", n) for n in draw(st.lists(nets, max_size=3))]
    if draw(st.booleans()):
        pairs.append(("default-route", draw(st.sampled_from(["true", "false"]))))
    return urlencode(draw(st.permutations(pairs)))


def test_parse_example() -> None:
    ids = AgentIdentifiers.parse(EXAMPLE)
    assert ids.hosts == {"n1"}
    assert ids.ipv4 == {ipaddress.IPv4Address("10.0.0.5")}
    assert ids.ipv6 == {ipaddress.IPv6Address("fd00::5")}
    assert ids.cidrs == (ipaddress.IPv4Network("10.1.0.0/16"),)
    assert ids.default_route


def test_parse_empty() -> None:
    ids = AgentIdentifiers.parse("")
    assert ids == AgentIdentifiers()
    assert not ids.default_route and not ids.matches_host("n1")
    assert ids.render() == ""


@given(identifier_texts())
@settings(max_examples=200)
def test_parse_render_round_trip(text: str) -> None:
    ids = AgentIdentifiers.parse(text)
    again = AgentIdentifiers.parse(ids.render())
    assert again == ids
    assert again.render() == ids.render()


def test_render_is_parseable_konnectivity_form() -> None:
    ids = AgentIdentifiers.parse(EXAMPLE)
    out = ids.render()
    assert out.startswith("host=n1&ipv4=10.0.0.5&ipv6=")
    assert out.endswith("&default-route=true")
    assert AgentIdentifiers.parse(out) == ids


def test_repeated_keys_accumulate() -> None:
    ids = AgentIdentifiers.parse("host=a&host=B&ipv4=10.0.0.1&ipv4=10.0.0.2&cidr=10.9.0.0/16")
    assert ids.hosts == {"a", "b"}
    assert len(ids.ipv4) == 2


def test_default_route_last_value_wins() -> None:
    assert not AgentIdentifiers.parse("default-route=false").default_route
    assert AgentIdentifiers.parse("default-route=false&default-route=true").default_route


# ------------------------------------------------------------------ destHost


@pytest.mark.parametrize("host", ["n1", "N1", "n1", "NODE-1.Example.COM"])
def test_match_host_case_insensitive(host: str) -> None:
    ids = AgentIdentifiers.parse("host=n1&host=node-1.example.com")
    assert ids.matches_host(host)


def test_match_host_declared_in_upper_case() -> None:
    assert AgentIdentifiers.parse("host=Node-7").matches_host("node-7")


@pytest.mark.parametrize("host", ["n2", "n1.", "n", "n1x", "", "10.0.0.5"])
def test_no_match_host(host: str) -> None:
    assert not AgentIdentifiers.parse("host=n1").matches_host(host)


def test_match_ipv4() -> None:
    ids = AgentIdentifiers.parse("ipv4=10.0.0.5")
    assert ids.matches_host("10.0.0.5")
    assert not ids.matches_host("10.0.0.6")
    assert not ids.matches_host("::ffff:10.0.0.5")  # no cross-family matching


@pytest.mark.parametrize("host", ["fd00::5", "FD00::5", "fd00:0:0:0:0:0:0:5", "[fd00::5]"])
def test_match_ipv6_any_spelling(host: str) -> None:
    assert AgentIdentifiers.parse("ipv6=fd00::5").matches_host(host)


def test_no_match_ipv6() -> None:
    ids = AgentIdentifiers.parse("ipv6=fd00::5")
    assert not ids.matches_host("fd00::6")
    assert not ids.matches_host("fd00::5:0")


@pytest.mark.parametrize(
    "cidr,inside,outside",
    [
        ("10.1.0.0/16", ["10.1.0.0", "10.1.255.255", "10.1.2.3"], ["10.2.0.0", "10.0.255.255"]),
        ("10.1.2.3/16", ["10.1.99.1"], ["10.3.0.1"]),  # host bits are tolerated
        ("192.168.1.7/32", ["192.168.1.7"], ["192.168.1.8"]),
        ("0.0.0.0/0", ["1.2.3.4", "255.255.255.255"], ["::1", "fd00::1"]),
        ("fd00::/8", ["fd00::1", "fdff::1", "[fd12::1]"], ["fe00::1", "10.0.0.1"]),
        ("::/0", ["::1", "2001:db8::1"], ["10.0.0.1", "0.0.0.0"]),
        ("2001:db8::/127", ["2001:db8::", "2001:db8::1"], ["2001:db8::2"]),
    ],
)
def test_match_cidr(cidr: str, inside: list[str], outside: list[str]) -> None:
    ids = AgentIdentifiers.parse(f"cidr={cidr}")
    for host in inside:
        assert ids.matches_host(host), host
    for host in outside:
        assert not ids.matches_host(host), host


def test_cidr_does_not_match_names() -> None:
    assert not AgentIdentifiers.parse("cidr=0.0.0.0/0&cidr=::/0").matches_host("n1")


@given(st.ip_addresses(), st.ip_addresses(), st.integers(0, 128))
@settings(max_examples=300)
def test_cidr_containment_agrees_with_ipaddress(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    base: ipaddress.IPv4Address | ipaddress.IPv6Address,
    prefix: int,
) -> None:
    prefix = min(prefix, base.max_prefixlen)
    net = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    ids = AgentIdentifiers.parse(f"cidr={net}")
    expected = addr.version == net.version and addr in net
    assert ids.matches_host(str(addr)) == expected


def test_default_route() -> None:
    assert AgentIdentifiers.parse("default-route=true").default_route
    assert not AgentIdentifiers.parse("host=n1").default_route
    # default-route alone does not make destHost match anything
    assert not AgentIdentifiers.parse("default-route=true").matches_host("10.0.0.1")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "text,words",
    [
        ("foo=1", ["unknown", "foo"]),
        ("host=", ["empty host"]),
        ("host=n1&", ["bad query field"]),
        ("host", ["bad query field"]),
        ("&", ["bad query field"]),
        ("host=a&&host=b", ["bad query field"]),
        ("ipv4=300.1.1.1", ["300"]),
        ("ipv4=fd00::1", ["fd00::1"]),
        ("ipv4=10.0.0.5/32", ["10.0.0.5/32"]),
        ("ipv6=10.0.0.1", ["10.0.0.1"]),
        ("ipv6=fd00::zz", ["fd00::zz"]),
        ("cidr=10.0.0.0/33", ["10.0.0.0/33"]),
        ("cidr=nonsense", ["nonsense"]),
        ("default-route=yes", ["default-route", "yes"]),
        ("default-route=", ["default-route"]),
        ("Host=n1", ["unknown", "Host"]),
        ("host=" + "x" * MAX_IDENTIFIERS_LEN, ["longer"]),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(text: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        AgentIdentifiers.parse(text)
    for w in words:
        assert w in str(info.value)


@given(st.text(max_size=80))
@settings(max_examples=300)
def test_parse_raises_only_value_error(text: str) -> None:
    try:
        ids = AgentIdentifiers.parse(text)
    except ValueError:
        return
    assert AgentIdentifiers.parse(ids.render()) == ids


def test_entry_cap_is_checked_before_parsing() -> None:
    """At most 64 entries (protocol.flood.MAX_IDENTIFIER_ENTRIES), in the
    connect header as in an identifiers message: the parse cost is bounded."""
    at_cap = "&".join(f"cidr=10.0.{i}.0/24" for i in range(MAX_IDENTIFIER_ENTRIES))
    assert len(AgentIdentifiers.parse(at_cap).cidrs) == MAX_IDENTIFIER_ENTRIES
    with pytest.raises(ValueError, match="more than 64 identifiers"):
        AgentIdentifiers.parse(at_cap + "&ipv4=10.0.0.1")
