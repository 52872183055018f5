"""Listen-in: a call's two sides in 100 ms chunks, placed on the call's timeline like its recording, for listeners.

The session and its outbound audio write to the tap where they write to the recording (caller frames at Twilio's
timestamps, agent audio where the playback clock puts it). With no listener a caller frame costs one flag check
and nothing else; an agent chunk (one every 100 ms) is only kept among the last few sent, because the agent's
audio goes out up to 400 ms ahead of playback: a listener who joins mid-reply starts with the part still to be
heard, as the caller hears it. A chunk goes out once the caller's audio has run a chunk past its end, by when the
agent's audio for it has been placed. Twilio sends caller frames without pause, so they pace the chunks. Listeners take
chunks without waiting; one that cannot keep up is dropped. Agent audio Twilio was told to throw away (a barge-in's
`clear`) is taken back before any listener hears it: `drop_agent_from`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Final, Protocol

from media.g711 import BYTES_PER_MS, ULAW_SILENCE
from media.recording import LEAD_MS

CHUNK_MS: Final = 100
"""Audio per chunk."""
CHUNK_BYTES: Final = CHUNK_MS * BYTES_PER_MS
"""μ-law samples per channel in a chunk (800)."""
_LAG_BYTES: Final = CHUNK_BYTES
"""How far the caller's audio runs past a chunk before it goes out: the agent's audio for it is placed by then."""
_AHEAD_BYTES: Final = LEAD_MS * BYTES_PER_MS
"""Agent audio placed further than this past the caller's audio is dropped, as the recording drops it."""
SILENT_CHUNK: Final = bytes([ULAW_SILENCE]) * CHUNK_BYTES
RECENT_AGENT_CHUNKS: Final = 8
"""Agent chunks kept for a listener who joins: more than the outbound audio's lead (400 ms) in its 100 ms chunks."""

CALL_ENDED: Final = "call ended"
LISTENER_TOO_SLOW: Final = "listener too slow"
NODE_LOST: Final = "holding node lost"


@dataclass(frozen=True, slots=True)
class TapChunk:
    """100 ms of both sides: `sequence` numbers it on the call's timeline (it starts at sequence times 100 ms)."""

    sequence: int
    caller: bytes
    agent: bytes


class TapListener(Protocol):
    """Something that hears a call's chunks; it must never wait."""

    def hear(self, chunk: TapChunk) -> bool:
        """Take a chunk; False when the listener is gone (too slow, closed) and wants no more."""
        ...

    def end(self, reason: str) -> None:
        """No chunk follows, for `reason` (CALL_ENDED, NODE_LOST...)."""
        ...


class AudioTap:
    """One call's audio for its listeners; `listening` is the only thing the audio path looks at otherwise."""

    def __init__(self) -> None:
        """A tap nobody listens to."""
        self.listening = False
        self._listeners: list[TapListener] = []
        self._closed: str | None = None  # why the call's audio ended, once it has
        self._recent: deque[tuple[int, bytes]] = deque(maxlen=RECENT_AGENT_CHUNKS)  # agent audio, where it plays
        self._reset()

    def _reset(self) -> None:
        self._base: int | None = None  # the timeline sample the next chunk starts at, once caller audio came
        self._caller = bytearray()  # from _base on
        self._agent = bytearray()
        self._caller_end = 0  # one past the newest caller sample

    def add(self, listener: TapListener) -> None:
        """Send the call's chunks to `listener` from the next one on (none once the call has ended: it hears so)."""
        if self._closed is not None:
            listener.end(self._closed)
            return
        self._listeners.append(listener)
        self.listening = True

    def remove(self, listener: TapListener) -> None:
        """Send `listener` nothing more; the last one leaving makes the tap idle again."""
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners:
            self.listening = False
            self._reset()

    def write_caller(self, ulaw: bytes, at_ms: int) -> None:
        """Caller μ-law audio at `at_ms` of the call; chunks it completes go out."""
        position = at_ms * BYTES_PER_MS
        starting = self._base is None
        if starting:
            self._base = position - position % CHUNK_BYTES
        self._place(self._caller, ulaw, position)
        self._caller_end = max(self._caller_end, position + len(ulaw))
        if starting:  # the timeline begins: the agent's audio already sent, still to be heard, is placed on it
            for agent_at_ms, agent_ulaw in self._recent:
                self._place_agent(agent_ulaw, agent_at_ms)
        while self._due(_LAG_BYTES):  # the last listener may leave (too slow) as a chunk goes out
            self._send_chunk()

    def write_agent(self, ulaw: bytes, at_ms: int) -> None:
        """Agent μ-law audio at `at_ms` of the call (where the caller hears it); kept among the last few sent even
        while nobody listens."""
        self._recent.append((at_ms, ulaw))
        if self._base is not None:  # (the timeline starts with the first caller frame heard)
            self._place_agent(ulaw, at_ms)

    def drop_agent_from(self, at_ms: int) -> None:
        """Take back the agent audio placed from `at_ms` of the call on: Twilio threw it away unplayed (a barge-in's
        `clear`), so no listener hears it, whether listening now or joining later.

        None of it has gone out yet when `at_ms` is where the caller's playback had reached: a chunk goes out only
        once the caller's audio has run a chunk past its end, and the caller's audio is never ahead of playback.
        """
        position = at_ms * BYTES_PER_MS
        kept = [(start_ms, ulaw[: max(0, position - start_ms * BYTES_PER_MS)]) for start_ms, ulaw in self._recent]
        self._recent = deque(((start_ms, ulaw) for start_ms, ulaw in kept if ulaw), maxlen=RECENT_AGENT_CHUNKS)
        if self._base is not None:
            del self._agent[max(0, position - self._base) :]

    def close(self, reason: str = CALL_ENDED) -> None:
        """The call is over: send the whole chunks the caller's audio reached, then tell every listener `reason`."""
        while self._due(0):
            self._send_chunk()
        self._closed = reason
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.end(reason)
        self.listening = False
        self._reset()

    def _due(self, lag: int) -> bool:
        """Whether the caller's audio has run `lag` samples past the end of the next chunk."""
        return self._base is not None and self._caller_end - self._base >= CHUNK_BYTES + lag

    def _place_agent(self, ulaw: bytes, at_ms: int) -> None:
        position = at_ms * BYTES_PER_MS
        kept = ulaw[: max(0, self._caller_end + _AHEAD_BYTES - position)]
        if kept:
            self._place(self._agent, kept, position)

    def _place(self, channel: bytearray, ulaw: bytes, position: int) -> None:
        assert self._base is not None
        offset = position - self._base
        if offset < 0:  # for a chunk already sent
            ulaw = ulaw[-offset:]
            offset = 0
        end = offset + len(ulaw)
        if end > len(channel):
            channel.extend(SILENT_CHUNK[:1] * (end - len(channel)))
        channel[offset:end] = ulaw

    def _send_chunk(self) -> None:
        assert self._base is not None
        chunk = TapChunk(self._base // CHUNK_BYTES, _take(self._caller), _take(self._agent))
        self._base += CHUNK_BYTES
        for listener in list(self._listeners):
            if not listener.hear(chunk):
                self.remove(listener)


def _take(channel: bytearray) -> bytes:
    """The channel's first chunk (padded with silence), taken off it."""
    taken = bytes(channel[:CHUNK_BYTES])
    del channel[:CHUNK_BYTES]
    return taken + SILENT_CHUNK[len(taken) :]


class ListenerQueue:
    """A listener's bounded buffer between the call and its socket: the call never waits, a full buffer ends it."""

    def __init__(self, capacity: int) -> None:
        """Hold up to `capacity` chunks."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._chunks: deque[TapChunk] = deque()
        self._changed = asyncio.Event()
        self.ended: str | None = None
        """Why no more chunks come, once they stop."""
        self.dropped = asyncio.Event()
        """Set when the listener fell too far behind: its socket is to be closed at once."""

    def hear(self, chunk: TapChunk) -> bool:
        """Queue a chunk; a full queue ends the listener (LISTENER_TOO_SLOW)."""
        if self.ended is not None:
            return False
        if len(self._chunks) >= self._capacity:
            self._chunks.clear()
            self.end(LISTENER_TOO_SLOW)
            self.dropped.set()
            return False
        self._chunks.append(chunk)
        self._changed.set()
        return True

    def end(self, reason: str) -> None:
        """No more chunks; those queued are still read (unless the listener was too slow)."""
        if self.ended is None:
            self.ended = reason
            self._changed.set()

    async def next(self) -> TapChunk | None:
        """The next chunk, waiting for it; None once the queue has ended and is empty."""
        while not self._chunks:
            if self.ended is not None:
                return None
            self._changed.clear()
            await self._changed.wait()
        return self._chunks.popleft()
