"""`dialtone campaign ...`: create a campaign, import its recipients from CSV, start, pause, resume, stop, watch it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final, TextIO

from config.phone import region_code
from config.settings import Settings
from engine.campaigns.recipients_csv import ParsedRow, not_utf8, open_recipients_file, read_recipients
from engine.campaigns.windows import InvalidWindow, parse_time_of_day
from engine.twilio.outbound_calls import OutboundCallError, outbound_caller_id, usable_agent
from storage import Pool, campaign_dispatch, campaigns, dial_policies, organizations
from storage.campaign_states import RecipientDispatchState
from storage.campaigns import Campaign, CampaignRetryPolicy, DialingRules, NewRecipient
from storage.enums import CampaignStatus
from storage.pool import database
from storage.records import transaction

_DAY_NAMES = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 7}
_BAR_WIDTH = 30


def add_campaign_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `campaign` and its actions on the `dialtone` parser."""
    campaign = commands.add_parser("campaign", help="outbound campaigns: create, import, start, pause, stop, status")
    actions = campaign.add_subparsers(dest="campaign_command", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="create a DRAFT campaign; prints its id")
    _organization(create)
    create.add_argument("--name", required=True, help="the batch name")
    create.add_argument("--agent", required=True, help="the OUTBOUND agent's id")
    create.add_argument("--conversation-path", help="a ConversationPath id to follow")
    create.add_argument("--first-sentence", help="what the agent says first")
    create.add_argument("--task-prompt", help="the agent's task for these calls")
    create.add_argument("--post-call-summary", help="what to summarise after each call")
    create.add_argument("--start-date", type=date.fromisoformat, help="first day to call, YYYY-MM-DD")
    create.add_argument("--start-time", help="time to start on the start date, HH:MM (campaign timezone)")
    create.add_argument("--window", help="daily calling window in each recipient's local time, e.g. 09:00-17:00")
    create.add_argument("--days", default="mon-sun", help="days to call: mon-fri, or a list like mon,wed,sat")
    create.add_argument("--timezone", default="UTC", help="IANA timezone for ambiguous numbers and the start")
    create.add_argument(
        "--from-number",
        help="caller id, E.164 (default: the agent's number if it may call out, else the organization's first)",
    )
    create.add_argument("--max-concurrent", type=int, default=1, help="calls at once across all engines")
    create.add_argument("--calls-per-second", type=float, default=1.0, help="pace across all engines")
    create.add_argument("--max-attempts", type=int, default=1, help="dials per recipient at most")
    create.add_argument("--retry-on", default="busy,no-answer,failed", help="outcomes to retry")
    create.add_argument("--retry-delays", default="3600", help="seconds before each retry, e.g. 600,3600")

    load = actions.add_parser("import", help="import recipients from a CSV file (name, phoneNumber, notes, ...)")
    _organization(load)
    load.add_argument("campaign_id")
    load.add_argument("file", type=Path)
    load.add_argument("--region", help="country for numbers written without +<country>, e.g. US or DE")

    for name, text in (
        ("start", "schedule the campaign (it starts at its start date, or at once)"),
        ("pause", "stop new dials until resumed; calls in progress go on"),
        ("resume", "continue a paused campaign"),
        ("stop", "stop the campaign for good"),
    ):
        action = actions.add_parser(name, help=text)
        _organization(action)
        action.add_argument("campaign_id")
        if name == "pause":
            action.add_argument("--reason", default="paused by request", help="shown in status")

    status = actions.add_parser("status", help="progress, live until the campaign ends (or Ctrl-C)")
    _organization(status)
    status.add_argument("campaign_id")
    status.add_argument("--once", action="store_true", help="print once and exit (for scripts)")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")


def _organization(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--org", required=True, help="the organization's id or slug")


async def run_campaign_command(args: argparse.Namespace, settings: Settings) -> None:
    """Run one `campaign` action; StorageError and ValueError reach the caller as one-line messages."""
    async with database(settings) as db:
        pool = db.pool
        organization_id = await organization_id_of(pool, args.org)
        match args.campaign_command:
            case "create":
                from_number = await _caller_id(pool, organization_id, args.from_number)
                campaign = await campaigns.create_campaign(
                    pool,
                    organization_id=organization_id,
                    batch_name=args.name,
                    agent_id=args.agent,
                    conversation_path_id=args.conversation_path,
                    first_sentence=args.first_sentence,
                    task_prompt=args.task_prompt,
                    post_call_summary=args.post_call_summary,
                    start_date=args.start_date,
                    start_time=args.start_time,
                    call_start_time=_window(args.window)[0],
                    call_end_time=_window(args.window)[1],
                    rules=_rules(args, from_number),
                )
                print(campaign.id)
            case "import":
                await _import(pool, organization_id, args.campaign_id, args.file, args.region)
            case "start":
                await _start(pool, settings, organization_id, args.campaign_id)
                print(f"campaign {args.campaign_id} is PLANNED: it starts at its start date, or at once")
            case "pause":
                await campaigns.pause_campaign(
                    pool, organization_id=organization_id, campaign_id=args.campaign_id, reason=args.reason
                )
                print(f"campaign {args.campaign_id} paused")
            case "resume":
                await campaigns.resume_campaign(pool, organization_id=organization_id, campaign_id=args.campaign_id)
                print(f"campaign {args.campaign_id} resumed")
            case "stop":
                await campaigns.stop_campaign(pool, organization_id=organization_id, campaign_id=args.campaign_id)
                print(f"campaign {args.campaign_id} stopped")
            case "status":
                await _status(pool, organization_id, args.campaign_id, once=args.once, interval=args.interval)
            case _:
                raise AssertionError(f"unhandled campaign action {args.campaign_command}")


async def organization_id_of(pool: Pool, given: str) -> str:
    """The id of the organization `given` names by slug or by id (NotFound if none)."""
    by_slug = await organizations.get_organization_by_slug(pool, slug=given)
    if by_slug is not None:
        return by_slug.id
    return (await organizations.get_organization(pool, organization_id=given)).id


def _window(text: str | None) -> tuple[str | None, str | None]:
    if text is None:
        return None, None
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"--window {text!r}: write it as HH:MM-HH:MM, e.g. 09:00-17:00")
    try:
        parse_time_of_day(start.strip())
        parse_time_of_day(end.strip())
    except InvalidWindow as exc:
        raise ValueError(f"--window: {exc}") from None
    return start.strip(), end.strip()


def parse_days(text: str) -> frozenset[int]:
    """`mon-fri`, `sat,sun`, `1,3,5` or a mix, as ISO weekdays; ValueError naming the bad part."""
    days: set[int] = set()
    for part in text.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        try:
            low = _DAY_NAMES[first] if first in _DAY_NAMES else int(first)
            high = (_DAY_NAMES[last] if last in _DAY_NAMES else int(last)) if last else low
        except ValueError:
            raise ValueError(f"--days: {part!r} is not a day (mon..sun or 1..7)") from None
        if not 1 <= low <= high <= 7:
            raise ValueError(f"--days: {part!r} is not a range of days from mon (1) to sun (7)")
        days.update(range(low, high + 1))
    return frozenset(days)


async def _start(pool: Pool, settings: Settings, organization_id: str, campaign_id: str) -> None:
    # Refused as the API refuses it: no recipient to call, or an agent that may not call out (the start undone).
    async with transaction(pool) as conn:
        campaign = await campaigns.start_campaign(conn, organization_id=organization_id, campaign_id=campaign_id)
        try:
            await usable_agent(conn, settings, organization_id=organization_id, agent_id=campaign.agent_id)
        except OutboundCallError as exc:
            raise ValueError(str(exc)) from None


async def _caller_id(pool: Pool, organization_id: str, given: str | None) -> str | None:
    if given is None:
        return None
    try:
        return await outbound_caller_id(pool, organization_id=organization_id, number=given)
    except OutboundCallError as exc:
        raise ValueError(f"--from-number: {exc}") from None


def _rules(args: argparse.Namespace, from_number: str | None) -> DialingRules:
    try:
        delays = tuple(int(value) for value in args.retry_delays.split(","))
    except ValueError:
        raise ValueError(f"--retry-delays {args.retry_delays!r}: write seconds as numbers, e.g. 600,3600") from None
    return DialingRules(
        from_number=from_number,
        timezone=args.timezone,
        days_of_week=parse_days(args.days),
        max_concurrent_calls=args.max_concurrent,
        calls_per_second=args.calls_per_second,
        retry=CampaignRetryPolicy(
            max_attempts=args.max_attempts,
            retry_on=frozenset(part.strip() for part in args.retry_on.split(",") if part.strip()),
            delays_seconds=delays,
        ),
    )


@dataclass
class ProgressBar:
    """A one-line progress bar on a terminal (bytes of the file read); one final line elsewhere."""

    total_bytes: int
    out: TextIO
    rows: int = 0
    _drawn_at: float = 0.0

    def update(self, position: int) -> None:
        """Redraw at most ten times a second."""
        now = time.monotonic()
        if not self.out.isatty() or now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        self._draw(position)

    def finish(self) -> None:
        """Draw the full bar and end the line."""
        self._draw(self.total_bytes)
        self.out.write("\n")
        self.out.flush()

    def _draw(self, position: int) -> None:
        fraction = min(1.0, position / self.total_bytes) if self.total_bytes else 1.0
        filled = int(fraction * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        self.out.write(f"\rimporting [{bar}] {fraction:4.0%}  {self.rows:,} rows")
        self.out.flush()


def _tracked(rows: Iterator[ParsedRow], stream: TextIO, bar: ProgressBar) -> Iterator[NewRecipient]:
    for row in rows:
        bar.rows += 1
        if bar.rows % 500 == 0:
            bar.update(stream.buffer.tell())
        yield row.recipient


def region_option(given: str | None) -> str | None:
    """The `--region` of an import as config.phone reads it ("us" is US); ValueError naming one it cannot read."""
    try:
        return region_code(given) if given is not None else None
    except ValueError as exc:
        raise ValueError(f"--region: {exc}") from None


async def _import(pool: Pool, organization_id: str, campaign_id: str, path: Path, region: str | None) -> None:
    began = time.monotonic()
    region = region_option(region)
    policy = await dial_policies.get_policy(pool, organization_id=organization_id)
    with open_recipients_file(path) as stream:
        bar = ProgressBar(total_bytes=os.fstat(stream.fileno()).st_size, out=sys.stderr)
        try:
            summary = await campaigns.import_recipients(
                pool,
                organization_id=organization_id,
                campaign_id=campaign_id,
                recipients=_tracked(read_recipients(stream, policy=policy, default_region=region), stream, bar),
            )
        except UnicodeDecodeError:
            raise await asyncio.to_thread(not_utf8, path) from None
        bar.finish()
    print(
        f"{summary.rows:,} rows in {time.monotonic() - began:.1f} s: {summary.imported:,} recipients imported, "
        f"{summary.merged:,} duplicates merged, {summary.errors:,} invalid (kept as ERROR with the reason)"
    )


_ENDED: Final = frozenset({CampaignStatus.COMPLETED, CampaignStatus.STOPPED})
"""A campaign in these states places no more calls: a live status has nothing more to show."""


async def _status(pool: Pool, organization_id: str, campaign_id: str, *, once: bool, interval: float) -> None:
    live = not once and sys.stdout.isatty()
    while True:
        campaign = await campaigns.get_campaign(pool, organization_id=organization_id, campaign_id=campaign_id)
        text = await describe(pool, campaign)
        if live:
            sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: the view redraws in place
        print(text, flush=True)
        if once or campaign.status in _ENDED:
            return
        await asyncio.sleep(interval)


async def describe(pool: Pool, campaign: Campaign) -> str:
    """The campaign's status as the CLI shows it: lifecycle, progress, pause, recipients by state."""
    organization_id, campaign_id = campaign.organization_id, campaign.id
    dispatch = await campaigns.get_dispatch_state(pool, organization_id=organization_id, campaign_id=campaign_id)
    counts = await campaign_dispatch.count_by_state(pool, organization_id=organization_id, campaign_id=campaign_id)
    filled = campaign.progress * _BAR_WIDTH // 100
    lines = [
        f"{campaign.batch_name} ({campaign.id})",
        f"status     {campaign.status}" + (f"  PAUSED: {dispatch.paused_reason}" if dispatch.paused else ""),
        f"progress   [{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {campaign.progress}%  "
        f"{campaign.completed_calls:,} of {campaign.total_calls:,} recipients done",
        "recipients " + "  ".join(f"{state.lower()} {counts.get(state, 0):,}" for state in RecipientDispatchState),
    ]
    return "\n".join(lines)
