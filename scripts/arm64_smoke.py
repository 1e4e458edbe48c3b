"""``make arm64-smoke``: the offline install and the agent on a Debian 12
arm64 root under qemu-user, tunnelling to a native broker.

Steps (each prints one PASS or FAIL line; any FAIL ends the run, exit 1):

1. ``binfmt``: qemu-aarch64 registered with binfmt_misc (the ``F`` flag, so
   the chroot needs no copy of qemu); an existing registration is kept.
2. ``root``: a Debian bookworm arm64 root made by debootstrap, reused from
   ``--root`` when its stamp matches ``ROOT_KEY`` and its python3 runs.
3. ``wheelhouse``: deploy/systemd/wheelhouse.py for aarch64 (PyPI).
4. ``install``: the wheelhouse copied into the root and ``install.sh`` run
   inside it under ``unshare --net`` (no network), twice (the second run
   installs nothing).
5. ``agent``: the native broker (certificates from ``tether certs init``)
   and the installed agent in the root, as the ``tether`` user, with the
   host's network; the broker's /readyz counts it.
6. ``get``, ``echo``, ``refused``: curl through the broker's CONNECT
   frontend (TCP, mTLS): a file from a host HTTP server (sha256 compared),
   bytes through an echo target, a dial to a closed port (502 and the
   agent's dial-failure reason).
7. ``drain``: SIGTERM with a tunnel open; the tunnel still works while the
   agent drains, and the agent exits 0.
8. ``restart``: the agent started again reconnects and serves a GET.

The cached root is never changed: each run mounts an overlay on it (in a
private mount namespace, with /proc and /dev), so mounts disappear with
the processes that made them. Every process is stopped by its PID at the
end, on failure too.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.server
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tether.tools.launch import Proc, free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "systemd")
# Change it to rebuild every cached root (a new suite, other packages).
ROOT_KEY = f"tether-arm64-root v1 debian {SUITE} arm64 minbase +{','.join(PACKAGES)}"
STAMP = ".tether-root-stamp"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WHEELHOUSE_IN_ROOT = "/var/tmp/tether-wheelhouse"
AGENT_ID = "edge-arm64"
# An aarch64 ELF executable (e_ident, e_type, e_machine 183), as qemu's own
# binfmt entry matches it.
ELF_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
ELF_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_NAME = "tether-qemu-aarch64"


class StepFailed(Exception):
    pass


def log(msg: str) -> None:
    print(msg, flush=True)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    what: str,
    env: dict[str, str] | None = None,
    log_to: Path | None = None,
) -> str:
    """Run to completion (its whole process group is killed on timeout);
    StepFailed with the output's tail if it fails."""
    out = open(log_to, "ab") if log_to else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=out or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            data, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise StepFailed(f"{what}: timed out after {timeout:.0f}s") from None
    finally:
        if out:
            out.close()
    text = log_to.read_text(errors="replace") if log_to else (data or b"").decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n    ".join(text.strip().splitlines()[-15:])
        raise StepFailed(f"{what}: exit {proc.returncode}\n    {tail}")
    return text


def retried(attempts: int, what: str, fn: Callable[[], None]) -> None:
    """Network downloads: a few tries before giving up."""
    for attempt in range(1, attempts + 1):
        try:
            fn()
            return
        except StepFailed as exc:
            if attempt == attempts:
                raise
            log(f"  retry {attempt}/{attempts - 1} of {what}: {str(exc).splitlines()[0]}")
            time.sleep(5 * attempt)


# ------------------------------------------------------------------ binfmt


def static_qemu() -> str:
    """qemu-aarch64 linked statically: the kernel starts it inside an arm64
    root, where no x86 loader exists."""
    for name in ("qemu-aarch64-static", "qemu-aarch64"):
        path = shutil.which(name)
        if path:
            with open(path, "rb") as f:
                if b"ld-linux" not in f.read(8192):
                    return path
    raise StepFailed("no static qemu-aarch64 (make arm64-sysdeps installs qemu-user-static)")


def binfmt_ready() -> str:
    """qemu-aarch64 registered for aarch64 ELF with the F flag (the kernel
    keeps the interpreter open, so no chroot needs a copy). Kept if there;
    else registered, and as the newest entry it is matched first."""
    if not (BINFMT / "register").exists():
        run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
            timeout=30,
            what="mount binfmt_misc",
        )
    if (BINFMT / "status").read_text().strip() != "enabled":
        raise StepFailed("binfmt_misc is disabled (/proc/sys/fs/binfmt_misc/status)")
    wanted_magic = ELF_MAGIC.replace(r"\x", "")
    for entry in sorted(BINFMT.iterdir()):
        if entry.name in ("register", "status"):
            continue
        with contextlib.suppress(OSError):
            text = entry.read_text()
            flags = re.search(r"^flags: *(\S*)", text, re.M)
            if (
                text.startswith("enabled")
                and f"magic {wanted_magic}" in text
                and flags
                and "F" in flags.group(1)
            ):
                return f"already registered as {entry.name} ({flags.group(1)})"
    qemu = static_qemu()
    line = f":{BINFMT_NAME}:M::{ELF_MAGIC}:{ELF_MASK}:{qemu}:F"
    try:
        (BINFMT / "register").write_text(line)
    except FileExistsError:
        pass  # a run at the same time registered it
    except OSError as exc:
        raise StepFailed(f"cannot register {qemu} with binfmt_misc: {exc}") from None
    return f"registered {qemu} as {BINFMT_NAME}"


# ------------------------------------------------------------------ root


def root_valid(root: Path) -> bool:
    stamp = root / STAMP
    if not stamp.is_file() or stamp.read_text().strip() != ROOT_KEY:
        return False
    try:
        out = run(
            [
                "chroot",
                str(root),
                "/usr/bin/python3",
                "-c",
                "import platform; print(platform.machine())",
            ],
            timeout=300,
            what="python3 in the root",
            env=chroot_env(),
        )
    except StepFailed:
        return False
    return out.strip() == "aarch64"


def build_root(root: Path, logs: Path) -> None:
    """debootstrap into ``root``.new, then rename: an interrupted build never
    leaves a root that looks valid."""
    new = root.with_name(root.name + ".new")
    root.parent.mkdir(parents=True, exist_ok=True)

    def first_stage() -> None:
        if new.exists():
            shutil.rmtree(new)
        run(
            [
                "debootstrap",
                "--foreign",
                "--arch=arm64",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(new),
                MIRROR,
            ],
            timeout=900,
            what="debootstrap (download)",
            log_to=logs / "debootstrap-1.log",
        )

    retried(3, "debootstrap download", first_stage)
    # The second stage mounts /proc and more inside the root: a private mount
    # namespace takes them away when it ends.
    run(
        ["unshare", "--mount", "chroot", str(new), "/debootstrap/debootstrap", "--second-stage"],
        timeout=1800,
        what="debootstrap --second-stage (under qemu)",
        env=chroot_env(),
        log_to=logs / "debootstrap-2.log",
    )
    (new / STAMP).write_text(ROOT_KEY + "\n")
    if root.exists():
        shutil.rmtree(root)
    new.rename(root)


def chroot_env() -> dict[str, str]:
    return {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}


class Overlay:
    """The cached root as the read-only layer under a per-run upper one."""

    def __init__(self, lower: Path, work: Path) -> None:
        self.lower = lower
        self.upper = work / "upper"
        self.work = work / "work"
        self.merged = work / "merged"
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True)

    def command(
        self, argv: Sequence[str], *, network: bool, userspec: str | None = None
    ) -> list[str]:
        """``argv`` inside the root: unshare (a private mount namespace, and
        no network unless ``network``), the overlay, /proc and /dev, then
        chroot. Every step execs, so the returned PID is the final program's."""
        m = shlex.quote(str(self.merged))
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        user = ["--userspec=" + userspec, "--groups=" + userspec.split(":")[1]] if userspec else []
        script = (
            "set -e; "
            f"mount -t overlay overlay -o {shlex.quote(opts)} {m}; "
            f"mount -t proc proc {m}/proc; "
            f"mount --rbind /dev {m}/dev; "
            f"exec chroot {' '.join(map(shlex.quote, user))} {m} "
            f"/usr/bin/env -i {' '.join(f'{k}={v}' for k, v in chroot_env().items())} "
            + " ".join(map(shlex.quote, argv))
        )
        return ["unshare", "--mount", *([] if network else ["--net"]), "sh", "-c", script]

    def path(self, inside: str) -> Path:
        """Where to put a file so the root sees it at ``inside``."""
        return self.upper / inside.lstrip("/")

    def read(self, inside: str) -> str:
        for layer in (self.upper, self.lower):
            p = layer / inside.lstrip("/")
            if p.exists():
                return p.read_text()
        raise FileNotFoundError(inside)


# ------------------------------------------------------------------ host side


def http_status(port: int, path: str) -> tuple[int, str]:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return 0, ""
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split()[1]), body.decode(errors="replace").strip()
    except (IndexError, ValueError):
        return 0, ""


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None
) -> None:
    """Poll ``predicate``; fail at once if ``proc`` exits or logs a rejection."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc and not proc.alive():
            raise StepFailed(f"{proc.name} exited with {proc.popen.returncode}:\n    {proc.tail()}")
        if proc and '"event": "auth_rejected"' in proc.log_path.read_text(errors="replace"):
            raise StepFailed(f"the broker rejected {proc.name}:\n    {proc.tail(3)}")
        if time.monotonic() > deadline:
            tail = f":\n    {proc.tail()}" if proc else ""
            raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(0.2)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _EchoOnce(socketserver.BaseRequestHandler):
    """Echo; an 8-digit length leads, and the connection closes once that
    many bytes after it are echoed too."""

    def handle(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            head = b""
            while len(head) < 8:
                chunk = self.request.recv(8 - len(head))
                if not chunk:
                    return
                head += chunk
            self.request.sendall(head)
            left = int(head)
            while left > 0 and (data := self.request.recv(min(left, 65536))):
                self.request.sendall(data)
                left -= len(data)


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = server.server_address
    assert isinstance(address, tuple)
    try:
        yield int(address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class Frontend:
    """The broker's TCP CONNECT frontend (mTLS), for curl and a raw client."""

    def __init__(self, pki: Path, port: int) -> None:
        self.pki = pki
        self.port = port

    def curl(
        self, url: str, *extra: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        curl = shutil.which("curl")
        if not curl:
            raise StepFailed("curl missing (make sysdeps installs it)")
        argv = [
            curl,
            "-sS",
            "--max-time",
            str(int(timeout)),
            "-p",
            "--proxy",
            f"https://localhost:{self.port}",
            "--proxy-cacert",
            str(self.pki / "ca.crt"),
            "--proxy-cert",
            str(self.pki / "frontend.crt"),
            "--proxy-key",
            str(self.pki / "frontend.key"),
            *extra,
            url,
        ]
        try:
            return subprocess.run(argv, capture_output=True, timeout=timeout + 10, check=False)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"curl {url}: no answer in {timeout + 10:.0f}s") from None

    def tunnel(self, target: str, timeout: float = 30) -> tuple[int, bytes, ssl.SSLSocket]:
        """A raw CONNECT: (status, error body, the socket)."""
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "frontend.crt"), str(self.pki / "frontend.key"))
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head else 0
        if status != 200:
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    rest += chunk
        return status, rest, s


def echo_through(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


# ------------------------------------------------------------------ the run


class Smoke:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.procs: list[Proc] = []
        self.passed: list[str] = []
        self.overlay: Overlay | None = None

    def step(self, name: str, fn: Callable[[], str]) -> None:
        start = time.monotonic()
        try:
            detail = fn()
        except StepFailed as exc:
            log(f"FAIL {name} ({time.monotonic() - start:.1f}s): {exc}")
            raise
        except Exception as exc:
            log(f"FAIL {name} ({time.monotonic() - start:.1f}s): {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stdout)
            raise StepFailed(name) from exc
        log(f"PASS {name} ({time.monotonic() - start:.1f}s): {detail}")
        self.passed.append(name)

    # ---- steps

    def do_root(self) -> str:
        root: Path = self.args.root
        if root_valid(root):
            return f"reused {root} ({ROOT_KEY})"
        if root.exists() or (root / STAMP).exists():
            log(f"  {root} is stale or broken: building it again")
        build_root(root, self.logs)
        if not root_valid(root):
            raise StepFailed(f"the new root {root} does not run python3 as aarch64")
        return f"built {root} with debootstrap ({ROOT_KEY})"

    def do_wheelhouse(self) -> str:
        dest = self.tmp / "wheelhouse"

        def build() -> None:
            run(
                [
                    sys.executable,
                    str(REPO / "deploy/systemd/wheelhouse.py"),
                    "--clean",
                    "--dest",
                    str(dest),
                    "--arch",
                    "aarch64",
                    "--python-version",
                    "3.11",
                ],
                timeout=600,
                what="wheelhouse.py",
                log_to=self.logs / "wheelhouse.log",
            )

        retried(3, "wheelhouse download", build)
        wheels = sorted(p.name for p in dest.glob("*.whl"))
        foreign = [w for w in wheels if "x86_64" in w]
        if foreign or not any("aarch64" in w for w in wheels):
            raise StepFailed(f"not an aarch64 wheelhouse: {wheels}")
        self.wheelhouse = dest
        return f"{len(wheels)} wheels: {', '.join(wheels)}"

    def do_install(self) -> str:
        self.overlay = ov = Overlay(self.args.root, self.tmp / "overlay")
        shutil.copytree(self.wheelhouse, ov.path(WHEELHOUSE_IN_ROOT))
        install = [f"{WHEELHOUSE_IN_ROOT}/install.sh"]
        first = run(
            ov.command(["sh", *install], network=False),
            timeout=900,
            what="install.sh (no network)",
            log_to=self.logs / "install-1.log",
        )
        if "installing tether" not in first:
            raise StepFailed(f"install.sh did not install:\n{first}")
        # The device's keys, as an operator copies them; install.sh run again
        # gives them their owner and mode and installs nothing.
        pki_in = ov.path("/etc/tether/pki")
        for name, src in (
            ("ca.crt", self.pki / "ca.crt"),
            ("agent.crt", self.pki / "agents" / f"{AGENT_ID}.crt"),
            ("agent.key", self.pki / "agents" / f"{AGENT_ID}.key"),
        ):
            shutil.copy2(src, pki_in / name)
        second = run(
            ov.command(["sh", *install], network=False),
            timeout=600,
            what="install.sh again (no network)",
            log_to=self.logs / "install-2.log",
        )
        if "packages are up to date" not in second:
            raise StepFailed(
                f"the second install.sh run did not find the packages up to date:\n{second}"
            )
        machine = run(
            ov.command(
                [
                    "/opt/tether/bin/python",
                    "-c",
                    "import platform, cryptography.hazmat.bindings._rust as r; print(platform.machine(), r.__file__)",
                ],
                network=False,
            ),
            timeout=300,
            what="the venv's python",
        ).split()
        if machine[0] != "aarch64":
            raise StepFailed(f"the venv runs as {machine}")
        passwd = ov.read("/etc/passwd")
        user = next(
            (line.split(":") for line in passwd.splitlines() if line.startswith("tether:")), None
        )
        if not user:
            raise StepFailed("install.sh made no tether user")
        self.userspec = f"{user[2]}:{user[3]}"
        key = ov.path("/etc/tether/pki/agent.key").stat()
        if key.st_mode & 0o777 != 0o640 or key.st_gid != int(user[3]):
            raise StepFailed(f"agent.key is mode {key.st_mode & 0o777:o} gid {key.st_gid}")
        return f"offline install into /opt/tether (Python on {machine[0]}), twice; user tether {self.userspec}"

    def do_pki(self) -> str:
        self.pki = self.tmp / "pki"
        run(
            [
                str(BIN / "tether"),
                "certs",
                "init",
                "--dir",
                str(self.pki),
                "--cluster",
                "smoke",
                "--agent",
                AGENT_ID,
            ],
            timeout=60,
            what="tether certs init",
        )
        return f"certificates in {self.pki}"

    def do_broker(self) -> str:
        self.agent_port, server_port, self.health_port = free_port(), free_port(), free_port()
        pki = self.pki
        argv = [
            str(BIN / "tether-broker"),
            "--mode=http-connect",
            f"--uds-name={self.tmp / 'broker.sock'}",
            "--agent-bind-address=127.0.0.1",
            f"--agent-port={self.agent_port}",
            "--server-bind-address=127.0.0.1",
            f"--server-port={server_port}",
            "--health-bind-address=127.0.0.1",
            f"--health-port={self.health_port}",
            f"--admin-port={free_port()}",
            f"--cluster-cert={pki / 'broker.crt'}",
            f"--cluster-key={pki / 'broker.key'}",
            f"--cluster-ca-cert={pki / 'ca.crt'}",
            f"--server-cert={pki / 'broker.crt'}",
            f"--server-key={pki / 'broker.key'}",
            f"--server-ca-cert={pki / 'frontend-ca.crt'}",
            "--cluster-name=smoke",
        ]
        self.broker = Proc("broker", argv, self.logs / "broker.log")
        self.procs.append(self.broker)
        wait_until(
            lambda: http_status(self.health_port, "/healthz")[0] == 200,
            60,
            "broker /healthz",
            self.broker,
        )
        self.frontend = Frontend(pki, server_port)
        return f"native tether-broker pid {self.broker.popen.pid}, agents on 127.0.0.1:{self.agent_port}"

    def configure_agent(self) -> None:
        assert self.overlay
        toml = self.overlay.read("/etc/tether/agent.toml")
        for key, value in (
            ("proxy_server_host", '"127.0.0.1"'),
            ("proxy_server_port", str(self.agent_port)),
            ("agent_id", f'"{AGENT_ID}"'),
            # No claims: the broker drops those the credential does not allow
            # (docs/operations.md, "Identifiers are claims").
            ("agent_identifiers", '""'),
        ):
            toml, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", toml, flags=re.M)
            if n != 1:
                raise StepFailed(f"agent.toml.example has {n} '{key} =' lines")
        path = self.overlay.path("/etc/tether/agent.toml")
        st = path.stat()
        path.write_text(toml)
        os.chown(path, st.st_uid, st.st_gid)

    def start_agent(self, n: int) -> Proc:
        assert self.overlay
        argv = self.overlay.command(
            [
                "/opt/tether/bin/tether-agent",
                "--config-file=/etc/tether/agent.toml",
                "--health-server-port=0",
                "--admin-server-port=0",
                "--sync-interval=0.5",
                "--sync-interval-cap=2",
                "--drain-timeout=20",
            ],
            network=True,
            userspec=self.userspec,
        )
        agent = Proc(f"agent (arm64, run {n})", argv, self.logs / f"agent-{n}.log")
        self.procs.append(agent)
        wait_until(self.agent_registered, 180, "the arm64 agent at the broker's /readyz", agent)
        return agent

    def agent_registered(self) -> bool:
        code, body = http_status(self.health_port, "/readyz")
        return code == 200 and body.startswith("ready: 1 ")

    def do_agent(self) -> str:
        self.configure_agent()
        self.agent = self.start_agent(1)
        return f"installed agent pid {self.agent.popen.pid} under qemu, as user tether, connected"

    def do_get(self, servers: dict[str, int]) -> str:
        blob = self.tmp / "www" / "blob.bin"
        want = hashlib.sha256(blob.read_bytes()).hexdigest()
        out = self.tmp / "got.bin"
        if out.exists():
            out.unlink()
        r = self.frontend.curl(
            f"http://127.0.0.1:{servers['http']}/blob.bin",
            "-o",
            str(out),
            "-w",
            "%{http_connect} %{http_code}",
        )
        codes = r.stdout.decode(errors="replace").split()
        if r.returncode != 0 or codes != ["200", "200"]:
            raise StepFailed(
                f"curl exit {r.returncode}, codes {codes}: {r.stderr.decode(errors='replace').strip()}"
            )
        got = hashlib.sha256(out.read_bytes()).hexdigest()
        if got != want:
            raise StepFailed(f"sha256 {got} != {want}")
        return f"curl GET of {blob.stat().st_size} bytes, sha256 {want[:16]}… matches"

    def do_echo(self, servers: dict[str, int]) -> str:
        # curl's telnet:// carries raw bytes through the tunnel (hex text: no
        # 0xff, which telnet escapes). It ends when the target closes, so
        # the target reads a length first and closes after echoing that much.
        payload = os.urandom(64_000).hex().encode()
        sent = b"%08d" % len(payload) + payload
        src = self.tmp / "echo-in.txt"
        src.write_bytes(sent)
        r = self.frontend.curl(
            f"telnet://127.0.0.1:{servers['echo_once']}", "-T", str(src), timeout=60
        )
        if r.returncode != 0 or r.stdout != sent:
            raise StepFailed(
                f"curl exit {r.returncode}, {len(r.stdout)} of {len(sent)} bytes back "
                f"({'equal' if r.stdout == sent else 'different'}): {r.stderr.decode(errors='replace').strip()}"
            )
        return f"curl telnet:// through the tunnel: {len(sent)} bytes in, the same {len(sent)} out"

    def do_refused(self) -> str:
        port = free_port()  # bound and closed again: nothing listens there
        r = self.frontend.curl(
            f"http://127.0.0.1:{port}/", "-o", "/dev/null", "-w", "%{http_connect}"
        )
        connect = r.stdout.decode(errors="replace").strip()
        if connect != "502" or r.returncode == 0:
            raise StepFailed(f"curl exit {r.returncode}, CONNECT status {connect!r}, expected 502")
        status, body, sock = self.frontend.tunnel(f"127.0.0.1:{port}")
        sock.close()
        reason = body.decode(errors="replace").strip()
        if status != 502 or "dial failed (refused)" not in reason:
            raise StepFailed(f"raw CONNECT got {status} {reason!r}")
        return f"curl: CONNECT 502; reason {reason!r}"

    def do_drain(self, servers: dict[str, int]) -> str:
        status, body, sock = self.frontend.tunnel(f"127.0.0.1:{servers['echo']}")
        with sock:
            if status != 200:
                raise StepFailed(f"CONNECT to the echo target: {status} {body!r}")
            if echo_through(sock, b"before") != b"before":
                raise StepFailed("no echo before SIGTERM")
            self.agent.popen.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            if not self.agent.alive():
                raise StepFailed(
                    f"the agent exited at once ({self.agent.popen.returncode}) with a tunnel open"
                )
            payload = os.urandom(20_000)
            if echo_through(sock, payload) != payload:
                raise StepFailed("the open tunnel stopped echoing while the agent drains")
        try:
            rc = self.agent.popen.wait(60)
        except subprocess.TimeoutExpired:
            raise StepFailed("the agent did not exit within 60s of SIGTERM") from None
        if rc != 0:
            raise StepFailed(f"the agent exited {rc} after SIGTERM:\n    {self.agent.tail()}")
        wait_until(lambda: not self.agent_registered(), 30, "the broker to drop the agent")
        return "SIGTERM with a tunnel open: it kept echoing, then the agent exited 0"

    def do_restart(self, servers: dict[str, int]) -> str:
        self.agent = self.start_agent(2)
        detail = self.do_get(servers)
        return f"reconnected; {detail}"

    def main(self) -> None:
        self.step("binfmt", binfmt_ready)
        self.step("root", self.do_root)
        self.step("wheelhouse", self.do_wheelhouse)
        self.step("pki", self.do_pki)
        self.step("install", self.do_install)
        www = self.tmp / "www"
        www.mkdir()
        (www / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a: object, **kw: object) -> None:
                super().__init__(*a, directory=str(www), **kw)  # type: ignore[arg-type]

            def log_message(self, format: str, *args: object) -> None:
                pass

        with (
            serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)) as http_port,
            serving(_Server(("127.0.0.1", 0), _Echo)) as echo_port,
            serving(_Server(("127.0.0.1", 0), _EchoOnce)) as echo_once_port,
        ):
            servers = {"http": http_port, "echo": echo_port, "echo_once": echo_once_port}
            self.step("broker", self.do_broker)
            self.step("agent", self.do_agent)
            self.step("get", lambda: self.do_get(servers))
            self.step("echo", lambda: self.do_echo(servers))
            self.step("refused", self.do_refused)
            self.step("drain", lambda: self.do_drain(servers))
            self.step("restart", lambda: self.do_restart(servers))

    def cleanup(self, failed: bool) -> None:
        """Every process this run started, by its PID (the mounts go with them);
        after a failure, the end of each one's log."""
        for proc in reversed(self.procs):
            proc.stop()
            if failed:
                log(f"--- last lines of {proc.name} ({proc.log_path}):\n    {proc.tail(20)}")


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--root",
        type=Path,
        default=Path("/var/cache/tether/arm64-root"),
        help="the cached Debian arm64 root (built when absent or stale)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, overlay)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        log("FAIL arm64-smoke: needs root (debootstrap, binfmt_misc, chroot, unshare)")
        return 1
    # SIGTERM (a CI time-out) unwinds like Ctrl-C, so the cleanup runs.
    signal.signal(signal.SIGTERM, _interrupt)
    # chroot, debootstrap and mount live in sbin, which a CI PATH may lack.
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    args.root = args.root.resolve()
    args.root.parent.mkdir(parents=True, exist_ok=True)
    lock = open(args.root.with_name(args.root.name + ".lock"), "w")  # noqa: SIM115 - held to the end
    deadline = time.monotonic() + 1800
    while True:
        try:
            # One run at a time uses or builds this root.
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                log(f"FAIL arm64-smoke: {lock.name} stayed locked by another run for 30 minutes")
                return 1
            time.sleep(2)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tether-arm64-smoke-"))
    smoke = Smoke(args, tmp)
    ok = False
    try:
        smoke.main()
        ok = True
    except StepFailed:
        pass
    except KeyboardInterrupt:
        log("FAIL arm64-smoke: interrupted")
    finally:
        smoke.cleanup(failed=not ok)
        if args.keep:
            log(f"kept: {tmp}")
        elif ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            for item in tmp.iterdir():
                if item.is_dir() and item.name != "logs":
                    shutil.rmtree(item, ignore_errors=True)
                elif item.is_file():
                    item.unlink()
            log(f"logs: {tmp / 'logs'}")
    took = time.monotonic() - started
    if ok:
        log(f"arm64-smoke: all {len(smoke.passed)} steps passed in {took:.0f}s")
        return 0
    log(f"arm64-smoke: FAILED after {len(smoke.passed)} passed steps, {took:.0f}s")
    return 1


if __name__ == "__main__":
    sys.exit(main())
