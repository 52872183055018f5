"""A local Twilio: the REST API that places calls, and the far end that answers them through our media stream.

async with FakeTwilio(account_sid=ACCOUNT, auth_token=TOKEN) as twilio:
    twilio.behave("+15550001111", Answer(greeting="Hello?", script=[Say("yes please")]))
    twilio.behave("+15550002222", Busy())
    # engine settings: twilio_api_base=twilio.api_base, twilio_account_sid=ACCOUNT, twilio_auth_token=TOKEN
    call = await twilio.finished(sid)

`POST /2010-04-01/Accounts/{AccountSid}/Calls.json` takes the twilio SDK's form fields (Basic auth checked) and
answers 201 with a call resource shaped like Twilio's; each destination then behaves as scripted: `Answer` opens the
TwiML's `<Connect><Stream>` with the engine's simulator (20 ms frames, marks echoed, caller lines spoken), `Busy`,
`NoAnswer`, `Fail`, `Refuse` (an error at creation) or `Machine` (a greeting, then the async AMD verdict). Status
callbacks are posted signed, as form posts, for the events the call subscribed to. `POST .../Calls/{CallSid}.json`
updates a live call (`Twiml`, `Status=completed`): the stream gets `stop` (a call answered but not yet streaming never
streams), and the update is recorded; `Status=canceled` (or `completed`) ends a call not answered yet `canceled`, and
leaves an answered one as it is; TwiML that
`<Dial>`s makes the dialed call (its `parent_call_sid` the call's; it stays `in-progress`: the far end of a dial is
not scripted). `GET .../Calls.json` lists calls (filters `To`, `From`, `Status`, or `ParentCallSid` for the calls a
`<Dial>` made; most recent first) and `GET .../Calls/{CallSid}.json` fetches one; a call's `update_gate` holds its
updates until the test sets it (its `abandoned` is set if the engine gives up on one meanwhile, which with
`lose_abandoned` is never acted on), and its
`answer_gate` holds the answer to an update the fake has acted on. Updates are acted on one at a time in the order
they came; `Status=completed` ends the calls the call's `<Dial>` made, as Twilio ends the whole call.
A call that `dials_late` keeps its `<Dial>`s out of the record until `record_dials(call)`.
`lookup_gate` holds every call list request (recorded in `lookups` as it comes) until the test sets it;
`lookup_answers`, when given, has each call list request answered as the record stood when it came, but only once the
test sets the event the fake queues there for it: an answer still on its way while the call changes.
`call_updates()` is the update endpoint alone, for calls the simulator places. `hold_create(number)` holds the next
create to `number` until the test decides whether it reached Twilio (the call is created) or not (no call exists, as
if the request never left): kill the engine in between.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import secrets
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import Any, Self

import aiohttp
from aiohttp import web
from multidict import MultiDictProxy

from engine.simulator import CallResult, Pause, Step, StreamPeer, parse_twiml, run_stream, synthesize_speech
from engine.twilio.signature import request_signature
from tests.fakes.server import serve

__all__ = [
    "Answer",
    "Behaviour",
    "Busy",
    "Fail",
    "FakeCall",
    "FakeTwilio",
    "HeldCreate",
    "Machine",
    "NoAnswer",
    "Refuse",
]

API_VERSION = "2010-04-01"


@dataclass(frozen=True, slots=True)
class Answer:
    """A person answers after `ring_ms`: says `greeting` at once (callees speak first), then follows `script`.

    The script is the simulator's (`Say`, `Dtmf`, `Pause`, `HangUp`); each `Say` waits for the agent's reply first.
    With answering-machine detection requested, the verdict `human` is posted `verdict_after_ms` after the answer.
    With `until`, it rings until the test sets that event instead of `ring_ms`.
    """

    script: Sequence[Step] = ()
    greeting: str | None = "Hello?"
    ring_ms: int = 100
    verdict_after_ms: int = 1500
    timeout_s: float = 90.0
    until: asyncio.Event | None = None


@dataclass(frozen=True, slots=True)
class Machine:
    """An answering machine answers: plays `greeting`, then (with async AMD requested) Twilio posts `answered_by`.

    It records whatever is said until the engine changes the call, or hangs up after `record_s`.
    """

    greeting: str = "Hi, you have reached Sam. Please leave a message after the tone."
    answered_by: str = "machine_end_beep"
    ring_ms: int = 100
    record_s: float = 20.0


@dataclass(frozen=True, slots=True)
class Busy:
    """The line is busy."""

    ring_ms: int = 50


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """It rings `ring_ms` (the fake does not wait the whole `Timeout`; it records it), then no-answer.

    With `until`, it rings until the test sets that event instead.
    """

    ring_ms: int = 200
    until: asyncio.Event | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    """The call is created, then fails (an unreachable carrier, say)."""

    sip_response_code: int = 404


@dataclass(frozen=True, slots=True)
class Refuse:
    """Creation itself is refused with Twilio's error JSON (e.g. 21215: geographic permissions); given to
    `call_updates`, every update of a call is refused so instead."""

    code: int = 21215
    message: str = "Account not authorized to call this number. Check your geographic permissions."
    status: int = 400


Behaviour = Answer | Machine | Busy | NoAnswer | Fail | Refuse


@dataclass(slots=True)
class HeldCreate:
    """A create request the fake holds: `arrived` is set when it comes; `release(create=...)` decides its fate."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the fake acted on the decision (the call exists, or the request is gone)."""
    decision: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def release(self, *, create: bool) -> None:
        """Create the call (the request had reached Twilio) or drop it (it never had: Twilio knows no such call)."""
        self.decision.set_result(create)


@dataclass(slots=True)
class FakeCall:
    """One call the fake placed: what was asked, what the far end did, and what the engine sent back."""

    sid: str
    to: str
    from_: str
    params: dict[str, list[str]]
    behaviour: Behaviour
    status: str = "queued"
    statuses_posted: list[str] = field(default_factory=list)
    callback_responses: list[int] = field(default_factory=list)
    amd_posted: str | None = None
    updates: list[dict[str, str]] = field(default_factory=list)
    spoken_after_update: list[str] = field(default_factory=list)
    stream: CallResult | None = None
    answered_at: float | None = None
    duration_s: int = 0
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    updated: asyncio.Event = field(default_factory=asyncio.Event)
    update_gate: asyncio.Event | None = None
    """When given, an update waits (recorded, `updated` set) until it is set before the fake acts on it and answers."""
    answer_gate: asyncio.Event | None = None
    """When given, an update is acted on (the stream gets `stop`, a `<Dial>` dials) but answered only once it is set:
    the engine's request may time out meanwhile."""
    acted: int = 0
    """How many of `updates` the fake has acted on."""
    abandoned: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the engine gave up on an update held at `update_gate` (it closed the request's connection)."""
    lose_abandoned: bool = False
    """When set, an update the engine gave up on at `update_gate` is never acted on: it never reached Twilio."""
    parent_sid: str | None = None
    """The call whose `<Dial>` made this one."""
    hung_up_on_answer: bool = False
    """Completed through the API once answered, before its stream opened: it never opens."""
    dials_late: bool = False
    """When set, the calls this call's `<Dial>`s make enter the record (`dialed_calls`) only when the test calls
    `FakeTwilio.record_dials`: Twilio's record behind the stream's `stop`."""
    unrecorded_dials: list[str] = field(default_factory=list)
    """The numbers of its `<Dial>`s made while `dials_late`, not in the record yet."""
    _live: StreamPeer | None = None
    _run_task: asyncio.Task[None] | None = None
    _updates_acted: asyncio.Condition = field(default_factory=asyncio.Condition)
    canceling: bool = False

    def param(self, name: str) -> str | None:
        """The first value of a create parameter, or None."""
        values = self.params.get(name)
        return values[0] if values else None

    @property
    def update_twiml(self) -> str | None:
        """The TwiML of the latest update that carried some."""
        for update in reversed(self.updates):
            if "Twiml" in update:
                return update["Twiml"]
        return None


class FakeTwilio:
    """Twilio's Calls API on 127.0.0.1 with scripted far ends.

    Controls: `behave(number, behaviour)` per destination, `default` for the rest. Observations: `calls` (by
    CallSid), `creates` (create requests per destination number, refused ones included: double dials show here),
    `finished(sid)` to wait for a call's end.
    """

    def __init__(self, *, account_sid: str | None = None, auth_token: str | None = None) -> None:
        """A fake account; requests must authenticate as `account_sid:auth_token`."""
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.auth_token = auth_token or secrets.token_hex(16)
        self.default: Behaviour = Answer()
        self.calls: dict[str, FakeCall] = {}
        self.dialed_calls: dict[str, list[FakeCall]] = {}
        """The calls each call's `<Dial>` made, by the dialing call's CallSid."""
        self.creates: Counter[str] = Counter()
        self.api_base = ""
        self._behaviours: dict[str, Behaviour] = {}
        self._holds: dict[str, HeldCreate] = {}
        self.lookups: list[dict[str, str]] = []
        """The query of every call list request, in order."""
        self.lookup_gate: asyncio.Event | None = None
        """When given, a call list request waits (recorded in `lookups`) until it is set: a Twilio slow to answer."""
        self.lookup_answers: asyncio.Queue[asyncio.Event] | None = None
        """When given, each call list request is answered as the record stood when it came, once the test sets the
        event queued here for it (in the order the requests came)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._exit_stack = contextlib.AsyncExitStack()
        self._http: aiohttp.ClientSession | None = None
        self._sequence = itertools.count()

    def behave(self, number: str, behaviour: Behaviour) -> None:
        """Script what happens when `number` is dialed."""
        self._behaviours[number] = behaviour

    def hold_create(self, number: str) -> HeldCreate:
        """Hold the next create request to `number` until the returned hold is released."""
        hold = HeldCreate()
        self._holds[number] = hold
        return hold

    def calls_to(self, number: str) -> list[FakeCall]:
        """Every call placed to `number`, in creation order."""
        return [call for call in self.calls.values() if call.to == number]

    async def finished(self, sid: str, timeout: float = 120.0) -> FakeCall:
        """Wait until the call has ended (its final status callback posted); return it."""
        call = self.calls[sid]
        await asyncio.wait_for(call.finished.wait(), timeout)
        return call

    async def __aenter__(self) -> Self:
        """Start serving; `api_base` is then the root to give the twilio client."""
        app = web.Application()
        app.router.add_post(f"/{API_VERSION}/Accounts/{{account}}/Calls.json", self._create)
        app.router.add_post(f"/{API_VERSION}/Accounts/{{account}}/Calls/{{sid}}.json", self._update)
        app.router.add_get(f"/{API_VERSION}/Accounts/{{account}}/Calls.json", self._list)
        app.router.add_get(f"/{API_VERSION}/Accounts/{{account}}/Calls/{{sid}}.json", self._fetch)
        self._http = await self._exit_stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        )
        self.api_base = await self._exit_stack.enter_async_context(serve(app))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop every call still running, then the server."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._exit_stack.aclose()

    # ----------------------------------------------------------------------------------------- REST

    def _authenticated(self, request: web.Request) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return request.match_info["account"] == self.account_sid and request.headers.get("Authorization", "") == (
            f"Basic {expected}"
        )

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authenticated(request):
            return _error(401, 20003, "Authenticate")
        form = await request.post()
        params = _multi(form)
        to, from_ = _first(params, "To"), _first(params, "From")
        if not to:
            return _error(400, 21201, "No 'To' number is specified")
        if not from_:
            return _error(400, 21213, "No 'From' number is specified")
        if not _first(params, "Twiml") and not _first(params, "Url"):
            return _error(400, 21205, "Url parameter is required. Please provide a Url or Twiml parameter.")
        hold = self._holds.pop(to, None)
        if hold is not None:
            hold.arrived.set()
            # Shielded: the engine may die while the request is held; what Twilio does then is the test's choice.
            if not await asyncio.shield(hold.decision):
                hold.settled.set()
                return _error(503, 20503, "the request never reached Twilio")  # nobody reads it: the engine is gone
        self.creates[to] += 1
        behaviour = self._behaviours.get(to, self.default)
        if isinstance(behaviour, Refuse):
            if hold is not None:
                hold.settled.set()
            return _error(behaviour.status, behaviour.code, behaviour.message)
        call = FakeCall(sid="CA" + secrets.token_hex(16), to=to, from_=from_, params=params, behaviour=behaviour)
        self.calls[call.sid] = call
        call._run_task = self._spawn(self._run(call), f"fake-twilio-{call.sid}")
        if hold is not None:
            hold.settled.set()
        return web.json_response(self._resource(call), status=201)

    async def _update(self, request: web.Request) -> web.Response:
        if not self._authenticated(request):
            return _error(401, 20003, "Authenticate")
        call = self.calls.get(request.match_info["sid"])
        if call is None:
            return _error(404, 20404, f"The requested resource {request.path} was not found")
        form = await request.post()
        update = {key: str(value) for key, value in form.items()}
        if call.finished.is_set() or call.status in ("completed", "busy", "no-answer", "failed", "canceled"):
            return _error(400, 21220, "Call is not in-progress. Cannot redirect.")
        turn = len(call.updates)
        call.updates.append(update)
        call.updated.set()
        lost = False
        if call.update_gate is not None:
            lost = await _held(request, call.update_gate, call.abandoned) and call.lose_abandoned
        # As Twilio, a call's updates are acted on one at a time, in the order they came.
        async with call._updates_acted:
            await call._updates_acted.wait_for(lambda: call.acted == turn)
            try:
                if not lost:
                    await self._act(call, update)
            finally:
                call.acted += 1
                call._updates_acted.notify_all()
        if call.answer_gate is not None:
            await call.answer_gate.wait()
        return web.json_response(self._resource(call))

    async def _act(self, call: FakeCall, update: Mapping[str, str]) -> None:
        status = update.get("Status")
        if status == "completed":
            for child in self.dialed_calls.get(call.sid, []):
                if child.status == "in-progress":
                    child.status = "completed"  # the whole call ends: the caller is cut off from whom it was dialing
        if status in ("completed", "canceled") and call.answered_at is None:
            self._spawn(self._cancel(call), f"fake-twilio-cancel-{call.sid}")  # not answered yet: canceled
        elif status == "canceled":
            pass  # as Twilio: canceling does not affect a call already answered
        elif status == "completed" and call._live is None:
            call.hung_up_on_answer = True  # answered, its stream not open yet
        elif call._live is not None:
            with contextlib.suppress(Exception):  # the stream may be closing already
                await call._live.hang_up()  # new TwiML (or a hang-up) ends <Connect><Stream>: Twilio sends stop
            dial = dialed(update["Twiml"]) if "Twiml" in update else None
            if dial is not None and call.dials_late:
                call.unrecorded_dials.append(dial.number)
            elif dial is not None:
                self._dial(call, dial.number)

    def record_dials(self, call: FakeCall) -> None:
        """Put the calls `call`'s `<Dial>`s made while it `dials_late` in the record."""
        for number in call.unrecorded_dials:
            self._dial(call, number)
        call.unrecorded_dials.clear()

    def _dial(self, parent: FakeCall, to: str) -> None:
        """The call a `<Dial>` of `parent` makes: answered, and left talking (nothing scripts its far end)."""
        child = FakeCall(
            sid="CA" + secrets.token_hex(16),
            to=to,
            from_=parent.from_,
            params={},
            behaviour=Answer(),
            status="in-progress",
            parent_sid=parent.sid,
        )
        self.dialed_calls.setdefault(parent.sid, []).append(child)

    async def _list(self, request: web.Request) -> web.Response:
        if not self._authenticated(request):
            return _error(401, 20003, "Authenticate")
        query = dict(request.query)
        self.lookups.append(query)
        if self.lookup_gate is not None:
            await self.lookup_gate.wait()
        filters = {"To": "to", "From": "from_", "Status": "status"}
        listed = (
            self.calls.values() if "ParentCallSid" not in query else self.dialed_calls.get(query["ParentCallSid"], [])
        )
        found = [
            call
            for call in listed
            if all(getattr(call, attr) == query[name] for name, attr in filters.items() if name in query)
        ]
        found.sort(key=lambda call: call.created_at, reverse=True)
        size = int(query.get("PageSize", "50"))
        page = _calls_page(request, [self._resource(call) for call in found[:size]], size)
        if self.lookup_answers is not None:
            sent = asyncio.Event()
            self.lookup_answers.put_nowait(sent)
            await sent.wait()
        return page

    async def _fetch(self, request: web.Request) -> web.Response:
        if not self._authenticated(request):
            return _error(401, 20003, "Authenticate")
        call = self.calls.get(request.match_info["sid"])
        if call is None:
            return _error(404, 20404, f"The requested resource {request.path} was not found")
        return web.json_response(self._resource(call))

    def _resource(self, call: FakeCall) -> dict[str, Any]:
        now = format_datetime(datetime.now(UTC), usegmt=True)
        created = format_datetime(call.created_at, usegmt=True)
        return {
            "sid": call.sid,
            "account_sid": self.account_sid,
            "to": call.to,
            "to_formatted": call.to,
            "from": call.from_,
            "from_formatted": call.from_,
            "status": call.status,
            "direction": "outbound-api",
            "api_version": API_VERSION,
            "date_created": created,
            "date_updated": now,
            "start_time": None,
            "end_time": None,
            "duration": None,
            "price": None,
            "price_unit": "USD",
            "answered_by": None,
            "parent_call_sid": call.parent_sid,
            "phone_number_sid": None,
            "caller_name": None,
            "forwarded_from": None,
            "group_sid": None,
            "queue_time": "0",
            "trunk_sid": None,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{call.sid}.json",
            "subresource_uris": {},
        }

    # ----------------------------------------------------------------------------------------- the far end

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _cancel(self, call: FakeCall) -> None:
        """A queued or ringing call hung up through the API: it stops ringing and ends `canceled`."""
        call.canceling = True
        if call._run_task is not None:
            call._run_task.cancel()
            await asyncio.gather(call._run_task, return_exceptions=True)
        try:
            await self._end(call, "canceled")
        finally:
            call.finished.set()

    async def _run(self, call: FakeCall) -> None:
        try:
            await self._post_status(call, "initiated", "initiated")
            await self._post_status(call, "ringing", "ringing")
            match call.behaviour:
                case Busy(ring_ms=ring_ms):
                    await asyncio.sleep(ring_ms / 1000)
                    await self._end(call, "busy", sip=486)
                case NoAnswer(ring_ms=ring_ms, until=until):
                    await (until.wait() if until is not None else asyncio.sleep(ring_ms / 1000))
                    await self._end(call, "no-answer", sip=487)
                case Fail(sip_response_code=sip):
                    await self._end(call, "failed", sip=sip)
                case Answer(ring_ms=ring_ms, until=until):
                    await (until.wait() if until is not None else asyncio.sleep(ring_ms / 1000))
                    await self._answer(call, call.behaviour)
                case Machine(ring_ms=ring_ms):
                    await asyncio.sleep(ring_ms / 1000)
                    await self._answer(call, call.behaviour)
                case Refuse():
                    pass  # refused at creation; never runs
        finally:
            if not call.canceling:  # else set once the cancel's callback is posted
                call.finished.set()

    async def _answer(self, call: FakeCall, behaviour: Answer | Machine) -> None:
        if isinstance(behaviour, Machine):
            greeting: str | None = behaviour.greeting
            script: Sequence[Step] = [Pause(int(behaviour.record_s * 1000))]
            timeout_s, answered_by = behaviour.record_s + 30, behaviour.answered_by
        else:
            greeting, script, timeout_s, answered_by = (
                behaviour.greeting,
                behaviour.script,
                behaviour.timeout_s,
                "human",
            )
        call.answered_at = time.monotonic()
        await self._post_status(call, "answered", "in-progress")
        if call.hung_up_on_answer:  # the engine hung up as the answer was posted: Twilio connects nothing
            await self._end(call, "completed")
            return
        twiml = _first(call.params, "Twiml") or ""
        parsed = parse_twiml(twiml, self.api_base)
        if parsed.stream_url is None:
            call.spoken_after_update.append(parsed.refusal or "")
            await self._end(call, "completed")
            return
        result = CallResult(call_sid=call.sid, account_sid=self.account_sid, stream_sid="MZ" + secrets.token_hex(16))
        result.stream_url = parsed.stream_url
        result.custom_parameters = parsed.parameters
        call.stream = result
        headers = {"X-Twilio-Signature": request_signature(self.auth_token, parsed.stream_url, {})}
        assert self._http is not None
        async with self._http.ws_connect(parsed.stream_url, headers=headers, autoping=True, heartbeat=None) as ws:
            live = StreamPeer(ws, result, time.monotonic(), None, reply_timeout_s=10.0)
            call._live = live
            verdict = None
            if greeting:
                audio = await synthesize_speech(greeting, "en-us")
                spoken = asyncio.create_task(live.speak(audio, greeting))
                if isinstance(behaviour, Machine):
                    verdict = asyncio.create_task(self._verdict_after(call, spoken, answered_by))
            if isinstance(behaviour, Answer) and verdict is None:
                verdict = asyncio.create_task(self._verdict_later(call, behaviour.verdict_after_ms, answered_by))
            try:
                await run_stream(live, script, timeout_s)
            finally:
                call._live = None
                if verdict is not None:
                    if call.amd_posted is None:
                        verdict.cancel()  # not posted yet: the call ended first
                    await asyncio.gather(verdict, return_exceptions=True)  # a posted verdict gets its answer
        for update in call.updates:
            with contextlib.suppress(ET.ParseError):
                call.spoken_after_update.extend(_said(update.get("Twiml", "")))
        await self._end(call, "completed")

    async def _verdict_after(self, call: FakeCall, spoken: asyncio.Task[None], answered_by: str) -> None:
        await spoken  # the greeting ends with the beep; DetectMessageEnd answers then
        await self._post_amd(call, answered_by)

    async def _verdict_later(self, call: FakeCall, after_ms: int, answered_by: str) -> None:
        await asyncio.sleep(after_ms / 1000)
        await self._post_amd(call, answered_by)

    async def _post_amd(self, call: FakeCall, answered_by: str) -> None:
        url = _first(call.params, "AsyncAmdStatusCallback")
        if not call.param("MachineDetection") or _first(call.params, "AsyncAmd") != "true" or not url:
            return
        call.amd_posted = answered_by
        elapsed = int((time.monotonic() - (call.answered_at or time.monotonic())) * 1000)
        fields = {
            "AccountSid": self.account_sid,
            "CallSid": call.sid,
            "AnsweredBy": answered_by,
            "MachineDetectionDuration": str(elapsed),
        }
        await self._post(url, fields)

    async def _end(self, call: FakeCall, status: str, *, sip: int | None = None) -> None:
        if call.answered_at is not None:
            call.duration_s = max(round(time.monotonic() - call.answered_at), 1)
        extra = {"CallDuration": str(call.duration_s), "Duration": str((call.duration_s + 59) // 60)}
        if sip is not None:
            extra["SipResponseCode"] = str(sip)
        await self._post_status(call, "completed", status, extra)

    async def _post_status(
        self, call: FakeCall, event: str, status: str, extra: Mapping[str, str] | None = None
    ) -> None:
        call.status = status
        url = _first(call.params, "StatusCallback")
        subscribed = call.params.get("StatusCallbackEvent") or ["completed"]
        if not url or event not in subscribed:
            return
        fields = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call.sid,
            "CallStatus": status,
            "CallbackSource": "call-progress-events",
            "Called": call.to,
            "Caller": call.from_,
            "Direction": "outbound-api",
            "From": call.from_,
            "SequenceNumber": str(len(call.statuses_posted)),
            "Timestamp": format_datetime(datetime.now(UTC), usegmt=True),
            "To": call.to,
            **(extra or {}),
        }
        call.statuses_posted.append(status)
        call.callback_responses.append(await self._post(url, fields))

    async def _post(self, url: str, fields: dict[str, str]) -> int:
        assert self._http is not None
        headers = {"X-Twilio-Signature": request_signature(self.auth_token, url, fields)}
        try:
            async with self._http.post(url, data=fields, headers=headers) as response:
                return response.status
        except aiohttp.ClientError:
            return 0


async def _held(request: web.Request, gate: asyncio.Event, abandoned: asyncio.Event) -> bool:
    """Wait for `gate`; set `abandoned` if the client gives up on the request meanwhile (its connection closes), and
    then return True."""
    while not gate.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            abandoned.set()
            await gate.wait()
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gate.wait(), 0.05)
    return False


def _calls_page(request: web.Request, calls: list[dict[str, Any]], size: int) -> web.Response:
    """The first (only) page of a calls list request, holding `calls` (at most `size`)."""
    uri = f"/{API_VERSION}/Accounts/{request.match_info['account']}/Calls.json"
    page = {
        "calls": calls,
        "start": 0,
        "end": max(0, len(calls) - 1),
        "page": 0,
        "page_size": size,
        "first_page_uri": f"{uri}?PageSize={size}&Page=0",
        "next_page_uri": None,
        "previous_page_uri": None,
        "uri": request.path_qs,
    }
    return web.json_response(page)


def _multi(form: MultiDictProxy[Any]) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for key, value in form.items():
        params.setdefault(key, []).append(str(value))
    return params


def _first(params: Mapping[str, list[str]], name: str) -> str:
    values = params.get(name)
    return values[0] if values else ""


@dataclass(frozen=True, slots=True)
class Dialed:
    """What a transfer's TwiML tells Twilio to dial: the number, the leg's time limit and its action URL."""

    number: str
    time_limit_seconds: int | None
    action: str | None


def dialed(twiml: str) -> Dialed | None:
    """The `<Dial><Number>` of TwiML sent in a call update, or None when it dials nothing."""
    dial = ET.fromstring(twiml).find("Dial")  # noqa: S314 - the engine under test wrote it
    number = dial.find("Number") if dial is not None else None
    if dial is None or number is None or not number.text:
        return None
    limit = dial.get("timeLimit")
    return Dialed(number.text, int(limit) if limit is not None else None, dial.get("action"))


def dialed_number(twiml: str) -> str | None:
    """The number a transfer's TwiML dials, or None."""
    dial = dialed(twiml)
    return dial.number if dial is not None else None


def _said(twiml: str) -> list[str]:
    """What a TwiML document would speak: the text of its <Say> verbs, in order."""
    if not twiml:
        return []
    root = ET.fromstring(twiml)  # noqa: S314 - the engine under test wrote it
    return [(say.text or "").strip() for say in root.iter("Say")]


def _error(status: int, code: int, message: str) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status)


@contextlib.asynccontextmanager
async def call_updates(
    *, refuse: Refuse | None = None, unanswered: asyncio.Event | None = None
) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """Twilio's REST API for updates of calls it did not place (the simulator's): yields its base URL and the list
    of updates, each the call's `sid` and the form posted (`Twiml`, `Status`); the stream is left as it is.
    With `refuse`, every update is recorded and answered with that error instead; with `unanswered`, every update is
    recorded and its answer held until it is set (the engine gives up on it first). The calls list shows no call."""
    updates: list[dict[str, str]] = []

    async def update_call(request: web.Request) -> web.Response:
        form = await request.post()
        updates.append({"sid": request.match_info["call_sid"], **{k: str(v) for k, v in form.items()}})
        if unanswered is not None:
            await unanswered.wait()
        if refuse is not None:
            return _error(refuse.status, refuse.code, refuse.message)
        return web.json_response({"sid": request.match_info["call_sid"], "status": "in-progress"})

    async def list_calls(request: web.Request) -> web.Response:
        return _calls_page(request, [], int(request.query.get("PageSize", "50")))

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{call_sid}.json", update_call)
    app.router.add_get("/2010-04-01/Accounts/{account}/Calls.json", list_calls)
    async with serve(app) as base:
        yield base, updates
