"""A short pass of every atheris fuzz target (``fuzz/``), as ``make test`` runs it.

Each target runs for a few seconds in its own process (libFuzzer exits when
done) from the committed seeds, writing new inputs to a temporary corpus, so
the checkout is left untouched. Three run at a time; the whole pass takes
well under 30 s. A crash fails the target's test and prints the input as
libFuzzer wrote it: turn it into a test in ``test_fuzz_regressions.py``.
``make fuzz FUZZ_SECONDS=...`` is the long version.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "fuzz" / "run.py"
TARGETS = ("messages", "control", "data_stream", "grpc", "session", "h2base", "connect")
SECONDS = 4
PARALLEL = 3
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


@attrs.frozen
class Outcome:
    target: str
    returncode: int
    runs: int
    output: str


def _run(target: str, work: Path) -> Outcome:
    proc = subprocess.run(
        [sys.executable, str(RUNNER), target, f"--seconds={SECONDS}", f"--work={work}"],
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    match = _DONE.search(output)
    return Outcome(target, proc.returncode, int(match.group(1)) if match else 0, output)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    work = tmp_path_factory.mktemp("fuzz")
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda t: _run(t, work), TARGETS))
    yield {r.target: r for r in results}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_short_pass(
    target: str, outcomes: dict[str, Outcome], capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = outcomes[target]
    with capsys.disabled():
        print(f"\nfuzz {target}: {outcome.runs} executions in {SECONDS}s", end="")
    if outcome.returncode != 0:
        crash = outcome.output[outcome.output.find("=== Uncaught") :]
        pytest.fail(f"{target} crashed (exit {outcome.returncode}):\n{crash[-4000:]}")
    if outcome.runs <= 100:
        pytest.fail(f"{target} barely ran:\n{outcome.output[-2000:]}")
