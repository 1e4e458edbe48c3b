"""konnectivity's command lines, taken as they are.

An operator migrating from konnectivity changes the binary name and keeps
the arguments of the static pod and the DaemonSet. Every flag of
proxy-server and proxy-agent (v0.34, plus klog's common flags) is accepted
here with konnectivity's meaning:

- flags whose meaning exists here under the same name pass through
  untouched (``--agent-port``, ``--keepalive-time``, ...) and are not listed;
- flags whose meaning exists under another name are renamed
  (``--graceful-shutdown-timeout`` is ``--drain-timeout``);
- klog's flags map to our logging (``--v=4`` is ``--log-level=debug``;
  ``--logtostderr=false --log-file=F`` writes F only, ``--alsologtostderr``
  both);
- flags with no meaning here (profiling, channel sizes) are accepted and
  dropped with a one-line WARNING that says why.

This runs on ``argv`` before argparse, so argparse sees only our flags. Go's
flag syntax is honoured: ``--flag=value`` and ``--flag value`` for valued
flags, ``--flag``, ``--flag=true`` and ``--flag=false`` for booleans, and one
or two leading dashes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import attrs


class Kind(enum.Enum):
    #: Accepted and dropped: konnectivity's meaning is what we always do.
    SAME = "same"
    #: Accepted and dropped with a WARNING: no meaning here.
    IGNORED = "ignored"
    #: Renamed to our flag (``target``), value unchanged.
    RENAMED = "renamed"
    #: klog's verbosity: mapped to --log-level.
    VERBOSITY = "verbosity"
    #: klog's --logtostderr: false with --log-file means the file only.
    TO_STDERR = "to_stderr"
    #: klog's --alsologtostderr: stderr as well as --log-file.
    ALSO_STDERR = "also_stderr"
    #: Go's TLS version names (VersionTLS12): mapped to our --agent-tls-min-version.
    TLS_VERSION = "tls_version"


@attrs.frozen
class Flag:
    name: str
    #: False for Go boolean flags (no separate value argument).
    takes_value: bool
    kind: Kind
    target: str = ""
    note: str = ""


def _ignored(name: str, takes_value: bool, note: str) -> Flag:
    return Flag(name, takes_value, Kind.IGNORED, note=note)


def _same(name: str, takes_value: bool, note: str) -> Flag:
    return Flag(name, takes_value, Kind.SAME, note=note)


_PROFILING = "pprof is not served; profile with py-spy against the process instead"
_CHANNELS = (
    "there are no transfer channels here: each tunnel has its own HTTP/2 flow-control window"
)

#: klog's flags, on both commands.
KLOG: tuple[Flag, ...] = (
    Flag("v", True, Kind.VERBOSITY),
    # --log-file and --log-file-max-size are ours by the same name and meaning.
    Flag("logtostderr", False, Kind.TO_STDERR),
    Flag("alsologtostderr", False, Kind.ALSO_STDERR),
    _ignored("log-dir", True, "lines go to stderr and --log-file; there are no per-level files"),
    _ignored("stderrthreshold", True, "every line goes to stderr; filter with --log-level"),
    _same("one-output", False, "each line is written once"),
    _ignored("skip-headers", False, "the line format is --log-format's"),
    _ignored("skip-log-headers", False, "the line format is --log-format's"),
    _ignored("add-dir-header", False, "the line format is --log-format's"),
    _ignored("vmodule", True, "verbosity is per process (--log-level)"),
    _ignored("log-backtrace-at", True, "not supported"),
    _ignored("log-flush-frequency", True, "lines are written unbuffered"),
)

#: proxy-server flags that are not ours by the same name and meaning.
SERVER: tuple[Flag, ...] = (
    *KLOG,
    Flag("graceful-shutdown-timeout", True, Kind.RENAMED, target="drain-timeout"),
    _same(
        "delete-existing-uds-file",
        False,
        "a stale socket is always replaced, and a live one never (another process holds it)",
    ),
    _ignored("enable-profiling", False, _PROFILING),
    _ignored("enable-contention-profiling", False, _PROFILING),
    _ignored(
        "frontend-keepalive-time",
        True,
        "the frontend is a local socket; kube-apiserver's connections end with it",
    ),
    _ignored("xfr-channel-size", True, _CHANNELS),
    _ignored("frontend-write-channel-size", True, _CHANNELS),
    _same("warn-on-channel-limit", False, _CHANNELS),
    Flag("tls-min-version", True, Kind.TLS_VERSION, target="agent-tls-min-version"),
    _ignored(
        "cipher-suites",
        True,
        "TLS 1.2 offers ECDHE with AES-GCM or ChaCha20-Poly1305 only; TLS 1.3 suites are fixed",
    ),
    _ignored("kubeconfig-qps", True, "TokenReview calls are rate-limited per source address"),
    _ignored("kubeconfig-burst", True, "TokenReview calls are rate-limited per source address"),
    _ignored("kube-api-content-type", True, "the apiserver is spoken to in JSON"),
    _ignored("feature-gates", True, "there are no feature gates"),
)

#: proxy-agent flags that are not ours by the same name and meaning.
AGENT: tuple[Flag, ...] = (
    *KLOG,
    Flag("health-server-host", True, Kind.RENAMED, target="health-server-bind-address"),
    _ignored(
        "probe-interval",
        True,
        "readiness follows the connection itself (keepalive PINGs, --keepalive-time)",
    ),
    _same("sync-forever", False, "the agent always keeps syncing to --server-count brokers"),
    _ignored("enable-profiling", False, _PROFILING),
    _ignored("enable-contention-profiling", False, _PROFILING),
    _ignored("xfr-channel-size", True, _CHANNELS),
    _same("warn-on-channel-limit", False, _CHANNELS),
    _ignored(
        "enable-push-service-account-token",
        False,
        "the agent never hands its token to frontend clients",
    ),
    _ignored("alpn-proto", True, "the agent offers ALPN h2, which the broker requires"),
    _ignored("apiserver-port-mapping", True, "node-to-control-plane traffic is not tunnelled here"),
    _ignored("bind-address", True, "node-to-control-plane traffic is not tunnelled here"),
    _ignored("feature-gates", True, "there are no feature gates"),
)

_TRUE = {"true", "t", "1"}
_FALSE = {"false", "f", "0"}


@attrs.frozen
class Translation:
    argv: list[str]
    #: One line each, for a WARNING once logging is set up.
    warnings: list[str]


class CompatError(ValueError):
    """A konnectivity flag with an unusable value (``--v=loud``)."""


def translate(argv: Sequence[str], flags: Sequence[Flag]) -> Translation:
    """Rewrite konnectivity's flags in ``argv`` into ours (see the module doc)."""
    table: Mapping[str, Flag] = {f.name: f for f in flags}
    out: list[str] = []
    front: list[str] = []
    warnings: list[str] = []
    seen: set[str] = set()
    stderr: dict[Kind, bool] = {}
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out += args[i - 1 :]
            break
        if not arg.startswith("-") or arg == "-":
            out.append(arg)
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        flag = table.get(name)
        if flag is None:
            # Go takes -flag as --flag; argparse only takes one-letter short flags.
            single = not arg.startswith("--") and len(name) > 1
            out.append("-" + arg if single else arg)
            continue
        if flag.takes_value:
            if not eq:
                if i >= len(args):
                    raise CompatError(f"flag needs an argument: --{name}")
                value = args[i]
                i += 1
        elif eq and value.lower() not in _TRUE | _FALSE:
            raise CompatError(f"invalid boolean value {value!r} for --{name}")
        spelled = f"--{name}" + (f"={value}" if flag.takes_value or eq else "")
        if flag.kind is Kind.RENAMED:
            out.append(f"--{flag.target}={value}")
        elif flag.kind is Kind.TLS_VERSION:
            version = {"VersionTLS12": "1.2", "VersionTLS13": "1.3"}.get(value)
            if version is None and value in ("VersionTLS10", "VersionTLS11"):
                version = "1.2"
                warnings.append(f"{spelled}: TLS below 1.2 is never offered; using 1.2")
            if version is None:
                raise CompatError(
                    f"invalid value {value!r} for --{name}: want VersionTLS12 or VersionTLS13"
                )
            out.append(f"--{flag.target}={version}")
        elif flag.kind is Kind.VERBOSITY:
            try:
                level = int(value)
            except ValueError:
                raise CompatError(f"invalid value {value!r} for --{name}: want a number") from None
            # klog's V(2) and above are debugging detail in konnectivity
            front = [f"--log-level={'debug' if level >= 2 else 'info'}"]
        elif flag.kind in (Kind.TO_STDERR, Kind.ALSO_STDERR):
            stderr[flag.kind] = value.lower() in _TRUE if eq else True
        elif flag.kind is Kind.IGNORED and name not in seen:
            warnings.append(
                f"{spelled}: accepted for konnectivity compatibility, ignored: {flag.note}"
            )
        seen.add(name)
    if stderr.get(Kind.TO_STDERR) is False and not stderr.get(Kind.ALSO_STDERR):
        if any(a == "--log-file" or a.startswith("--log-file=") for a in out):
            front.append("--no-log-stderr")
        else:
            warnings.append(
                "--logtostderr=false without --log-file: lines still go to stderr "
                "(klog would write per-level files under --log-dir)"
            )
    return Translation(front + out, warnings)
