"""protocol/ is sans-IO: no clock, no randomness of its own, no patches at
import, no reading h2's private buffer, no trio or sockets. The runtime
passes time and random bytes in (``docs/architecture.md``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "protocol"

FORBIDDEN = {
    "a clock": re.compile(r"\btime\.(monotonic|time|perf_counter|process_time)\w*\b"),
    "the time module": re.compile(r"^\s*(import time\b|from time import)", re.M),
    "OS randomness": re.compile(r"\bos\.urandom\b|\bsecrets\.|\buuid\.uuid4\b"),
    "module-level random functions": re.compile(
        r"\brandom\.(random|uniform|randint|randrange|choice|choices|shuffle|sample|"
        r"randbytes|getrandbits|seed|gauss|expovariate)\s*\("
    ),
    "h2's private output buffer": re.compile(r"_data_to_send\b"),
    "trio": re.compile(r"^\s*(import trio|from trio)", re.M),
    "sockets": re.compile(r"^\s*(import socket|from socket|import ssl|from ssl)", re.M),
}


def _sources() -> list[Path]:
    return sorted(p for p in PROTOCOL.glob("*.py") if not p.name.endswith("_pb2.py"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_protocol_does_not_use(what: str) -> None:
    pattern = FORBIDDEN[what]
    hits = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0).strip()}"
        for path in _sources()
        for text in [path.read_text(encoding="utf-8")]
        for m in pattern.finditer(text)
    ]
    assert hits == [], f"protocol/ uses {what}"


@pytest.mark.timeout(30)
def test_importing_protocol_patches_nothing() -> None:
    """Importing every protocol module leaves hyperframe's DataFrame repr as
    hyperframe wrote it; only the runtime applies the work-around."""
    modules = [p.stem for p in _sources() if p.stem != "__init__"]
    code = (
        "import importlib, hyperframe.frame as f\n"
        "before = f.DataFrame._body_repr\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module('protocol.' + m)\n"
        "assert f.DataFrame._body_repr is before, 'patched at import'\n"
        "import tether.netio.h2driver\n"
        "assert f.DataFrame._body_repr is not before, 'the runtime applies it'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=25
    )
    assert proc.returncode == 0, proc.stderr


def test_the_checks_can_fail() -> None:
    """The patterns match what they are meant to catch."""
    assert FORBIDDEN["a clock"].search("clock = time.monotonic")
    assert FORBIDDEN["OS randomness"].search("payload = os.urandom(8)")
    assert FORBIDDEN["module-level random functions"].search("x = random.uniform(0, 1)")
    assert not FORBIDDEN["module-level random functions"].search("rng: random.Random")
    assert FORBIDDEN["h2's private output buffer"].search("conn._data_to_send")
