"""`dialtone call`: place a simulated Twilio call on a running engine from the command line."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from yarl import URL

from config.settings import Settings
from engine.simulator.call import simulate_call
from engine.simulator.results import CallEnding, SimEvent, SimulationError
from engine.simulator.script import Dtmf, Pause, PlayWav, Say, Step
from storage import call_logs, phone_numbers
from storage.embedded import PGDATA_DIRNAME
from storage.enums import CallStatus
from storage.errors import DATABASE_ERRORS, NotFound
from storage.pool import database

__all__ = ["add_call_command", "run_call_command"]

# `serve` on every address is reached on loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 (read, never bound)
_CALL_LOG_PATIENCE_S = 10.0
"""How long the command waits, after the stream has closed, for the engine to write the call's last turns."""


class _StepAction(argparse.Action):
    """Append a script step to `args.steps`, so steps keep the order they were given in."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        steps: list[Step] = list(getattr(namespace, "steps", None) or [])
        value = str(values)
        match option_string:
            case "--say":
                steps.append(Say(value))
            case "--wav":
                steps.append(PlayWav(value))
            case "--dtmf":
                steps.append(Dtmf(value))
            case _:
                if not value.isdigit():
                    parser.error(f"{option_string}: {value!r} is not a whole number of milliseconds")
                steps.append(Pause(int(value)))
        namespace.steps = steps


def add_call_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `dialtone call`: place a simulated inbound call on a running engine, speaking Twilio's protocol."""
    call = subparsers.add_parser("call", help="place a simulated Twilio call on a running engine")
    call.add_argument(
        "--url", help="the engine's base URL (default: where `serve` listens, DIALTONE_HOST and DIALTONE_PORT)"
    )
    call.add_argument(
        "--public-url", help="the URL the engine signs webhooks for (default: DIALTONE_PUBLIC_URL, --url)"
    )
    call.add_argument("--to", default="+15555550100", help="the number called (default: the demo number)")
    call.add_argument("--from", dest="from_", default="+15005550006", help="the caller's number")
    call.add_argument("--say", action=_StepAction, dest="steps", metavar="TEXT", help="say TEXT (repeatable)")
    call.add_argument("--wav", action=_StepAction, dest="steps", metavar="PATH", help="play a WAV file (repeatable)")
    call.add_argument("--dtmf", action=_StepAction, dest="steps", metavar="DIGITS", help="press DIGITS")
    call.add_argument("--pause", action=_StepAction, dest="steps", metavar="MS", help="stay silent MS milliseconds")
    call.add_argument("--save", metavar="WAV", help="write what the caller heard to this WAV file")
    call.add_argument("--timeout", type=float, default=120.0, help="hang up after this many seconds (default 120)")
    call.add_argument(
        "--reply-timeout", type=float, default=10.0, help="seconds a turn waits for the agent to reply (default 10)"
    )
    call.add_argument("--verbose", action="store_true", help="also print every mark echo")
    call.set_defaults(steps=[])
    return call  # type: ignore[no-any-return]


async def run_call_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run `dialtone call`: print the conversation as it happens; exit 0 if the call was answered and ended."""
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None

    def show(event: SimEvent) -> None:
        if event.who != "twilio" or args.verbose:
            print(event, flush=True)

    url = args.url or _engine_url(settings)
    try:
        result = await simulate_call(
            url,
            to=args.to,
            from_=args.from_,
            script=list(args.steps),
            auth_token=token,
            public_url=args.public_url or settings.public_url or url,
            timeout_s=args.timeout,
            reply_timeout_s=args.reply_timeout,
            on_event=show,
        )
    except SimulationError as exc:
        print(f"call failed: {exc}", flush=True)
        return 1
    ending = result.ending.value if result.ending else "unknown"
    heard = sum(u.duration_s for u in result.utterances)
    print(f"call ended: {ending}; agent spoke {len(result.utterances)} time(s), {heard:.1f} s", flush=True)
    if result.call_log_id is not None:
        print(await _conversation(settings, called=args.to, call_log_id=result.call_log_id), flush=True)
    if args.save:
        await asyncio.to_thread(result.save_heard, args.save)
        print(f"saved what the caller heard to {args.save}", flush=True)
    return 0 if result.ending in (CallEnding.CALLER_HUNG_UP, CallEnding.ENGINE_CLOSED) else 1


async def _conversation(settings: Settings, *, called: str, call_log_id: str) -> str:
    """The call's conversation as the engine wrote it (`CallLog.transcript`: the words of every turn, the agent's
    too), read from the database the settings name once the call has ended; else a line saying why it is not shown.
    """
    if (
        settings.database_url is None
        and not (settings.state_dir.expanduser() / PGDATA_DIRNAME / "postmaster.pid").exists()
    ):
        # Not the engine's database: starting an embedded server here would make an empty one.
        return f"conversation not shown: no embedded database runs in {settings.state_dir} and DATABASE_URL is unset"
    try:
        async with database(settings) as db:
            number = await phone_numbers.find_by_number(db.pool, number=called)
            if number is None:
                return f"conversation not shown: {called} is not a number of the database at {db.location}"
            loop = asyncio.get_running_loop()
            give_up_at = loop.time() + _CALL_LOG_PATIENCE_S
            while True:
                call = await call_logs.get_call_log(
                    db.pool, organization_id=number.organization_id, call_log_id=call_log_id
                )
                if call.status is not CallStatus.IN_PROGRESS or loop.time() >= give_up_at:
                    break
                await asyncio.sleep(0.2)
    except NotFound:
        return f"conversation not shown: CallLog {call_log_id} is not in the database at {db.location}"
    except DATABASE_ERRORS as exc:
        return f"conversation not shown: {exc}"
    still = (
        " (the call is still in progress: its last turns may be missing)"
        if call.status is CallStatus.IN_PROGRESS
        else ""
    )
    lines = (call.transcript or "").splitlines() or ["(nothing was said)"]
    return "\n".join([f"conversation (CallLog {call_log_id}){still}:", *(f"  {line}" for line in lines)])


def _engine_url(settings: Settings) -> str:
    """The base URL of the engine `dialtone serve` starts with these settings."""
    host = _WILDCARDS.get(settings.host, settings.host)
    return str(URL.build(scheme="http", host=host, port=settings.port))
