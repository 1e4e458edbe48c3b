"""Layered settings for both commands: flags > ``TETHER_*`` environment >
TOML file > defaults.

Each command describes its settings once, as an argparse parser over an
attrs config class (``broker/config.py``, ``edge_agent/config.py``). This
module derives the other two sources from that one description, so a key in
a file, an environment variable and a flag are always the same setting,
converted and range-checked by the same function:

- file key: the flag name with underscores (``keepalive_time = 20``), at the
  top level or in one table (the broker's ``[broker]``);
- environment: the prefix plus the key in capitals
  (``TETHER_AGENT_KEEPALIVE_TIME=20``);
- flag: ``--keepalive-time=20``.

Errors name the key and where it came from (``agent.toml: keepalive_time:
must be a number``), because a daemon that refuses to start must say which
line to fix. ``--print-config`` renders the merged result as TOML that is
itself a valid config file, with a comment on every value that is not a
default telling where it came from.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs

from protocol import budget
from tether import compat

#: Go's time.ParseDuration units, in seconds (konnectivity's flags are Go durations).
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def duration(text: str) -> float:
    """Seconds from a plain number (``20``, ``0.5``) or a Go duration
    (``1h``, ``5s``, ``500ms``, ``1m30s``), as konnectivity's flags take them.
    Raises ValueError naming the accepted forms."""
    word = text.strip()
    try:
        value = float(word)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
        raise ValueError(f"not a finite duration: {text!r}")
    sign = 1.0
    if word[:1] in "+-" and word:
        sign, word = (-1.0 if word[0] == "-" else 1.0), word[1:]
    total, pos = 0.0, 0
    while pos < len(word):
        match = _DURATION_PART.match(word, pos)
        if match is None:
            break
        total += float(match[1]) * _DURATION_UNITS[match[2]]
        pos = match.end()
    if not word or pos != len(word):
        raise ValueError(
            f"invalid duration {text!r} (seconds, or Go syntax such as 1h, 5s, 500ms, 1m30s)"
        )
    return sign * total


def positive(text: str) -> float:
    """argparse type: a duration above zero (seconds or Go syntax)."""
    try:
        value = duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative(text: str) -> float:
    """argparse type: a duration of zero or more (seconds or Go syntax)."""
    try:
        value = duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _port_from(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not lowest <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range ({lowest}-65535): {text}")
    return value


def port(text: str) -> int:
    """argparse type: a port to listen on, 0-65535 (0: off, or any free port
    where the flag says so)."""
    return _port_from(text, 0)


def remote_port(text: str) -> int:
    """argparse type: a port to connect to, 1-65535."""
    return _port_from(text, 1)


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` that shows a default only where there is one to show: not
    for empty strings, None, False or empty lists, and not twice when the
    help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text.lower()
            or default is None
            or default is argparse.SUPPRESS
            or default is False
            or default == ""
            or default == ()
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Both commands' parser: flags are never abbreviated (``--probe-interval``
    must not silently mean ``--probe-interval-cap``), and a usage error is the
    one line that says what is wrong, plus where to look, not the whole
    usage banner."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee {self.prog} --help\n")


def buffer_bytes(text: str) -> int:
    """argparse type: a buffer budget in bytes, room for one stream at least."""
    value = int(text)
    least = budget.stream_cost(budget.MIN_WINDOW)
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least} bytes, got {text}")
    return value


def add_tunnel_arguments(group: Any, d: Any, peer: str) -> None:
    """Flags for the agent-broker connection, the same on both ends.
    ``d`` holds the defaults; ``peer`` names the connection in help texts."""
    group.add_argument(
        "--keepalive-time",
        type=positive,
        default=d.keepalive_time,
        help=f"seconds of silence before a PING on the {peer} (also TCP keepalive)",
    )
    group.add_argument(
        "--keepalive-timeout",
        type=positive,
        default=d.keepalive_timeout,
        help=f"seconds to wait for a PING ACK before dropping the {peer} "
        "(with --keepalive-time, also TCP_USER_TIMEOUT)",
    )
    group.add_argument(
        "--tcp-congestion",
        default=d.tcp_congestion,
        help=f"TCP congestion control for the {peer} (e.g. bbr, cubic); "
        "empty keeps the system default",
    )
    group.add_argument(
        "--tcp-notsent-lowat",
        type=int,
        default=d.tcp_notsent_lowat,
        help=f"TCP_NOTSENT_LOWAT (bytes) on the {peer}: keeps unsent bulk data out of the "
        "kernel queue, where interactive bytes could not overtake it; 0 = automatic "
        "(about 10 ms of the measured link), -1 = off",
    )
    group.add_argument(
        "--stream-window",
        type=int,
        default=d.stream_window,
        help="HTTP/2 window per tunneled connection (bytes)",
    )
    group.add_argument(
        "--connection-window",
        type=int,
        default=d.connection_window,
        help=f"HTTP/2 window of the whole {peer} (bytes)",
    )
    group.add_argument(
        "--max-buffered-bytes",
        type=buffer_bytes,
        default=d.max_buffered_bytes,
        help="budget for buffered tunnel data in this process (bytes), shared by every "
        "tunnel: each reserves its window and outbox; past half of it new tunnels get "
        f"{budget.MIN_WINDOW // 1024} KiB windows, past all of it new dials are refused "
        "(503 busy)",
    )


def add_common_arguments(
    group: Any, d: Any, *, table: str | None = None, default_file: str | None = None
) -> None:
    """Logging, certificate reload and config-file flags of both commands."""
    where = f"whose [{table}] table sets" if table else "setting"
    default = f"; default {default_file} if it exists, '' for none" if default_file else ""
    group.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=d.log_format,
        help="text lines (control characters escaped) or one JSON object per line",
    )
    group.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=d.log_level,
        help="lowest level written",
    )
    group.add_argument(
        "--log-file",
        default=d.log_file,
        help="also write every line to this file (appended; created 0640); at "
        "--log-file-max-size it is renamed to FILE.1 and a new one started; '' for none",
    )
    group.add_argument(
        "--log-file-max-size",
        type=non_negative_int,
        default=d.log_file_max_size,
        help="megabytes (MiB) --log-file may grow to before it is rotated; 0: unlimited",
    )
    group.add_argument(
        "--log-stderr",
        action=argparse.BooleanOptionalAction,
        default=d.log_stderr,
        help="write lines to stderr; --no-log-stderr needs --log-file",
    )
    group.add_argument(
        "--cert-reload-interval",
        type=non_negative,
        default=d.cert_reload_interval,
        help="seconds between checks of the certificate, key and CA files; changed files "
        "are used from the next connection on (SIGHUP reloads at once); 0: SIGHUP only",
    )
    group.add_argument(
        "--config-file",
        default=d.config_file,
        help=f"TOML file {where} any of these flags (key: the flag name with underscores)"
        f"{default}; precedence: flags > TETHER_* environment > file > defaults",
    )
    group.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML and exit",
    )


class SettingsError(Exception):
    """A file, environment or flag value is unusable; the message names the key."""


#: Keys every command has that are not settings themselves.
CONTROL_KEYS = frozenset({"help", "config_file", "print_config"})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_WANT = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@attrs.frozen
class Spec:
    """How one command's settings are layered."""

    #: The attrs class holding the settings; its field types decide which
    #: TOML types a key accepts.
    config_class: type
    #: ``TETHER_AGENT_``: environment variables are this plus the key in capitals.
    env_prefix: str
    #: Settings live in this table of the file (``[broker]``); None: top level.
    table: str | None = None
    #: Read when neither ``--config-file`` nor its variable names a file, if it exists.
    default_file: str = ""
    #: Comma-separated list settings: a TOML array of strings is accepted too.
    list_keys: frozenset[str] = frozenset()
    #: Extra checks of a file or environment value (raise ValueError), so an
    #: error names the key there rather than a flag the user never typed.
    checks: Mapping[str, Callable[[Any], object]] = attrs.field(factory=dict)
    #: konnectivity's flags of this command (tether.compat), rewritten before parsing.
    compat: Sequence[compat.Flag] = ()


@attrs.frozen
class Resolved:
    """The merged settings, before the command turns them into its config class."""

    values: dict[str, Any]
    #: Per key: ``default``, ``file``, ``env NAME`` or ``flag --name``.
    sources: dict[str, str]
    config_file: str
    print_config: bool
    #: ``TETHER_*`` variables with our prefix that name no setting: ignored,
    #: because Kubernetes injects look-alikes (service links), but shown by
    #: ``--print-config`` to expose typos.
    ignored_env: tuple[str, ...]
    #: konnectivity flags accepted without a meaning here, one line each.
    compat_warnings: tuple[str, ...] = ()


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit 2 with ``prog: error: message``, like argparse, without the usage
    banner: the message already says what to fix."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def resolve(
    parser: argparse.ArgumentParser,
    build_parser: Callable[[], argparse.ArgumentParser],
    argv: Sequence[str] | None,
    spec: Spec,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Parse ``argv`` with ``parser`` and layer environment and file under it.

    ``build_parser`` makes a second copy of the parser, used to learn which
    flags were typed (argparse cannot tell a default from an explicit value).
    Flag syntax errors and ``--help`` behave exactly as before; a bad file or
    environment value exits 2 naming the key.
    """
    env = os.environ if environ is None else environ
    try:
        translated = compat.translate(sys.argv[1:] if argv is None else argv, spec.compat)
    except compat.CompatError as exc:
        fail(parser, str(exc))
    argv = translated.argv
    ns = parser.parse_args(argv)
    typed = _typed_flags(build_parser(), argv)
    actions = {a.dest: a for a in parser._actions if a.dest not in CONTROL_KEYS}
    kinds = _kinds(spec.config_class)
    values: dict[str, Any] = {dest: getattr(ns, dest) for dest in actions}
    sources = dict.fromkeys(actions, "default")
    try:
        path = _config_path(ns, typed, spec, env)
        if path:
            for key, value in _read_file(path, spec, actions, kinds).items():
                values[key], sources[key] = value, "file"
        ignored = []
        for name in sorted(env):
            if not name.startswith(spec.env_prefix):
                continue
            key = name[len(spec.env_prefix) :].lower()
            if key == "config_file":
                continue
            if key not in actions:
                ignored.append(name)
                continue
            values[key] = _convert(env[name], key, actions[key], kinds, spec, name)
            sources[key] = f"env {name}"
    except SettingsError as exc:
        fail(parser, str(exc))
    for key in typed & set(actions):
        values[key] = getattr(ns, key)
        sources[key] = f"flag {actions[key].option_strings[-1]}"
    return Resolved(
        values,
        sources,
        path,
        bool(getattr(ns, "print_config", False)),
        tuple(ignored),
        tuple(translated.warnings),
    )


def where(resolved: Resolved, key: str) -> str:
    """How to name ``key`` in a message: the flag, variable or file key that set it."""
    source = resolved.sources.get(key, "default")
    if source.startswith(("flag ", "env ")):
        return source.split(" ", 1)[1]
    if source == "file":
        return f"{resolved.config_file}: {key}"
    return key


def print_config(
    parser: argparse.ArgumentParser,
    resolved: Resolved,
    spec: Spec,
    problems: Sequence[str] = (),
) -> NoReturn:
    """``--print-config``: the effective settings as TOML on stdout, exit 0.

    With problems (settings that parse but do not fit together) they go to
    stderr and the exit status is 2, so the option doubles as a config check.
    Only settings are printed; none of them holds a secret, only paths to
    files that do (token contents are never read here).
    """
    sys.stdout.write(render_toml(resolved, spec, parser.prog))
    sys.stdout.flush()
    if problems:
        fail(parser, "; ".join(problems))
    parser.exit(0)


def render_toml(resolved: Resolved, spec: Spec, prog: str) -> str:
    lines = [
        f"# {prog}: effective configuration",
        f"# precedence: flags > {spec.env_prefix}* environment > config file > defaults",
        f"# config file: {resolved.config_file or '(none)'}",
    ]
    if resolved.ignored_env:
        lines.append(f"# ignored (no such setting): {', '.join(resolved.ignored_env)}")
    if spec.table:
        lines.append(f"[{spec.table}]")
    for key, value in resolved.values.items():
        line = f"{key} = {toml_value(value)}"
        source = resolved.sources.get(key, "default")
        if source != "default":
            line += f"  # {source}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def toml_value(value: object) -> str:
    """One TOML value; enough for settings (scalars and lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# ---------------------------------------------------------------- internals


def _typed_flags(probe: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Dests given on the command line: parse again with every default suppressed."""
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def _kinds(config_class: type) -> dict[str, type]:
    """TOML type per key, from the attrs field annotations (strings under
    ``from __future__ import annotations``); tuples are comma lists."""
    kinds: dict[str, type] = {}
    for field in attrs.fields(config_class):
        name = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        if name.startswith("tuple"):
            kinds[field.name] = list
        else:
            kinds[field.name] = {"int": int, "float": float, "bool": bool}.get(name, str)
    return kinds


def _config_path(
    ns: argparse.Namespace, typed: set[str], spec: Spec, env: Mapping[str, str]
) -> str:
    var = f"{spec.env_prefix}CONFIG_FILE"
    if "config_file" in typed:
        return str(ns.config_file)
    if var in env:
        return env[var]
    if spec.default_file and os.path.exists(spec.default_file):
        return spec.default_file
    return ""


def _read_file(
    path: str,
    spec: Spec,
    actions: Mapping[str, argparse.Action],
    kinds: Mapping[str, type],
) -> dict[str, Any]:
    import tomllib  # only with a config file: 0.4 MB an agent without one does not carry

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: {exc}") from None
    prefix = ""
    if spec.table is not None:
        unknown = sorted(set(data) - {spec.table})
        if unknown:
            raise SettingsError(
                f"{path}: unknown top-level key(s) {', '.join(unknown)}; "
                f"settings go in a [{spec.table}] table"
            )
        table = data.get(spec.table, {})
        if not isinstance(table, dict):
            raise SettingsError(f"{path}: {spec.table}: must be a table")
        data, prefix = table, f"{spec.table}."
    out: dict[str, Any] = {}
    for key, raw in data.items():
        name = f"{path}: {prefix}{key}"
        if key not in actions:
            import difflib

            hint = difflib.get_close_matches(key, list(actions), n=1)
            also = f" (did you mean {hint[0]}?)" if hint else ""
            raise SettingsError(f"{name}: unknown key{also}")
        kind = kinds.get(key, str)
        out[key] = _convert(
            _from_toml(raw, key, kind, spec, name), key, actions[key], kinds, spec, name
        )
    return out


def _from_toml(raw: object, key: str, kind: type, spec: Spec, name: str) -> str | bool:
    """Check a TOML value's type; return the text a flag would have carried."""
    if kind is bool:
        if not isinstance(raw, bool):
            raise SettingsError(f"{name}: must be true or false")
        return raw
    if kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise SettingsError(f"{name}: must be an integer")
        return str(raw)
    if kind is float:
        if isinstance(raw, str):  # a duration such as "1h"; the flag's type parses it
            return raw
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise SettingsError(f"{name}: must be a number")
        return repr(float(raw))
    if kind is list or key in spec.list_keys:
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return ",".join(raw)
        if not isinstance(raw, str):
            raise SettingsError(f"{name}: must be a string or an array of strings")
        return raw
    if not isinstance(raw, str):
        raise SettingsError(f"{name}: must be a string")
    return raw


def _convert(
    text: str | bool,
    key: str,
    action: argparse.Action,
    kinds: Mapping[str, type],
    spec: Spec,
    name: str,
) -> Any:
    """Run a file or environment value through the flag's own type function."""
    kind = kinds.get(key, str)
    if kind is bool:
        if isinstance(text, bool):
            return text
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            raise SettingsError(f"{name}: must be true or false, got {text!r}")
        return word in _TRUE
    assert isinstance(text, str)
    convert: Callable[[str], Any] = (
        action.type if callable(action.type) else kind if kind in (int, float) else str
    )
    try:
        value = convert(text)
    except argparse.ArgumentTypeError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    except (TypeError, ValueError):
        want = _WANT.get(kind, "a string")
        raise SettingsError(f"{name}: must be {want}, got {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise SettingsError(f"{name}: must be one of {choices}, got {text!r}")
    check = spec.checks.get(key)
    if check is not None:
        try:
            check(value)
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}") from None
    return value
