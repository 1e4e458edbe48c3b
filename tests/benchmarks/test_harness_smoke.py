"""The benchmark harness, end to end in seconds, so that it cannot rot.

``python -m benchmarks run --smoke`` runs every scenario (S1-S10) with every
contender (direct TCP, ssh -R, Tether CONNECT and gRPC) on loopback and on
the emulated ``lte`` link, after the emulator's own self-check on ``lte``.
This test asserts only that the harness works: the files exist, every
contender is reported in every scenario, nothing failed, and no namespace or
process is left behind. It never judges a number.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.linksim import LinkSimUnavailable, check_available, list_namespaces

REPO = Path(__file__).resolve().parents[2]
CONTENDERS = {"direct", "ssh", "tether-connect", "tether-grpc"}


def _emulation_available() -> bool:
    try:
        check_available()
    except LinkSimUnavailable:
        return False
    return True


def _leftover_processes(marker: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry}: {cmdline[:200]}")
    return found


@pytest.mark.timeout(220)
def test_smoke_run_reports_every_contender(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Every process's argv names a path in here; short, for the Unix sockets.
    scratch = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    try:
        _run_and_check(out, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_and_check(out: Path, scratch: Path) -> None:
    env = dict(os.environ, TMPDIR=str(scratch), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=210,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    res = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    assert res["errors"] == {}, res["errors"]
    for png in ("goodput.png", "latency_cdf.png", "recovery.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in summary
    assert "## Issue-6 targets" in summary
    assert res["meta"]["run_id"] == out.name and res["meta"]["commit"]
    assert f"Run {out.name}, commit {res['meta']['commit']}" in summary

    emulated = _emulation_available()
    sc = res["scenarios"]
    expected: dict[str, list[str]] = {
        "S1": ["loopback"],
        "S2": ["loopback", "lte"] if emulated else ["loopback"],
        "S3": ["loopback", "lte"] if emulated else ["loopback"],
        "S6": ["loopback"],
    }
    if emulated:
        expected |= {"S4": ["lte"], "S5": ["lte"]}
        assert res["selfcheck"]["lte"]["ok"], res["selfcheck"]
    for scenario, profiles in expected.items():
        for prof in profiles:
            got = set(sc[scenario][prof]["contenders"])
            assert got >= CONTENDERS, (scenario, prof, got)
    if emulated:
        outages = sc["S7"]["lte"]["outages"]
        assert outages and all(
            set(o["contenders"]) >= CONTENDERS
            and all(r["recovery_s"] is not None for r in o["contenders"].values())
            for o in outages
        ), outages
        assert set(res["congestion"]["lte"]) >= CONTENDERS
        s10 = sc["S10"]["lte"]["contenders"]
        assert all(s10[n]["recovery_s"] is not None for n in ("tether-connect", "tether-grpc")), s10
        assert set(sc["S8"]["idle"]["contenders"]) >= CONTENDERS - {"direct"}
    s9 = sc["S9"]["result"]
    assert s9["initial_connected"] == s9["agents"] and s9["dial"]["dials_ok"] > 0

    # Cleanup: nothing that ran from the scratch directory is still alive,
    # and no namespace of this run remains.
    assert _leftover_processes(str(scratch)) == []
    # Namespaces are named <prefix>-<side>-<owner pid>-<n>.
    owner = f"-{res['meta']['pid']}-"
    assert [ns for ns in list_namespaces("tbench") if owner in ns] == []
