"""The benchmark run: plan, environment, phases, output.

Phases, in order (each only if a selected scenario needs it):

1. emulator self-check on every selected emulated profile (the link must
   prove it does what the profile says before anything is measured on it);
2. loopback stack (no namespaces): S1, S2, S3, S6;
3. one emulated link with every contender on it, switched between profiles
   with ``LinkSim.reconfigure`` (the processes and their connections stay):
   ``lte`` first (S8 idle, S2, S3, S4, S5, S6, S7), then the other profiles
   (S2, S3 on satellite, S4);
4. S9 in its own process (``benchmarks.many_agents``).

``results.json`` is rewritten after every phase, so an interrupted run keeps
what it measured. Namespaces and processes are cleaned up on any exit,
including Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs

from benchmarks import contenders, report, scenarios
from benchmarks.linksim import (
    CheckSettings,
    LinkSim,
    LinkSimUnavailable,
    check_available,
    load_profile,
    run_self_check,
)
from benchmarks.scenarios import PRESETS, Durations

REPO = Path(__file__).resolve().parent.parent
ALL_SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9", "S10")
#: flaky last: its periodic outages must not reach the other profiles' runs.
EMULATED = ("lte", "5g", "satellite", "lossy-iot", "flaky")
#: Profiles whose S4 varies widely run to run: median and spread of several runs.
LOSSY_PROFILES = ("satellite", "lossy-iot", "flaky")
#: Profiles only S4 runs on (an echo series across a 20 s outage says nothing).
S4_ONLY_PROFILES = ("flaky",)
DEFAULT_PROFILES = {
    "full": ("loopback", *EMULATED),
    "quick": ("loopback", "lte"),
    "smoke": ("loopback", "lte"),
}
#: S3 is judged on these (issue 6); elsewhere it is not run on emulated links.
S3_PROFILES = ("lte", "satellite")
#: Namespace name prefix (``TETHER_BENCH_PREFIX``: runs from several checkouts
#: on one machine keep apart).
BENCH_PREFIX = os.environ.get("TETHER_BENCH_PREFIX", "tbench")


class Run:
    def __init__(
        self,
        *,
        mode: str,
        scenarios_: list[str],
        profiles: list[str],
        out: Path,
        agents: int | None,
        seed: int,
        selfcheck: bool,
    ) -> None:
        self.mode = mode
        self.d: Durations = PRESETS[mode]
        if agents:
            self.d = attrs.evolve(self.d, s9_agents=agents)
        self.scenarios = scenarios_
        self.profiles = profiles
        self.out = out
        self.seed = seed
        self.selfcheck = selfcheck and self.d.selfcheck
        self.t0 = time.monotonic()
        self.errors: dict[str, str] = {}
        self.results: dict[str, Any] = {
            "meta": {
                "mode": mode,
                "argv": sys.argv,
                "pid": os.getpid(),
                "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "scenarios": scenarios_,
                "profiles": profiles,
                "durations": attrs.asdict(self.d),
                "environment": environment(),
                "run_id": out.name,
                "commit": git_commit(),
            },
            "contenders": {},
            "selfcheck": {},
            "congestion": {},
            "linkstats": {},
            "scenarios": {},
            "errors": self.errors,
            "notes": [],
        }

    # ---------------------------------------------------------------- output

    def progress(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")

    def wants(self, *names: str) -> bool:
        return any(n in self.scenarios for n in names)

    def sc(self, name: str) -> dict[str, Any]:
        res: dict[str, Any] = self.results["scenarios"].setdefault(name, {})
        return res

    # ---------------------------------------------------------------- phases

    def execute(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        emulated = [p for p in self.profiles if p != "loopback"]
        if emulated:
            try:
                check_available()
            except LinkSimUnavailable as exc:
                note = f"link emulation unavailable ({exc}): loopback scenarios only"
                self.progress(note)
                self.results["notes"].append(note)
                emulated = []
        self.progress(
            f"plan: {self.mode}; scenarios {','.join(self.scenarios)}; "
            f"profiles {','.join(['loopback'] * ('loopback' in self.profiles) + emulated)}"
        )
        work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
        try:
            if self.selfcheck and emulated:
                self.phase_selfcheck(emulated)
            if "loopback" in self.profiles and self.wants("S1", "S2", "S3", "S6"):
                self.phase_loopback(work / "loopback")
            if emulated and self.wants("S2", "S3", "S4", "S5", "S6", "S7", "S8", "S10"):
                self.phase_emulated(work / "emulated", emulated)
            elif self.wants("S8") and "loopback" in self.profiles:
                self.phase_idle_only(work / "idle")
            if self.wants("S9"):
                self.phase_scale(work / "s9")
        finally:
            self.results["meta"]["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self.save()
            keep = os.environ.get("TETHER_BENCH_KEEP_LOGS")
            if keep:
                shutil.copytree(work, self.out / "logs", dirs_exist_ok=True)
            shutil.rmtree(work, ignore_errors=True)
        report.write(self.results, self.out)
        self.progress(f"done: {self.out}/summary.md ({len(self.errors)} error(s))")
        return 0 if not self.errors else 1

    def phase_selfcheck(self, profiles: list[str]) -> None:
        smoke = self.mode == "smoke"
        for name in profiles:
            prof = load_profile(name)
            checks = ("rtt", "down") if smoke else ("rtt", "throughput", "down")
            self.progress(f"self-check of the emulated link: {name} ({', '.join(checks)})")
            settings = CheckSettings(
                rtt_probes=10 if smoke else 20,
                rtt_interval_s=0.05,
                throughput_s=2.0,
                throughput_directions=("edge_to_cloud",),
                down_s=0.5 if smoke else 1.0,
            )
            try:
                rep = run_self_check(
                    prof, seed=self.seed, checks=checks, settings=settings, prefix=BENCH_PREFIX
                )
            except Exception as exc:
                self.errors[f"selfcheck/{name}"] = repr(exc)
                continue
            self.results["selfcheck"][name] = {
                "ok": rep.ok,
                "rows": [r.__dict__ for r in rep.rows],
            }
            for line in rep.table().splitlines()[1:]:
                self.progress("    " + line.strip())
            if not rep.ok:
                self.errors[f"selfcheck/{name}"] = "; ".join(
                    f"{r.check}: {r.measured} vs {r.expected}" for r in rep.failures()
                )
        self.save()

    @contextlib.contextmanager
    def stacks_on(
        self, link: LinkSim, work: Path, optimistic: str | None = None
    ) -> Iterator[contenders.Stacks]:
        self.progress(f"starting contenders on {link.profile.name}")
        st = contenders.start_stacks(link, work, optimistic=optimistic)
        try:
            self.results["contenders"] = {
                n: contenders.LABELS[n] for n in [*st.contenders, *st.brokers]
            }
            if st.ssh is not None:
                self.results["meta"]["environment"]["versions"]["openssh"] = st.ssh.version
            self.progress(f"    up: {', '.join(st.contenders)}")
            yield st
        finally:
            st.stop()

    def phase_loopback(self, work: Path) -> None:
        prof = load_profile("loopback")
        with (
            LinkSim(prof, seed=self.seed, prefix=BENCH_PREFIX) as link,
            self.stacks_on(link, work) as st,
        ):
            if self.wants("S1"):
                self.progress("S1 bulk, loopback")
                self.sc("S1")["loopback"] = scenarios.s1_bulk(
                    st, self.d, self.errors, self.progress
                )
                self.save()
            if self.wants("S2"):
                self.progress("S2 echo, loopback")
                self.sc("S2")["loopback"] = scenarios.s2_echo(
                    st, prof, self.d, self.errors, self.progress
                )
            if self.wants("S3"):
                self.progress("S3 dial, loopback")
                self.sc("S3")["loopback"] = scenarios.s3_dial(
                    st, prof, self.d.s3_dials * 2, self.errors, self.progress
                )
            if self.wants("S6"):
                self.progress("S6 slow consumer, loopback")
                self.sc("S6")["loopback"] = scenarios.s6_slow_consumer(
                    st,
                    prof,
                    self.d.s6_loopback_s,
                    self.errors,
                    self.progress,
                    self.d.s6_loopback_pairs,
                )
            self.results["congestion"]["loopback"] = scenarios.congestion_by_contender(st)
            self.save()

    def phase_emulated(self, work: Path, profiles: list[str]) -> None:
        first = load_profile(profiles[0])
        optimistic = contenders.optimistic_flag() if self.wants("S3") else None
        if self.wants("S3") and optimistic is None:
            self.results["notes"].append(
                "optimistic CONNECT: this broker has no such option yet; S3 measures the "
                "standard CONNECT only"
            )
        footprint_s4: dict[str, Any] = {}
        with (
            LinkSim(first, seed=self.seed, prefix=BENCH_PREFIX, forwarder_nice=-5) as link,
            self.stacks_on(link, work, optimistic) as st,
        ):
            for i, name in enumerate(profiles):
                prof = load_profile(name)
                if i:
                    self.progress(f"switching the link to {name}")
                    link.reconfigure(prof)
                    health = scenarios.wait_healthy(st, 90)
                    if any(v is None for v in health.values()):
                        self.errors[f"{name}/health"] = f"not all contenders usable: {health}"
                self.progress(f"profile {name}: {prof.summary()}")
                if i == 0 and self.wants("S8"):
                    self.progress("S8 footprint, idle")
                    self.sc("S8")["idle"] = scenarios.s8_idle(st, self.d.s8_idle_s, self.progress)
                    self.sc("S8")["idle_profile"] = name
                if self.wants("S2") and name not in S4_ONLY_PROFILES:
                    self.progress(f"S2 echo, {name}")
                    self.sc("S2")[name] = scenarios.s2_echo(
                        st, prof, self.d, self.errors, self.progress
                    )
                if self.wants("S3") and name in S3_PROFILES:
                    self.progress(f"S3 dial, {name}")
                    dials = self.d.s3_satellite_dials if name == "satellite" else self.d.s3_dials
                    extra = ("tether-connect-optimistic",) if optimistic else ()
                    self.sc("S3")[name] = scenarios.s3_dial(
                        st, prof, dials, self.errors, self.progress, extra
                    )
                if self.wants("S4", "S8"):
                    self.progress(f"S4 goodput, {name}")
                    long = name in ("satellite", "lossy-iot")
                    secs = self.d.s4_long_measure_s if long else self.d.s4_measure_s
                    if name == "flaky":
                        secs = self.d.s4_flaky_measure_s
                    self.sc("S4")[name] = scenarios.s4_goodput(
                        st,
                        prof,
                        secs,
                        self.errors,
                        self.progress,
                        footprint_s4,
                        self.d.s4_min_warmup_s,
                        runs=self.d.s4_lossy_runs if name in LOSSY_PROFILES else 1,
                    )
                    self.sc("S8")["during_s4"] = footprint_s4
                if name == "lte" and self.wants("S5"):
                    self.progress("S5 echo under load, lte")
                    self.sc("S5")[name] = scenarios.s5_under_load(
                        st, prof, self.d, self.errors, self.progress
                    )
                if name == "lte" and self.wants("S6") and self.d.s6_on_link:
                    self.progress("S6 slow consumer, lte")
                    self.sc("S6")[name] = scenarios.s6_slow_consumer(
                        st, prof, self.d.s6_link_s, self.errors, self.progress
                    )
                if i == 0 and self.wants("S7"):
                    self.progress(f"S7 recovery, {name}")
                    self.sc("S7")[name] = scenarios.s7_recovery(
                        st, self.d, self.errors, self.progress
                    )
                if i == 0 and self.wants("S10"):
                    self.progress(f"S10 mobility, {name}")
                    self.sc("S10")[name] = scenarios.s10_mobility(
                        st, self.d, self.errors, self.progress
                    )
                self.results["congestion"][name] = scenarios.congestion_by_contender(st)
                self.results["linkstats"][name] = link.stats()
                self.save()

    def phase_idle_only(self, work: Path) -> None:
        with LinkSim("loopback", prefix=BENCH_PREFIX) as link, self.stacks_on(link, work) as st:
            self.progress("S8 footprint, idle (loopback)")
            self.sc("S8")["idle"] = scenarios.s8_idle(st, self.d.s8_idle_s, self.progress)
            self.sc("S8")["idle_profile"] = "loopback"
            self.save()

    def phase_scale(self, work: Path) -> None:
        n = self.d.s9_agents
        self.progress(f"S9 broker scale, {n} simulated agents")
        work.mkdir(parents=True, exist_ok=True)
        out = work / "s9.json"
        log = work / "s9.log"
        with log.open("wb") as log_file:
            rc = self._run_many_agents(n, out, log_file)
        if rc != 0 or not out.exists():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            self.errors["S9"] = f"many_agents exited with {rc}: {tail}"
            self.progress(f"    S9 failed: {self.errors['S9']}")
            return
        self.sc("S9")["result"] = json.loads(out.read_text())
        self.save()

    def _run_many_agents(self, n: int, out: Path, log_file: IO[bytes]) -> int | None:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.many_agents",
                f"--agents={n}",
                f"--dial-seconds={self.d.s9_dial_s}",
                f"--storm-cap={max(60.0, n / 50)}",
                f"--json={out}",
            ],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            return proc.wait(timeout=600 + n / 10)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def git_commit() -> str:
    """The commit the run measured (``git describe --always --dirty``)."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    git = git_commit()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in (read("/proc/cpuinfo") or "").splitlines()
            if line.startswith("model name")
        ),
        None,
    )
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "loadavg_at_start": read("/proc/loadavg"),
        "memory_total_kib": next(
            (
                int(line.split()[1])
                for line in (read("/proc/meminfo") or "").splitlines()
                if line.startswith("MemTotal")
            ),
            None,
        ),
        "tcp_congestion_default": read("/proc/sys/net/ipv4/tcp_congestion_control"),
        "tcp_congestion_available": read("/proc/sys/net/ipv4/tcp_available_congestion_control"),
        "python": sys.version.split()[0],
        "versions": {
            "tether": f"{version('tether')} ({git})",
            "trio": version("trio"),
            "h2": version("h2"),
            "grpcio": version("grpcio"),
            "matplotlib": version("matplotlib"),
            "autossh": "yes" if shutil.which("autossh") else "no (shell restart loop)",
        },
    }


def _on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(
    *,
    mode: str,
    scenarios_: list[str],
    profiles: list[str] | None,
    out: Path | None,
    agents: int | None,
    seed: int,
    selfcheck: bool,
) -> int:
    """Entry point of ``python -m benchmarks run``."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out or REPO / "benchmarks" / "results" / stamp
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)  # unwind: every `with` cleans up
    r = Run(
        mode=mode,
        scenarios_=scenarios_,
        profiles=list(profiles or DEFAULT_PROFILES[mode]),
        out=out,
        agents=agents,
        seed=seed,
        selfcheck=selfcheck,
    )
    return r.execute()
