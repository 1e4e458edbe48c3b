"""deploy/systemd/tether-agent.service: systemd accepts it (``systemd-analyze
verify``), rates its sandbox OK (``systemd-analyze security``), and it starts
the agent with flags the agent really has."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "tether-agent.service"
TOML_EXAMPLE = REPO / "deploy" / "systemd" / "agent.toml.example"
AGENT = Path(sys.executable).parent / "tether-agent"
MAX_EXPOSURE = 2.0


def systemd_analyze() -> str:
    """The tool, installed from Debian's systemd package if missing (root)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "systemd"], check=True)
        tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is needed (Debian package systemd)"
    return tool


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows repeated keys."""
    out = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_entries(UNIT) if s == section and k == key]


def unit_search_path() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    raise AssertionError("no systemd unit directory with sysinit.target")


def make_root(root: Path, agent: bool = True) -> Path:
    """A root for ``verify --root``: systemd's own units, the unit under test
    and, unless told otherwise, an executable at the ExecStart path."""
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(unit_search_path(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    if agent:
        exe = root / "opt/tether/bin/tether-agent"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return root / "etc/systemd/system" / UNIT.name


def agent_flags() -> set[str]:
    out = subprocess.run([str(AGENT), "--help"], capture_output=True, text=True, check=True)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))


@pytest.mark.timeout(60)
def test_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = make_root(tmp_path / "root")
    result = subprocess.run(
        [systemd_analyze(), "verify", f"--root={tmp_path / 'root'}", str(unit)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", "verify printed warnings"


@pytest.mark.timeout(60)
def test_verify_checks_the_executable_for_real(tmp_path: Path) -> None:
    # The control for the test above: without the file, verify fails.
    unit = make_root(tmp_path / "root", agent=False)
    result = subprocess.run(
        [systemd_analyze(), "verify", f"--root={tmp_path / 'root'}", str(unit)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "/opt/tether/bin/tether-agent" in result.stderr


@pytest.mark.timeout(60)
def test_security_exposure_is_ok() -> None:
    tool = systemd_analyze()
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    m = re.search(
        r"Overall exposure level for tether-agent\.service: (\d+\.\d+) (\w+)", result.stdout
    )
    assert m, result.stdout[-2000:]
    exposure = float(m[1])
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert m[2] in ("OK", "SAFE")
    # systemd's own gate agrees (the threshold is in tenths).
    gate = subprocess.run(
        [tool, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
        capture_output=True,
    )
    assert gate.returncode == 0


@pytest.mark.timeout(30)
def test_unit_runs_the_agent_as_a_notify_service_with_a_watchdog() -> None:
    assert values("Type") == ["notify"]
    assert values("NotifyAccess") == ["main"]
    assert values("Restart") == ["always"]
    (watchdog,) = values("WatchdogSec")
    assert watchdog.endswith("s") and 10 <= int(watchdog[:-1]) <= 120
    (restart_sec,) = values("RestartSec")
    assert restart_sec.endswith("s") and 1 <= int(restart_sec[:-1]) <= 60
    assert values("User") == ["tether"] and values("Group") == ["tether"]
    assert values("CapabilityBoundingSet") == [""]
    assert values("RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX"]
    assert values("ProtectSystem") == ["strict"]
    assert values("MemoryMax")


@pytest.mark.timeout(30)
def test_unit_and_example_settings_are_real_agent_settings(tmp_path: Path) -> None:
    known = agent_flags()
    (exec_start,) = values("ExecStart")
    argv = shlex.split(exec_start)
    assert argv == ["/opt/tether/bin/tether-agent", "--config-file=/etc/tether/agent.toml"]
    assert {a.split("=", 1)[0] for a in argv[1:]} <= known
    assert values("EnvironmentFile") == ["-/etc/tether/agent.env"]

    # The example file is a valid agent config: --print-config reads it
    # through the agent's own checks (an unknown key or bad value exits 2).
    result = subprocess.run(
        [str(AGENT), f"--config-file={TOML_EXAMPLE}", "--print-config"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("TETHER_")},
    )
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["proxy_server_host"] == "broker.example.internal"
    for key in ("ca_cert", "agent_cert", "agent_key"):
        assert effective[key].startswith("/etc/tether/pki/"), key
    # ... and the check is real.
    bad = tmp_path / "bad.toml"
    bad.write_text(TOML_EXAMPLE.read_text() + 'agent_kye = "x"\n')
    result = subprocess.run(
        [str(AGENT), f"--config-file={bad}", "--print-config"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "agent_kye" in result.stderr
