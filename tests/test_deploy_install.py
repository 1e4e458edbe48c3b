"""Offline install on a device: deploy/systemd/wheelhouse.py builds a
wheelhouse (for this machine's architecture only, to stay fast; ``make
wheelhouse`` does all three), and install.sh installs from it into a
temporary root, twice, without network."""

from __future__ import annotations

import os
import platform
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_deploy_systemd import systemd_analyze, unit_search_path

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "deploy" / "systemd"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    dest = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [sys.executable, str(SYSTEMD / "wheelhouse.py"), "--dest", str(dest), "--arch", arch],
        check=True,
        capture_output=True,
        timeout=240,
    )
    return dest


def offline(argv: list[str]) -> list[str]:
    """Run in a fresh network namespace (root can): proof that nothing is downloaded."""
    unshare = shutil.which("unshare")
    assert unshare and os.geteuid() == 0, "the install test runs as root with unshare"
    return [unshare, "--net", *argv]


@pytest.mark.timeout(300)
def test_wheelhouse_bundle(wheelhouse: Path) -> None:
    names = {p.name for p in wheelhouse.iterdir()}
    assert {"install.sh", "tether-agent.service", "agent.toml.example", "SHA256SUMS"} <= names
    assert any(n.startswith("tether-") and n.endswith(".whl") for n in names)
    assert any(n.startswith("pip-") and n.endswith(".whl") for n in names)
    sums = dict(
        reversed(line.split("  ", 1))
        for line in (wheelhouse / "SHA256SUMS").read_text().split("\n")
        if line
    )
    assert set(sums) == names - {"SHA256SUMS"}


@pytest.mark.timeout(300)
def test_install_into_a_root_prefix_twice(wheelhouse: Path, tmp_path: Path) -> None:
    systemd_analyze()  # the systemd package, for systemd-sysusers and verify
    root = tmp_path / "root"
    # A root with umask 077 must still leave the venv readable to the agent's user.
    script = ["sh", "-c", 'umask 077 && exec sh "$0" "$@"', str(SYSTEMD / "install.sh")]
    first = subprocess.run(
        offline([*script, "--prefix", str(root), "--wheelhouse", str(wheelhouse)]),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installing tether" in first.stdout

    agent = root / "opt/tether/bin/tether-agent"
    code = next((root / "opt/tether/lib").glob("python3.*/site-packages/edge_agent/app.py"))
    assert mode(agent) & 0o005 == 0o005 and mode(code) & 0o004 == 0o004
    out = subprocess.run([str(agent), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: tether-agent"), out.stderr
    broker = subprocess.run(
        [str(root / "opt/tether/bin/tether-broker"), "--help"], capture_output=True
    )
    assert broker.returncode == 0

    # The agent's system user, and settings only root and its group can read.
    passwd = (root / "etc/passwd").read_text().splitlines()
    (entry,) = [line.split(":") for line in passwd if line.startswith("tether:")]
    uid, gid = int(entry[2]), int(entry[3])
    assert 0 < uid < 1000 and entry[6] == "/usr/sbin/nologin"
    etc = root / "etc/tether"
    for path, want in ((etc, 0o750), (etc / "pki", 0o750), (etc / "agent.toml", 0o640)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (want, 0, gid), path
    assert (etc / "agent.toml").read_text() == (SYSTEMD / "agent.toml.example").read_text()
    unit = root / "etc/systemd/system/tether-agent.service"
    assert unit.read_bytes() == (SYSTEMD / "tether-agent.service").read_bytes()
    assert mode(unit) == 0o644

    # Second run, from the bundle itself (it finds its own wheels): nothing
    # changes, and local settings survive.
    (etc / "agent.toml").write_text('agent_id = "mine"\n')
    key = etc / "pki/agent.key"
    key.write_text("secret")
    key.chmod(0o600)
    venv_cfg = (root / "opt/tether/pyvenv.cfg").stat().st_mtime_ns
    second = subprocess.run(
        offline(["sh", str(wheelhouse / "install.sh"), "--prefix", str(root)]),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "packages are up to date" in second.stdout
    assert (etc / "agent.toml").read_text() == 'agent_id = "mine"\n'
    assert (stat.S_IMODE(key.stat().st_mode), key.stat().st_gid) == (0o640, gid)
    assert passwd == (root / "etc/passwd").read_text().splitlines(), "no second user"
    assert (root / "opt/tether/pyvenv.cfg").stat().st_mtime_ns == venv_cfg
    assert subprocess.run([str(agent), "--help"], capture_output=True).returncode == 0

    # systemd accepts the installed unit with the installed executable.
    shutil.copytree(unit_search_path(), root / "usr/lib/systemd/system", symlinks=True)
    verify = subprocess.run(
        [systemd_analyze(), "verify", f"--root={root}", str(unit)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr


@pytest.mark.timeout(60)
def test_install_refuses_a_missing_wheelhouse(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            "sh",
            str(SYSTEMD / "install.sh"),
            "--prefix",
            str(tmp_path),
            "--wheelhouse",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "no wheelhouse" in result.stderr
    assert not (tmp_path / "opt").exists()
