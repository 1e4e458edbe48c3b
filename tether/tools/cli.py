"""The ``tether`` command: operator tooling that is neither the broker nor the agent.

Subcommands import their implementation lazily so that ``tether demo`` does not pay for
loading ``cryptography`` and a broken optional dependency only breaks the command using it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

_PROG = "tether"
_DEMO_HELP = "run broker, agent and a target locally and push traffic through them"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Tether reverse tunnel: operator tools."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    certs = commands.add_parser("certs", help="manage the TLS certificates of a cluster")
    certs_commands = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = certs_commands.add_parser(
        "init",
        help="create a CA and the broker, frontend and agent certificates",
        description=(
            "Create or complete a cluster's PKI in DIR. An existing CA is reused, so the command "
            "can be run again to add agents; --force replaces the CA and reissues everything."
        ),
    )
    init.add_argument("--dir", required=True, type=Path, help="directory to write into")
    init.add_argument(
        "--cluster",
        help="cluster name written into client certificates "
        "(default: the existing CA's cluster, else 'default')",
    )
    init.add_argument(
        "--agent",
        action="append",
        dest="agents",
        metavar="ID",
        help="issue a certificate for this agent id (repeatable; default: agent-1)",
    )
    init.add_argument(
        "--san",
        action="append",
        dest="sans",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP address for the broker certificate (repeatable)",
    )
    init.add_argument(
        "--days", type=_positive_int, default=365, help="leaf validity in days (default: 365)"
    )
    init.add_argument("--force", action="store_true", help="replace the CA and every leaf")
    add_fca = certs_commands.add_parser(
        "add-frontend-ca",
        help="give an existing PKI its own frontend CA and reissue frontend.crt from it",
        description=(
            "Migrate a PKI made before the frontend CA existed: write frontend-ca.crt/.key in "
            "DIR and reissue frontend.crt/.key from it. ca.crt, the broker and every agent "
            "certificate stay untouched; point the broker's --server-ca-cert at frontend-ca.crt."
        ),
    )
    add_fca.add_argument("dir", type=Path, metavar="DIR", help="the PKI directory")
    add_fca.add_argument(
        "--days", type=_positive_int, default=365, help="leaf validity in days (default: 365)"
    )

    # Only listed for --help: main() hands everything after "demo" to tether.tools.demo untouched,
    # since argparse would otherwise try to interpret the demo's own options.
    commands.add_parser("demo", help=_DEMO_HELP, add_help=False)
    commands.add_parser(
        "connect",
        help="forward a local TCP port through the broker's Unix-socket frontend "
        "(see tether connect --help)",
        add_help=False,
    )
    return parser


def _certs_init(args: argparse.Namespace) -> int:
    from tether.tools import certs

    directory: Path = args.dir
    written: list[Path] = []
    try:
        paths = certs.init_pki(
            directory,
            cluster=args.cluster,
            agents=args.agents or [certs.DEFAULT_AGENT],
            extra_sans=args.sans,
            days=args.days,
            force=args.force,
            report=written.append,
        )
    except certs.CertError as exc:
        print(f"{_PROG} certs init: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{_PROG} certs init: error: {exc}", file=sys.stderr)
        return 1

    if paths.ca_cert not in written:
        print(f"using existing CA {paths.ca_cert}")
    if not written:
        print(f"nothing to do: every requested file in {directory} is present and valid")
    else:
        print(f"wrote {len(written)} files in {directory}:")
        for path in written:
            print(f"  {path.relative_to(directory)}")
    return 0


def _run_connect(rest: list[str]) -> int:
    connect = importlib.import_module("tether.tools.connect")
    code = connect.main(rest)
    return code if isinstance(code, int) else 0


def _certs_add_frontend_ca(args: argparse.Namespace) -> int:
    from tether.tools import certs

    directory: Path = args.dir
    written: list[Path] = []
    try:
        paths = certs.add_frontend_ca(directory, days=args.days, report=written.append)
    except certs.CertError as exc:
        print(f"{_PROG} certs add-frontend-ca: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{_PROG} certs add-frontend-ca: error: {exc}", file=sys.stderr)
        return 1
    if not written:
        print(f"nothing to do: {paths.frontend_cert} is already issued by {paths.frontend_ca_cert}")
    else:
        print(f"wrote {len(written)} files in {directory}:")
        for path in written:
            print(f"  {path.relative_to(directory)}")
        print(f"now start the broker with --server-ca-cert={paths.frontend_ca_cert}")
    return 0


def _run_demo(rest: list[str]) -> int:
    # import_module rather than a static import: the demo is optional tooling and must not be
    # loaded (nor type-checked as a hard dependency) by the other subcommands.
    demo = importlib.import_module("tether.tools.demo")
    code = demo.main(rest)
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tether`` console script; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list[:1] == ["demo"]:
            return _run_demo(args_list[1:])
        if args_list[:1] == ["connect"]:
            return _run_connect(args_list[1:])
        parser = _build_parser()
        try:
            args = parser.parse_args(args_list)
        except SystemExit as exc:
            # argparse exits on --help and on usage errors; returning keeps main() callable
            # from tests and other Python code with the same exit codes.
            if exc.code is None:
                return 0
            return exc.code if isinstance(exc.code, int) else 2
        if args.command == "certs" and args.certs_command == "init":
            return _certs_init(args)
        if args.command == "certs" and args.certs_command == "add-frontend-ca":
            return _certs_add_frontend_ca(args)
    except KeyboardInterrupt:
        return 130
    # Unreachable while every subcommand is dispatched above; kept as a loud failure for a
    # subcommand added to the parser but not here.
    print(f"{_PROG}: error: unhandled command {args.command!r}", file=sys.stderr)
    return 2
