"""klog's log-file flags mapped to our logging (issue 15 item 1): a
konnectivity manifest's ``--logtostderr=false --log-file=F`` writes F and
nothing to stderr; ``--alsologtostderr`` writes both; the file is rotated at
``--log-file-max-size``; an unusable file is a one-line start-up error.
Through the real commands, except the rotation, which is checked in process
(it needs megabytes of lines)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from procs import BrokerHandle, Proc, wait_for

from tether.netio.logs import setup_logging
from tether.tools.certs import PkiPaths
from tether.tools.launch import BIN

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def _written(where: Path | Proc, text: str) -> None:
    async def check() -> bool:
        if isinstance(where, Proc):
            return text in where.log()
        return where.exists() and text in where.read_text()

    await wait_for(check, 20, f"{text!r} in {where}")


async def test_konnectivity_log_flags_write_the_file_only(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    broker_file, agent_file = tmp_path / "server.log", tmp_path / "agent.log"
    # Go flag syntax as a konnectivity manifest writes it, single dash included.
    broker = broker_factory("--logtostderr=false", f"-log-file={broker_file}")
    agent = agent_factory(broker, "-logtostderr=false", "--log-file", str(agent_file))
    await broker.ready(agents=1)
    await _written(agent_file, "connected to broker")
    await _written(broker_file, "agent connected: id=agent-1")
    agent.stop()
    broker.proc.stop()
    # stderr (the Proc log) got nothing: every line went to the file.
    assert broker.proc.log().strip() == "", broker.proc.log()[-500:]
    assert agent.log().strip() == "", agent.log()[-500:]
    assert "drain" in agent_file.read_text()
    assert (broker_file.stat().st_mode & 0o777) == 0o640


async def test_alsologtostderr_writes_both(
    broker_factory: Callable[..., BrokerHandle], tmp_path: Path
) -> None:
    path = tmp_path / "both.log"
    broker = broker_factory("--logtostderr=false", "--alsologtostderr", f"--log-file={path}")
    await broker.up()
    await _written(broker.proc, "event=started")
    await _written(path, "event=started")


async def test_log_file_with_default_logtostderr_writes_both(
    broker_factory: Callable[..., BrokerHandle], tmp_path: Path
) -> None:
    path = tmp_path / "tee.log"
    broker = broker_factory(f"--log-file={path}")
    await broker.up()
    await _written(broker.proc, "event=started")
    await _written(path, "event=started")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _valid_argv(command: str, pki: PkiPaths) -> list[str]:
    if command == "tether-broker":
        return [
            f"--cluster-cert={pki.broker_cert}",
            f"--cluster-key={pki.broker_key}",
            f"--cluster-ca-cert={pki.ca_cert}",
            "--server-port=0",
            f"--uds-name={pki.ca_cert.parent / 'never-bound.sock'}",
        ]
    cert, key = pki.agent("agent-1")
    return [f"--ca-cert={pki.ca_cert}", f"--agent-cert={cert}", f"--agent-key={key}"]


@pytest.mark.parametrize("command", ["tether-broker", "tether-agent"])
def test_an_unusable_log_file_is_a_one_line_start_up_error(
    command: str, pki: PkiPaths, tmp_path: Path
) -> None:
    missing_dir = tmp_path / "no-such-dir" / "x.log"
    valid = _valid_argv(command, pki)
    done = _run(str(BIN / command), *valid, f"--log-file={missing_dir}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"{command}: cannot open --log-file {missing_dir}: No such file or directory"
    ]
    done = _run(str(BIN / command), *valid, "--no-log-stderr")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"{command}: --no-log-stderr needs --log-file: no line would be written anywhere"
    ]


async def test_logtostderr_false_without_a_file_keeps_stderr_and_says_so(
    broker_factory: Callable[..., BrokerHandle], agent_factory: Callable[..., Proc]
) -> None:
    broker = broker_factory()
    agent = agent_factory(broker, "--logtostderr=false")
    await broker.ready(agents=1)
    await _written(agent, "--logtostderr=false without --log-file: lines still go to stderr")
    await _written(agent, "connected to broker")


def test_the_file_is_rotated_at_its_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "rotated.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("text", "info", file=str(path), file_max_mib=1, to_stderr=False)
        line = "x" * 1000
        for n in range(3000):  # about 3 MiB
            logging.getLogger("tether.test").info("%d %s", n, line)
        for handler in root.handlers:
            handler.close()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    rotated = Path(f"{path}.1")
    assert rotated.exists()
    assert path.stat().st_size <= 1024 * 1024
    assert rotated.stat().st_size <= 1024 * 1024
    assert not Path(f"{path}.2").exists()  # one previous file: at most twice the cap
    # Nothing lost at the cut: the last line written is in the current file.
    assert _lines(path)[-1].endswith(f"2999 {line}")
