"""The campaign dispatcher every engine process runs: claim due recipients, dial them on pace, reconcile outcomes.

Each tick: settle what other processes left (ended calls, expired leases, dials whose CallSid was lost, which
Twilio is asked about, as it is about API calls it never confirmed), then for each campaign that is due
and not being claimed by another process, decide how many recipients to lease (concurrency cap, calls per
second, calling windows in each recipient's timezone, credits) and dial each at its slot. Storage holds the
rows and locks (storage/campaign_dispatch.py); this module holds the decisions and the clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from aiohttp import web

from engine.campaigns.windows import CallingWindow, InvalidWindow, parse_time_of_day, possible_timezones, zone
from engine.server.appkeys import DATABASE, DRAIN, SETTINGS, TWILIO
from engine.twilio.outbound_calls import (
    AgentUnavailable,
    CallNotPlaced,
    CampaignNotFound,
    DestinationRefused,
    InvalidNumber,
    InvalidVariables,
    NoCredits,
    NoFreeSlot,
    NumberUnavailable,
    OnDoNotCallList,
    OutboundCallError,
    OutboundDeps,
    OutboundUnavailable,
    PlacementUnconfirmed,
    place_call,
)
from engine.twilio.placement_lookup import PlacementLookup
from engine.workers.recovery import NODE_ID
from storage import Pool
from storage import campaign_dispatch as dispatch
from storage.call_slots import UNLIMITED
from storage.campaign_dispatch import Claim, DueCampaign, Pick, QueuedRecipient
from storage.campaigns import InvalidCampaignTransition
from storage.enums import CampaignStatus
from storage.errors import DATABASE_ERRORS
from storage.records import Connection, new_id, transaction

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Candidates locked per slot: some may be outside their window and get deferred instead of dialed.
_CANDIDATES_PER_SLOT = 3


@dataclass(frozen=True, slots=True)
class DialResult:
    """A call that was placed: its CallLog and Twilio's CallSid."""

    call_log_id: str
    call_sid: str | None


class DialRefused(Exception):
    """This recipient's call could not be placed (an invalid number, Twilio refused): a `failed` attempt."""

    def __init__(self, reason: str, call_log_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.call_log_id = call_log_id


class DoNotDial(Exception):
    """This recipient's number is on the organization's do-not-call list: it is never dialed."""


class NotDialable(Exception):
    """This recipient can never be dialed as it stands: its number is one the organization's dial policy refuses
    (storage.dial_policies, which may have tightened since the import), or its variables break a call's limits (a
    recipient imported before the import checked them). It is not dialed, and not retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CampaignBlocked(Exception):
    """No call of this campaign can be placed now (no credits, agent or number unusable): pause it, dial nobody."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DialDeferred(Exception):
    """The organization has no free call slot now (its plan's limit), or is in a call with the number already: give
    the claim back, dial later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DialUnconfirmed(Exception):
    """Twilio did not answer the request for this recipient's call, which it may have received: the attempt waits
    for its lease to expire, when Twilio is asked whether the call exists (PlacementLookup)."""


class Dialer(Protocol):
    """Places one campaign call; the engine's is PlaceCallDialer (Twilio), tests bring their own."""

    async def dial(self, claim: Claim) -> DialResult:
        """Place the call, creating its CallLog (metadata naming the recipient) before the call is requested.

        Raises DialRefused, DialDeferred, DoNotDial, NotDialable, CampaignBlocked or DialUnconfirmed; DialUnconfirmed,
        like any other error, leaves the attempt to lease expiry, which follows the CallLog if one was created with a
        CallSid, asks Twilio (PlacementLookup) if it has none, and otherwise puts the recipient back without counting
        it.
        """
        ...


@dataclass(frozen=True, slots=True)
class DispatchTiming:
    """How often the dispatcher looks, how long a lease lasts, how often an idle campaign is looked at again."""

    interval: timedelta = timedelta(seconds=1)
    lease: timedelta = timedelta(seconds=60)
    idle_recheck: timedelta = timedelta(seconds=5)
    max_claims_per_tick: int = 100


class CampaignDispatcher:
    """One process's share of every running campaign."""

    def __init__(
        self,
        pool: Pool,
        dialer: Dialer | None,
        *,
        node_id: str | None = None,
        call_limits: Mapping[str, int] | None = None,
        timing: DispatchTiming | None = None,
        clock: Clock | None = None,
        lookup: PlacementLookup | None = None,
    ) -> None:
        """Nothing runs until `start()` (or `tick()` in tests).

        `dialer` None: this process cannot place calls (no public URL for Twilio's callbacks) and only settles what
        others, and its own API calls, left: ended calls, expired leases and the lookups; it claims no recipient.
        `lookup` asks Twilio about the CallLogs that never got a CallSid (expired dials, and API calls Twilio never
        confirmed); without it they wait.
        `call_limits`: calls an organization may have in progress at once, by plan (0 or absent = no limit);
        an organization at its limit gets no new claims until one of its calls ends.
        """
        self._pool = pool
        self._call_limits: Mapping[str, int] = call_limits or {}
        self._dialer = dialer
        self._lookup = lookup
        self.node_id = node_id or new_id()
        self._timing = timing or DispatchTiming()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._dials: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._dialing = True

    @property
    def dials_in_progress(self) -> int:
        """Dials this process has claimed and not yet handed to their CallLog."""
        return len(self._dials)

    def start(self) -> None:
        """Run ticks in the background until `close()`."""
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=f"dispatcher-{self.node_id}")

    def stop_dialing(self) -> None:
        """Claim and dial nobody from now on; claims waiting for their slot are given back (the engine is draining).

        Ticks go on settling what others left (ended calls, expired leases, lookups) until `close()`.
        """
        self._dialing = False

    async def close(self) -> None:
        """Stop ticking and wait for dials already started (their leases would otherwise expire to others)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        await self.drain()

    async def drain(self) -> None:
        """Wait until every dial this process started has been placed, refused or released."""
        while self._dials:
            await asyncio.gather(*self._dials, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except DATABASE_ERRORS as exc:  # a deadlock victim, a lost connection: next tick
                log.warning("campaign dispatch tick failed: %s", exc)
            except Exception:  # a bug must not stop every campaign on this process: log it, keep ticking
                log.exception("campaign dispatch tick failed")
            # Jitter keeps processes from locking into one phase where the same one always looks first.
            jitter = random.uniform(0.5, 1.5)  # noqa: S311 (spreading ticks, not a secret)
            await asyncio.sleep(self._timing.interval.total_seconds() * jitter)

    async def tick(self) -> list[Claim]:
        """Reconcile, then claim due recipients of every due campaign and start their dials; return the claims."""
        await dispatch.reconcile_ended_calls(self._pool)
        await dispatch.expire_leases(self._pool, now=self._clock())
        if self._lookup is not None:
            await self._lookup.settle(now=self._clock(), owner=self.node_id)
        if self._dialer is None or not self._dialing:
            return []
        claims: list[Claim] = []
        seen: list[str] = []
        while len(claims) < self._timing.max_claims_per_tick:
            async with transaction(self._pool) as conn:
                campaign = await dispatch.lock_due_campaign(conn, now=self._clock(), skip=seen)
                if campaign is None:
                    break
                seen.append(campaign.id)
                claims += await self._claim(conn, campaign)
        for claim in claims:
            task = asyncio.get_running_loop().create_task(self._dial(claim), name=f"dial-{claim.attempt_id}")
            self._dials.add(task)
            task.add_done_callback(self._dials.discard)
        return claims

    async def _claim(self, conn: Connection, campaign: DueCampaign) -> list[Claim]:
        now = self._clock()
        rules = campaign.rules
        if campaign.status == CampaignStatus.PLANNED:
            starts = start_instant(campaign)
            if starts is not None and starts > now:
                await dispatch.defer_campaign(conn, campaign.id, starts)
                return []
            try:
                await dispatch.mark_started(conn, campaign)
            except InvalidCampaignTransition:
                return []  # stopped or unscheduled since it was locked: nothing to dial

        if campaign.credits <= 0:
            await dispatch.pause_for(
                conn, campaign, f"out of credits (balance {campaign.credits}): add credits, then resume the campaign"
            )
            return []
        if campaign.from_number is None:
            await dispatch.pause_for(
                conn,
                campaign,
                "no caller id: set the campaign's from number, or enable outbound calls on the agent's number or "
                "another of the organization's numbers",
            )
            return []
        slots = min(rules.max_concurrent_calls - campaign.in_flight, self._timing.max_claims_per_tick)
        plan_limit = self._call_limits.get(campaign.organization_plan, UNLIMITED)
        if plan_limit != UNLIMITED:  # the organization's plan caps its calls across campaigns and the API
            slots = min(slots, plan_limit - campaign.organization_calls)
        if slots <= 0:
            return []  # at the cap: looked at again next tick, when calls may have ended
        spacing = timedelta(seconds=1 / rules.calls_per_second)
        base = max(campaign.next_dial_at, now)
        paced = max(1, math.ceil((now + self._timing.interval - base) / spacing))
        wanted = min(slots, paced)
        candidates = await dispatch.lock_queued(conn, campaign, now=now, limit=wanted * _CANDIDATES_PER_SLOT)
        picks, deferrals = plan_dials(campaign, candidates, wanted=wanted, first_at=base, spacing=spacing)
        await dispatch.defer_recipients(conn, deferrals)
        if picks:
            return await dispatch.lease(
                conn,
                campaign,
                picks,
                owner=self.node_id,
                lease_for=self._timing.lease,
                next_dial_at=base + spacing * len(picks),
            )
        earliest = await dispatch.earliest_queued(conn, campaign.id)
        if earliest is None and campaign.in_flight == 0 and await dispatch.complete_if_done(conn, campaign.id):
            log.info("campaign %s completed", campaign.id)
            return []
        recheck = now + self._timing.idle_recheck
        look_again = min(earliest, recheck) if earliest is not None and earliest > now else recheck
        await dispatch.defer_campaign(conn, campaign.id, look_again)
        return []

    async def _dial(self, claim: Claim) -> None:
        try:
            await self._dial_at_slot(claim)
        except DATABASE_ERRORS as exc:
            # The database went away around the dial: the lease's expiry settles it (CallLog or not).
            log.warning("campaign %s: dial of recipient %s unsettled: %s", claim.campaign_id, claim.recipient_id, exc)

    async def _ready_at_slot(self, claim: Claim) -> bool:
        """Wait for the claim's slot; whether it may still be dialed then (inside its window, its lease renewed)."""
        delay = (claim.dial_at - self._clock()).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)
        if not self._dialing:  # another engine dials it: this one is stopping
            await dispatch.release_claim(self._pool, claim, reason="the engine that claimed it is stopping")
            return False
        if self._clock() >= claim.dial_by:  # this process fell behind: never dial outside the window
            await dispatch.release_claim(self._pool, claim, reason="calling window closed before the dial")
            return False
        return await dispatch.begin_dial(self._pool, claim, now=self._clock(), lease_for=self._timing.lease)

    async def _dial_at_slot(self, claim: Claim) -> None:
        if not await self._ready_at_slot(claim):
            return
        try:
            assert self._dialer is not None  # claims are made only with a dialer
            result = await self._dialer.dial(claim)
        except DialRefused as refused:
            await dispatch.record_refused(
                self._pool, claim, reason=refused.reason, call_log_id=refused.call_log_id, now=self._clock()
            )
        except DialDeferred as deferred:
            # The recipient waits in the queue, its attempt not counted, until one of the organization's calls ends.
            await dispatch.release_claim(self._pool, claim, reason=deferred.reason)
        except DoNotDial:
            await dispatch.record_do_not_call(self._pool, claim)
        except NotDialable as refused:
            await dispatch.record_not_dialable(self._pool, claim, reason=refused.reason)
        except CampaignBlocked as blocked:
            await dispatch.release_claim(self._pool, claim, reason=blocked.reason)
            await dispatch.pause_campaign_for(self._pool, claim.campaign_id, blocked.reason)
            log.warning("campaign %s paused: %s", claim.campaign_id, blocked.reason)
        except dispatch.LeaseLost as lost:
            # It stalled past its lease, and the recipient is someone else's now: no CallLog, no call.
            log.warning("campaign %s: %s", claim.campaign_id, lost)
        except DialUnconfirmed as unconfirmed:
            # Twilio may have the call: the lease's expiry asks it (placement_lookup), never a second dial first.
            log.warning("campaign %s: recipient %s: %s", claim.campaign_id, claim.recipient_id, unconfirmed)
        except Exception:
            # Placed or not is unknown here: the lease's expiry looks for the CallLog and decides.
            log.exception("dialing recipient %s of campaign %s failed", claim.recipient_id, claim.campaign_id)
        else:
            if not await dispatch.record_placed(
                self._pool, claim, call_log_id=result.call_log_id, call_sid=result.call_sid
            ):
                log.error(
                    "campaign %s: recipient %s was dialed after its lease was lost (CallLog %s)",
                    claim.campaign_id,
                    claim.recipient_id,
                    result.call_log_id,
                )


def start_instant(campaign: DueCampaign) -> datetime | None:
    """When a PLANNED campaign starts: its startDate at startTime (or midnight) in its timezone; None for at once."""
    if campaign.start_date is None:
        return None
    at = parse_time_of_day(campaign.start_time) if campaign.start_time else time(0, 0)
    return datetime.combine(campaign.start_date, at, tzinfo=zone(campaign.rules.timezone)).astimezone(UTC)


def plan_dials(
    campaign: DueCampaign,
    candidates: list[QueuedRecipient],
    *,
    wanted: int,
    first_at: datetime,
    spacing: timedelta,
) -> tuple[list[Pick], list[tuple[str, datetime]]]:
    """Which candidates to dial at which paced instant, and which to defer to their window's next opening."""
    window = CallingWindow.from_strings(campaign.call_start_time, campaign.call_end_time, campaign.rules.days_of_week)
    hours = CallingHours(window, campaign.rules.timezone)
    picks: list[Pick] = []
    deferrals: list[tuple[str, datetime]] = []
    for candidate in candidates:
        if len(picks) == wanted:
            break
        dial_at = first_at + spacing * len(picks)
        opens, closes = hours.period(candidate, dial_at)
        if opens <= dial_at:
            picks.append(Pick(candidate, dial_at, closes))
        else:
            deferrals.append((candidate.id, opens))
    return picks, deferrals


class CallingHours:
    """When a campaign's recipients may be called: its window read in each recipient's timezone.

    A number whose region has one timezone is read in it (the import stores it). One whose region spans several (a
    mobile of Australia, a North American toll-free number) is read in the campaign's timezone when that is one of
    them; otherwise the window must be open in all of them at once, or a campaign in New York would call Sydney at
    night. Where it never is (zones further apart than the window is long), and for a number of no known region,
    the campaign's timezone decides.
    """

    def __init__(self, window: CallingWindow, campaign_timezone: str) -> None:
        """Hours of `window` for a campaign in `campaign_timezone`."""
        self._window = window
        self._campaign_timezone = campaign_timezone
        self._campaign_zone = zone(campaign_timezone)
        # Many recipients share their zones: a stretch found for one holds for the next until it closes.
        self._shared: dict[tuple[str, ...], tuple[datetime, datetime]] = {}

    def period(self, recipient: QueuedRecipient, at: datetime) -> tuple[datetime, datetime]:
        """The [opening, closing) instants of the recipient's window open at `at`, or of its next one."""
        if recipient.timezone is not None:
            own = _known_zone(recipient.timezone)
            return self._window.open_period(own or self._campaign_zone, at)
        possible = possible_timezones(recipient.phone_number)
        if not possible or self._campaign_timezone in possible:
            return self._window.open_period(self._campaign_zone, at)
        known = self._shared.get(possible)
        if known is None or known[1] <= at:
            known = self._shared[possible] = self._everywhere(possible, at)
        return known

    def _everywhere(self, names: tuple[str, ...], at: datetime) -> tuple[datetime, datetime]:
        zones = [tz for name in names if (tz := _known_zone(name)) is not None]
        common = self._window.common_period(_distinct_clocks(zones, at), at) if zones else None
        return common if common is not None else self._window.open_period(self._campaign_zone, at)


def _known_zone(name: str) -> ZoneInfo | None:
    try:
        return zone(name)
    except InvalidWindow:  # a zone this system's tz database lacks
        return None


def _distinct_clocks(zones: list[ZoneInfo], at: datetime) -> list[ZoneInfo]:
    """One zone per distinct clock over the coming days: the 42 zones of a toll-free number show about a dozen."""
    by_offsets: dict[tuple[timedelta | None, ...], ZoneInfo] = {}
    for tz in zones:
        offsets = tuple((at + timedelta(hours=6 * step)).astimezone(tz).utcoffset() for step in range(4 * 9))
        by_offsets.setdefault(offsets, tz)
    return list(by_offsets.values())


# ----------------------------------------------------------------------------------------------- in the engine


class PlaceCallDialer:
    """The engine's dialer: `engine.twilio.outbound_calls.place_call`, its errors mapped onto the dispatcher's."""

    def __init__(self, deps: OutboundDeps) -> None:
        """Dial through `deps` (the running engine's Twilio client, pool and public URL)."""
        self._deps = deps

    async def dial(self, claim: Claim) -> DialResult:
        """Place the claim's call; DialRefused, DoNotDial or NotDialable for this recipient, CampaignBlocked for the
        campaign."""
        try:
            placed = await place_call(
                self._deps,
                organization_id=claim.organization_id,
                agent_id=claim.agent_id,
                from_number=claim.from_number,
                to=claim.phone_number,
                variables=claim.variables,
                campaign_id=claim.campaign_id,
                claim=claim,
            )
        except CallNotPlaced as exc:
            raise DialRefused(str(exc), exc.call_log_id) from None
        except dispatch.CalleeInCall as exc:
            raise DialDeferred(str(exc)) from None
        except PlacementUnconfirmed as exc:
            raise DialUnconfirmed(str(exc)) from None
        except InvalidNumber as exc:
            raise DialRefused(str(exc)) from None
        except NoFreeSlot as exc:
            raise DialDeferred(str(exc)) from None
        except OnDoNotCallList as exc:
            raise DoNotDial(str(exc)) from None
        except (DestinationRefused, InvalidVariables) as exc:
            raise NotDialable(str(exc)) from None
        except (NoCredits, AgentUnavailable, NumberUnavailable, CampaignNotFound, OutboundUnavailable) as exc:
            raise CampaignBlocked(str(exc)) from None
        except OutboundCallError as exc:
            raise DialRefused(str(exc)) from None
        return DialResult(call_log_id=placed.call_log_id, call_sid=placed.call_sid)


async def dispatcher_context(app: web.Application) -> AsyncIterator[None]:
    """Run this process's campaign dispatcher while the app runs, when it can place calls at all."""
    settings = app[SETTINGS]
    if not settings.dispatch_enabled:
        log.info("campaign dispatcher off (DIALTONE_DISPATCH=false): other processes dial and settle unconfirmed calls")
        yield
        return
    twilio = app.get(TWILIO)
    if twilio is None:
        log.info("campaign dispatcher off: no Twilio credentials (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN)")
        yield
        return
    pool = app[DATABASE].pool
    try:
        dialer: PlaceCallDialer | None = PlaceCallDialer(OutboundDeps.from_app(app))
    except OutboundUnavailable as exc:
        # POST /v1/calls can still place calls (Twilio calls back at the request's URL): their unconfirmed
        # placements, and what other processes left, are settled here all the same.
        log.info("campaign dispatcher settling only, dialing no campaign: %s", exc)
        dialer = None
    dispatcher = CampaignDispatcher(
        pool,
        dialer,
        node_id=app.get(NODE_ID),
        call_limits=settings.concurrent_call_limits,
        timing=DispatchTiming(
            interval=timedelta(seconds=settings.dispatch_interval),
            lease=timedelta(seconds=settings.dispatch_lease),
        ),
        lookup=PlacementLookup(pool, twilio),
    )
    dispatcher.start()
    app[DRAIN].on_start(dispatcher.stop_dialing)
    log.info("campaign dispatcher running as node %s", dispatcher.node_id)
    try:
        yield
    finally:
        await dispatcher.close()
