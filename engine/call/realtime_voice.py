"""A speech-to-speech model's voice on its way to the caller: its responses and their items, each item one
utterance played in order with marks, cut where the caller stopped hearing it (as the clear says), its turn settled
with what was heard.

The model's audio is queued per item to a player task that paces it to Twilio, so reading the model's events
never waits on playback. Telling the model about a cut (cancel, truncate) is the driver's: this module only knows
the call's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from engine.call.driver import HANGUP_GRACE_SECONDS, CallHost
from engine.call.outbound_audio import heard_of_cut
from engine.call.turns import Turn
from media.g711 import BYTES_PER_MS
from media.twilio_stream import MarkFlushed, MarkPlayed
from pipelines.conversation.heard import share_of_words

log = logging.getLogger(__name__)

RESPONSE_GRACE_SECONDS = 10.0
"""How long an ending waits for the model to finish the response it is speaking (or to start the goodbye)."""


@dataclass(slots=True)
class ModelResponse:
    """One response of the model, and what the driver still owes it (function outputs)."""

    response_id: str
    reply_to: float | None  # clock time the caller stopped speaking, for latency
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    spoke: bool = False
    items: list[AgentItem] = field(default_factory=list)
    outputs: list[tuple[str, Callable[[], Awaitable[str]]]] = field(default_factory=list)


@dataclass(slots=True)
class AgentItem:
    """One thing the agent says, played as one utterance: an assistant item's audio, or tones the engine plays."""

    utterance_id: int
    item_id: str | None  # None for tones the engine plays itself (no conversation item to truncate)
    response: ModelResponse | None
    turn: Turn
    transcript: list[str] = field(default_factory=list)
    transcript_done: bool = False
    received_bytes: int = 0
    first_delta_at: float | None = None
    first_mark_at: float | None = None
    started_stream_ms: int | None = None
    end_queued: bool = False
    played_through: bool = False
    cancelled: bool = False
    closed: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # played through, or cut

    @property
    def received_ms(self) -> int:
        """Milliseconds of the item's audio received from the model."""
        return self.received_bytes // BYTES_PER_MS

    def text(self) -> str:
        """The item's transcript so far."""
        return "".join(self.transcript).strip()

    def heard_text(self, played_ms: int) -> str:
        """The words heard when playback stopped at `played_ms`: the transcript's share of the audio played."""
        if self.item_id is None:  # tones: heard or not
            return self.text() if played_ms > 0 else ""
        return share_of_words(self.text(), played_ms, self.received_ms)


@dataclass(frozen=True, slots=True)
class Cut:
    """What a cut stopped: the responses still generating, and each item cut with the milliseconds heard of it."""

    responses: list[ModelResponse]
    items: list[tuple[AgentItem, int]]


class ModelVoice:
    """The model's responses and items in one call, and the player that sends their audio to Twilio."""

    def __init__(self, host: CallHost, *, on_idle: Callable[[], None]) -> None:
        """Play in `host`'s call; `on_idle` is called whenever something the agent said was settled."""
        self._host = host
        self._on_idle = on_idle
        self._responses: dict[str, ModelResponse] = {}
        self.open_responses: dict[str, ModelResponse] = {}
        self._items: dict[str, AgentItem] = {}  # by assistant item id
        self._utterances: dict[int, AgentItem] = {}
        self.unplayed: dict[int, AgentItem] = {}  # audio still to be heard, by utterance id
        self._queue: asyncio.Queue[tuple[AgentItem, bytes | None]] = asyncio.Queue()
        self._player: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------ the model

    def response(self, response_id: str) -> ModelResponse:
        """The response with that id (one the server has not announced is made up as it is referred to)."""
        response = self._responses.get(response_id)
        if response is None:
            response = self._responses[response_id] = ModelResponse(response_id, None)
        return response

    def created(self, response_id: str, reply_to: float | None) -> ModelResponse:
        """The model started a response (answering a caller who stopped speaking at `reply_to`)."""
        response = self._responses[response_id] = ModelResponse(response_id, reply_to)
        self.open_responses[response_id] = response
        return response

    def item_added(self, response_id: str, item_id: str) -> None:
        """A message item of a response: its turn takes its place in the conversation now."""
        response = self.response(response_id)
        if not response.cancelled and item_id not in self._items:
            self._new_item(item_id, response)

    def audio(self, response_id: str, item_id: str, audio: bytes) -> None:
        """Queue a chunk of the model's voice for the player; audio of a cut response is dropped."""
        response = self.response(response_id)
        if response.cancelled:
            return
        item = self._items.get(item_id) or self._new_item(item_id, response)
        if item.cancelled or not audio:
            return
        if item.first_delta_at is None:
            item.first_delta_at = self._host.clock()
        response.spoke = True
        item.received_bytes += len(audio)
        self._queue.put_nowait((item, audio))

    def transcript_delta(self, item_id: str, delta: str) -> None:
        """More of an item's transcript."""
        item = self._items.get(item_id)
        if item is not None and not item.transcript_done:
            item.transcript.append(delta)

    def transcript_done(self, item_id: str, transcript: str) -> None:
        """An item's whole transcript."""
        item = self._items.get(item_id)
        if item is not None:
            item.transcript = [transcript]
            item.transcript_done = True
            if not item.closed and not item.cancelled:
                self._host.turns.speaking(item.text(), item.turn)
            self._close_if_heard(item)

    def audio_done(self, item_id: str) -> None:
        """An item's audio is complete."""
        item = self._items.get(item_id)
        if item is not None:
            self._end_item(item)

    def response_done(self, response: ModelResponse) -> None:
        """A response is over: what came of its items is all there will be."""
        self.open_responses.pop(response.response_id, None)
        for item in response.items:
            item.transcript_done = True
            self._end_item(item)
            self._close_if_heard(item)
        response.done.set()

    def tones(self, digits: str, tones: bytes) -> None:
        """Play touch tones as an item of their own (Twilio's stream has no other way to send them)."""
        item = self._new_item(None, None)
        item.transcript = [f"[DTMF {digits}]"]
        item.transcript_done = True
        item.received_bytes = len(tones)
        self._queue.put_nowait((item, tones))
        self._end_item(item)

    def on_mark(self, event: MarkPlayed | MarkFlushed) -> None:
        """A played mark: the item is being heard; its final one: heard through."""
        item = self._utterances.get(event.utterance_id)
        if item is None or item.cancelled or not isinstance(event, MarkPlayed):
            return  # a cut item's turn is settled by the cut, from what the clear dropped of it
        if item.first_mark_at is None:
            item.first_mark_at = self._host.clock()
        if event.final:
            self._played_through(item)

    @property
    def speaking(self) -> bool:
        """Whether the model is generating, or its audio is still to be heard."""
        return bool(self.open_responses or self.unplayed)

    # ------------------------------------------------------------------------------------------ playback

    def start_player(self) -> None:
        """Start sending queued audio (again, after a lost connection: whatever was queued is dropped)."""
        self._queue = asyncio.Queue()
        self._player = self._host.spawn(self._play(self._queue), "player")

    async def _play(self, queue: asyncio.Queue[tuple[AgentItem, bytes | None]]) -> None:
        """Send queued agent audio to Twilio, paced, item after item; `None` ends an item with its final mark."""
        audio_out, playback = self._host.audio, self._host.playback
        while True:
            item, audio = await queue.get()
            if item.cancelled:
                continue
            if audio is None:
                if playback.utterance(item.utterance_id).sent_ms:
                    await audio_out.finish(item.utterance_id)
                else:
                    self._played_through(item)
                continue
            if item.started_stream_ms is None:
                item.started_stream_ms = self._host.timeline.stream_ms()
            await audio_out.play(item.utterance_id, audio)

    async def cut(self) -> Cut:
        """Stop everything the agent is saying: drop what is queued, clear Twilio, settle each item's turn with
        what the caller heard of it (up to where the clear cut the recording). The driver tells the model."""
        responses = list(self.open_responses.values())
        items = list(self.unplayed.values())
        # Marked first, before any await: deltas still arriving for these are dropped from here on.
        for response in responses:
            response.cancelled = True
            self.open_responses.pop(response.response_id, None)
            response.done.set()
        for item in items:
            item.cancelled = True
            self.unplayed.pop(item.utterance_id, None)
            item.finished.set()
        old = self._player
        if old is not None and old is not asyncio.current_task():
            old.cancel()
            await asyncio.wait({old})
        self.start_player()
        playback = self._host.playback
        sent = [playback.utterance(item.utterance_id) for item in items]
        dropped = await self._host.audio.clear() if any(s.sent_ms for s in sent) else {}
        # What the recording and the listen-in keep of each item, and all the model may keep of it.
        heard = [(i, heard_of_cut(dropped, s, at_most=i.received_ms)) for i, s in zip(items, sent, strict=True)]
        for item, heard_ms in heard:
            self._close(item, interrupted=True, played_ms=heard_ms)
        return Cut(responses, heard)

    async def finished(self, response: ModelResponse) -> None:
        """Wait (bounded) until `response` is done and every word queued so far has been heard."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(response.done.wait(), timeout=RESPONSE_GRACE_SECONDS)
        pending = list(self.unplayed.values())
        if not pending:
            return
        playback = self._host.playback
        remaining_ms = sum(max(0, i.received_ms - playback.utterance(i.utterance_id).played_ms) for i in pending)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(item.finished.wait() for item in pending)),
                timeout=remaining_ms / 1000 + HANGUP_GRACE_SECONDS,
            )

    async def quiet(self) -> None:
        """Return once no response is generating and everything queued was heard or cut."""
        while self.speaking:
            waits = [asyncio.ensure_future(r.done.wait()) for r in self.open_responses.values()]
            waits += [asyncio.ensure_future(item.finished.wait()) for item in self.unplayed.values()]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    def close_all(self) -> None:
        """At the end of the call: settle every item not settled yet, with what was heard of it."""
        playback = self._host.playback
        for item in list(self._utterances.values()):
            if not item.closed:
                played = min(playback.utterance(item.utterance_id).played_ms, item.received_ms)
                self._close(item, interrupted=not item.played_through, played_ms=played)

    # ------------------------------------------------------------------------------------------ turns

    def _new_item(self, item_id: str | None, response: ModelResponse | None) -> AgentItem:
        turn = self._host.turns.place("agent")
        item = AgentItem(self._host.next_utterance_id(), item_id, response, turn)
        if item_id is not None:
            self._items[item_id] = item
        if response is not None:
            response.items.append(item)
        self._utterances[item.utterance_id] = item
        self.unplayed[item.utterance_id] = item
        return item

    def _end_item(self, item: AgentItem) -> None:
        """Queue the end of an item's audio: the player sends its final mark after the last chunk."""
        if not item.end_queued and not item.cancelled:
            item.end_queued = True
            self._queue.put_nowait((item, None))

    def _played_through(self, item: AgentItem) -> None:
        item.played_through = True
        self.unplayed.pop(item.utterance_id, None)
        item.finished.set()
        self._host.activity()
        self._close_if_heard(item)
        self._on_idle()

    def _close_if_heard(self, item: AgentItem) -> None:
        if item.played_through and item.transcript_done:
            self._close(item, interrupted=False)

    def _close(self, item: AgentItem, *, interrupted: bool, played_ms: int = 0) -> None:
        """Settle an agent item's turn: what was heard of it, when, and how long the caller waited for it."""
        if item.closed:
            return
        item.closed = True
        item.finished.set()
        turns, turn = self._host.turns, item.turn
        sent_ms = self._host.playback.utterance(item.utterance_id).sent_ms
        if not sent_ms:
            turns.drop(turn)  # nothing reached the caller
            return
        heard_ms = played_ms if interrupted else sent_ms
        turn.start_ms = item.started_stream_ms or 0
        turn.end_ms = turn.start_ms + heard_ms
        turn.interrupted = interrupted
        response = item.response
        if response is not None and response.reply_to is not None:
            stages = {
                "modelFirstAudio": item.first_delta_at,
                "firstFrameSent": self._host.audio.first_audio_at.get(item.utterance_id),
                "firstMarkEchoed": item.first_mark_at,
            }
            turns.time(turn, response.reply_to, stages)
            if turn.latency is not None:
                response.reply_to = None  # one latency per response: its first item
        turns.settle(turn, item.heard_text(played_ms) if interrupted else item.text(), said=item.text())
