"""``tether demo`` (what ``make demo`` runs) works end to end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(90)
def test_demo_runs_and_stops_cleanly(tmp_path: Path) -> None:
    tether = Path(sys.executable).parent / "tether"
    result = subprocess.run(
        [str(tether), "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[tcp] CONNECT" in out and "-> 200" in out
    assert "hello from the edge, through the tether" in out
    assert "bulk GET of 32 MiB -> 200" in out
    assert "-> 502" in out  # the refused dial is shown too
    assert "stopped: agent agent-1 exit 0, broker exit 0" in out


def _wait_line(proc: subprocess.Popen[str], needle: str, seen: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} not seen in {''.join(seen)!r}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose only once reaped; the demo reaps its children
    return Path(f"/proc/{pid}").exists()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_demo_keep_running_stops_on_signal(signum: int) -> None:
    """``tether demo --keep-running`` under SIGTERM or Ctrl-C: broker and
    agent stopped, the temporary directory with the CA key removed, exit 0,
    no traceback (issue 15 row 10)."""
    tether = Path(sys.executable).parent / "tether"
    proc = subprocess.Popen(
        [str(tether), "demo", "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # our signal reaches the demo alone, as `kill PID` would
    )
    seen: list[str] = []
    pids: list[int] = []
    try:
        _wait_line(proc, "Running until Ctrl-C", seen, 60)
        text = "".join(seen)
        pids += [int(m) for m in re.findall(r"pid (\d+):", text)]
        workdir = Path(re.findall(r"certificates: (\S+)", text)[0]).parent
        assert len(pids) == 2 and all(_alive(p) for p in pids), text
        assert (workdir / "pki" / "ca.key").exists()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        for pid in pids:  # orphans of a demo that did not stop its children
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "stopped: agent agent-1 exit 0, broker exit 0" in out
    assert not any(_alive(p) for p in pids)
    assert not workdir.exists()
