"""`agent-studio`: one command, a subcommand per role."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from datetime import datetime
from pathlib import Path

from agentstudio import logs, ports
from agentstudio.settings import InvalidSettings, Settings, from_environment

PORT_HINT = "set AGENTSTUDIO_PORT to a free one"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent-studio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="serve the ingest API (settings from AGENTSTUDIO_* variables)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(run=_ingest)

    p = sub.add_parser("operator", help="reconcile Agent, Workflow, ApiKey and WebhookSubscription resources")
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="namespace to serve (repeatable; default AGENTSTUDIO_OPERATOR_NAMESPACES, else all)")
    p.set_defaults(run=_operator)

    p = sub.add_parser("dialer", help="consume queued calls")
    p.set_defaults(run=_dialer)

    p = sub.add_parser("dev", help="run the whole stack locally from a folder of manifests")
    p.add_argument("directory", type=Path, nargs="?", default=Path("examples"))
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--chat", metavar="SLUG",
                   help="be the callee: a simulated call to this workflow (or agent), in the terminal")
    p.add_argument("--phone", default="+15005550006", help="--chat: the number the campaign would send")
    p.add_argument("--user-id", default="dev-user", help="--chat: user_id")
    p.add_argument("--user-context", type=_json_object, default={}, metavar="JSON", help="--chat: user_context")
    p.add_argument("--metadata", type=_json_object, default={}, metavar="JSON", help="--chat: metadata")
    p.add_argument("--cluster", action="store_true",
                   help="run NATS as three nats-servers forming a JetStream cluster (streams and buckets R3)")
    p.add_argument("--now", type=_instant, metavar="TIME",
                   help="run as if the clock read TIME (ISO 8601 with an offset, e.g. 2026-12-01T08:59:30-05:00) "
                        "and advancing from there: for trying calling windows and frequency caps")
    p.set_defaults(run=_dev)

    p = sub.add_parser("validate", help="check a folder of manifests offline")
    p.add_argument("directory", type=Path)
    p.set_defaults(run=_validate)

    p = sub.add_parser("crds", help="write the CustomResourceDefinitions generated from the models")
    p.add_argument("--out", type=Path, default=Path("crds"), help="folder to write (default: crds/)")
    p.add_argument("--check", action="store_true", help="only report whether the folder is up to date")
    p.set_defaults(run=_crds)

    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def _serving() -> tuple[Settings, socket.socket]:
    """A serving role's settings (logging set up) and its port, bound before anything starts;
    raises InvalidSettings or ports.CannotListen."""
    settings = from_environment()
    logs.setup(settings.log_level)
    return settings, ports.bind(settings.host, settings.port, PORT_HINT)


def _ingest(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        settings, listening = _serving()
    except (InvalidSettings, ports.CannotListen) as exc:
        return _refuse(args, exc)
    uvicorn.run(
        "agentstudio.ingest.app:create_app",
        factory=True,
        fd=listening.fileno(),
        workers=args.workers,
        log_config=None,
        access_log=False,
    )
    return 0


def _operator(args: argparse.Namespace) -> int:
    from agentstudio.operator.main import run

    try:
        settings = from_environment()
    except InvalidSettings as exc:
        return _refuse(args, exc)
    logs.setup(settings.log_level)
    namespaces = args.namespace or [n for n in settings.operator_namespaces.split(",") if n]
    try:
        asyncio.run(run(settings, namespaces))
    except KeyboardInterrupt:
        pass
    return 0


def _dialer(args: argparse.Namespace) -> int:
    import uvloop

    from agentstudio.dialer.main import run

    try:
        settings, listening = _serving()
    except (InvalidSettings, ports.CannotListen) as exc:
        return _refuse(args, exc)
    stop = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # finish or hand back what it holds, then exit
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop, listening)

    # uvloop, as uvicorn runs the ingest: this one loop carries every live conversation's frames and
    # model streams (bench/conversations.py).
    uvloop.run(main())
    return 0


def _refuse(args: argparse.Namespace, exc: Exception) -> int:
    """A role that cannot start says why in one line on stderr, and exits 1."""
    print(f"agent-studio {args.command}: {exc}", file=sys.stderr)
    return 1


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an ISO 8601 time, e.g. 2026-12-01T08:59:30-05:00") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("needs an offset (e.g. -05:00 or Z): calling windows are in each callee's zone")
    return value


def _dev(args: argparse.Namespace) -> int:
    from agentstudio import dev
    from agentstudio.chat import ChatRequest
    from agentstudio.natsserver import StoreInUse

    logs.setup("WARNING")
    chat = None if args.chat is None else ChatRequest(
        args.chat, args.phone, args.user_id, args.user_context, args.metadata)
    try:
        if not asyncio.run(dev.run(args.directory, args.port, args.host, chat, now=args.now,
                                   cluster=args.cluster)):
            return 1  # --chat could not place its call
    except (ports.CannotListen, StoreInUse) as exc:
        return _refuse(args, exc)
    except KeyboardInterrupt:
        pass
    return 0


def _validate(args: argparse.Namespace) -> int:
    from agentstudio.validate import validate_dir

    if not args.directory.is_dir():
        print(f"error: {args.directory} is not a folder", file=sys.stderr)
        return 1
    report = validate_dir(args.directory)
    for w in report.warnings:
        print(f"warning: {report.describe(w)}")
    for e in report.errors:
        print(f"error: {report.describe(e)}")
    counts = (len(report.resources) + len(report.rejected), len(report.errors), len(report.warnings))
    print(", ".join(_count(n, noun) for n, noun in zip(counts, ("resource", "error", "warning"))))
    return 1 if report.errors else 0  # warnings never fail: the operator publishes despite them


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _crds(args: argparse.Namespace) -> int:
    from agentstudio import crdgen

    if args.check:
        stale = [
            name
            for name, text in crdgen.render_all().items()
            if not (args.out / name).exists() or (args.out / name).read_text() != text
        ]
        for name in stale:
            print(f"out of date: {args.out / name}")
        return 1 if stale else 0
    for path in crdgen.write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
