"""The `dialtone` command: serve the engine, migrate and inspect the database, seed a demo."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from config.settings import Settings, SettingsError, load_settings
from engine.api.cli import add_api_key_command, run_api_key_command
from engine.call.frame_socket import log_if_not_direct
from engine.campaigns.cli import add_campaign_command, run_campaign_command
from engine.do_not_call.cli import add_dnc_command, run_dnc_command
from engine.knowledge.cli import add_kb_command, run_kb_command
from engine.server.access_log import AccessLogWithoutQuery
from engine.server.app import create_app
from engine.server.appkeys import DRAIN, LIVE_CALLS
from engine.server.drain import drain_live_calls
from engine.simulator import add_call_command, run_call_command
from pipelines.clients import load_cloud_providers
from storage.errors import StorageError
from storage.migrate import migrate, migration_status
from storage.pool import database

log = logging.getLogger("dialtone")

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dialtone", description="Dialtone real-time telephony call engine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="start the engine")
    serve.add_argument("--host", help="address to listen on (default: DIALTONE_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: DIALTONE_PORT or 8080)")
    serve.add_argument("--no-migrate", action="store_true", help="do not apply pending migrations at start")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("migrate", help="apply pending migrations")
    db_commands.add_parser("status", help="show applied and pending migrations")

    add_call_command(commands)
    add_campaign_command(commands)
    add_dnc_command(commands)
    add_kb_command(commands)
    add_api_key_command(commands)

    seed = commands.add_parser("seed-demo", help="create the demo organization, agent and number (idempotent)")
    seed.add_argument(
        "--phone-number",
        default=None,
        help="the demo's inbound number, E.164: its agent moves to it (default: the number it answers, "
        "+15555550100 for a new demo)",
    )
    return parser


_LOGGING_CREDENTIALS = ("botocore", "aiobotocore")
"""Libraries whose DEBUG lines carry credentials: botocore logs every signature it makes, each presigned recording
link's among them, beside the request it signs. They log at INFO at most, even under DIALTONE_LOG_LEVEL=DEBUG."""


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for name in _LOGGING_CREDENTIALS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))


async def _serve(settings: Settings, *, apply_migrations: bool) -> None:
    app = create_app(settings, apply_migrations=apply_migrations)
    log_if_not_direct()
    runner = web.AppRunner(app, handle_signals=False, access_log_class=AccessLogWithoutQuery)
    await runner.setup()  # opens (and migrates) the database before any request is accepted
    load_cloud_providers()  # not on the event loop in the middle of calls: the first cloud call would stall them all
    # Everything loaded so far (the SDKs, pydantic models, the app) lives as long as the process: keep it out of
    # the garbage collector's full passes, which would otherwise pause every call's audio to walk it.
    gc.collect()
    gc.freeze()
    # Calls allocate fast and briefly (frames, messages): collect the young generation far less often, so short-lived
    # objects die before being promoted and full passes over long-lived ones come rarely.
    gc.set_threshold(20_000, 20, 20)
    try:
        site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=10)
        try:
            await site.start()
        except OSError as exc:  # main() prints the message alone
            raise OSError(exc.errno, _cannot_listen(settings, exc)) from None
        host, port = runner.addresses[0][:2]
        log.info("Dialtone listening on http://%s:%d (Ctrl-C or SIGTERM to stop)", host, port)
        stopping, stop_now = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            if not stopping.is_set():
                stopping.set()
            elif not stop_now.is_set():
                log.warning("second stop signal: ending the live calls now")
                stop_now.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        await stopping.wait()
        log.info("stopping")
        await drain_live_calls(app[DRAIN], app[LIVE_CALLS], seconds=settings.drain_seconds, stop_now=stop_now)
    finally:
        await runner.cleanup()
    log.info("stopped")


def _cannot_listen(settings: Settings, exc: OSError) -> str:
    """Why `serve` cannot listen, naming the setting to change (most often: another process holds the port)."""
    cause = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    where = f"cannot listen on {settings.host}:{settings.port} ({cause})"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"DIALTONE_HOST: {where}; give an address of this machine with DIALTONE_HOST (or --host)"
    return f"DIALTONE_PORT: {where}; choose another port with DIALTONE_PORT (or --port)"


async def _migrate(settings: Settings) -> None:
    async with database(settings) as db, db.pool.acquire() as conn:
        applied = await migrate(conn)
        status = await migration_status(conn)
    if applied:
        for migration in applied:
            print(f"applied {migration.label}")
    print(f"schema version {status.current_version} on {db.location}")


async def _status(settings: Settings) -> None:
    async with database(settings) as db, db.pool.acquire() as conn:
        status = await migration_status(conn)
    print(f"database: {db.location}")
    print(f"schema version: {status.current_version}")
    for applied in status.applied:
        when = applied.applied_at.strftime("%Y-%m-%d %H:%M:%S %Z")
        print(f"  applied  {applied.version:04d}_{applied.name}  {when}  {applied.execution_ms} ms")
    for pending in status.pending:
        print(f"  pending  {pending.label}")
    for unknown in status.unknown:
        print(f"  unknown  {unknown.version:04d}_{unknown.name}  (applied by a newer engine)")
    if not status.pending:
        print("up to date")


async def _seed_demo(settings: Settings, phone_number: str | None) -> None:
    from storage.demo import seed_demo

    async with database(settings) as db:
        async with db.pool.acquire() as conn:
            await migrate(conn)
        result = await seed_demo(db.pool, phone_number=phone_number)
    print(result.describe())


async def _call(settings: Settings, args: argparse.Namespace) -> None:
    code = await run_call_command(args, settings)
    if code:
        raise SystemExit(code)


def _event_loop_factory(command: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop for the server where it is installed (its sockets and scheduling cost about half of asyncio's)."""
    if command != "serve":
        return None
    try:
        import uvloop
    except ImportError:  # not built for this platform (Windows): the standard loop works, only slower
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0912 (one case per command)
    """Run one `dialtone` command; return the process exit code."""
    args = _parser().parse_args(argv)
    overrides: dict[str, object] = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"dialtone: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _configure_logging(settings)

    command: Callable[[], Awaitable[None]]
    match args.command, getattr(args, "db_command", None):
        case "serve", _:
            command = lambda: _serve(settings, apply_migrations=not args.no_migrate)  # noqa: E731
        case "db", "migrate":
            command = lambda: _migrate(settings)  # noqa: E731
        case "db", "status":
            command = lambda: _status(settings)  # noqa: E731
        case "call", _:
            command = lambda: _call(settings, args)  # noqa: E731
        case "campaign", _:
            command = lambda: run_campaign_command(args, settings)  # noqa: E731
        case "dnc", _:
            command = lambda: run_dnc_command(args, settings)  # noqa: E731
        case "seed-demo", _:
            command = lambda: _seed_demo(settings, args.phone_number)  # noqa: E731
        case "kb", _:
            command = lambda: run_kb_command(args, settings)  # noqa: E731
        case "api-key", _:
            command = lambda: run_api_key_command(args, settings)  # noqa: E731
        case _:
            raise AssertionError(f"unhandled command {args.command}")
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory(args.command)) as runner:
            runner.run(command())
    except (StorageError, ValueError) as exc:
        print(f"dialtone: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # e.g. the port is taken
        print(f"dialtone: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
