"""The agent's voice on its way out: paced a little ahead of real time to Twilio, with marks, and recorded.

Twilio buffers whatever it is sent and plays it in order, so audio could go out all at once; pacing it at most
`lead_ms` ahead instead keeps Twilio's buffer (and what a `clear` throws away) short, and puts the agent's audio
in the recording where the caller will hear it. Once that far ahead, sending waits until only `resume_ms` is left,
then sends what came meanwhile: one wait per two chunks rather than one per chunk. A chunk is at most `chunk_ms`
(200 ms, so a buffer on the way out is at most 600 ms): Twilio takes any size, and each message costs a send, a
write and the recording's bookkeeping whatever its length. Marks after an utterance's first chunk, every
`mark_every_ms`, where each wait begins (so while sending is ahead, a mark waits in Twilio's buffer for a `clear` to
flush) and at its end let the PlaybackClock say when the caller began hearing it and how much they heard. A `clear`
takes what it throws away back out of the recording and the listen-in tap, and says how much of each utterance that
was: the one cut point for the recording, the listen-in and what the caller heard (`heard_of_cut`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from engine.call.audio_tap import AudioTap
from media.g711 import BYTES_PER_MS
from media.recording import StereoWavRecorder
from media.twilio_stream import TwilioStream, UtterancePlayback
from pipelines.loop_waits import LoopSleep

SendText = Callable[[str], Awaitable[None]]

log = logging.getLogger(__name__)


class StreamTimeline:
    """Maps the engine's monotonic clock onto the stream's own milliseconds (Twilio's media timestamps)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Start the timeline at the present moment."""
        self._clock = clock
        self._origin = clock()

    def observe(self, timestamp_ms: int, now: float | None = None) -> None:
        """A caller frame stamped `timestamp_ms` arrived `now` (by default, now); frames delayed in transit never
        move the origin later."""
        origin = (self._clock() if now is None else now) - timestamp_ms / 1000
        self._origin = min(self._origin, origin)

    def stream_ms(self, at: float | None = None) -> int:
        """The stream time of a monotonic instant (now by default)."""
        return max(0, round(((self._clock() if at is None else at) - self._origin) * 1000))


@dataclass(frozen=True, slots=True)
class _Placed:
    """A chunk sent, where the caller hears it on the stream's timeline."""

    utterance_id: int
    at_ms: int
    size: int  # bytes

    @property
    def end_ms(self) -> int:
        return self.at_ms + self.size // BYTES_PER_MS


class OutboundAudio:
    """Sends one call's agent audio: paced, chunked, marked, and written to the recording's agent channel and to
    the listen-in tap (which keeps the last few chunks even while nobody listens)."""

    def __init__(
        self,
        stream: TwilioStream,
        send: SendText,
        timeline: StreamTimeline,
        recorder: StereoWavRecorder | None = None,
        tap: AudioTap | None = None,
        *,
        lead_ms: int = 400,
        resume_ms: int = 200,
        chunk_ms: int = 200,
        mark_every_ms: int = 500,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        """Prepare to send through `send`, the text frames of `stream`'s protocol."""
        if not 0 <= resume_ms <= lead_ms:
            raise ValueError(f"resume_ms must be between 0 and lead_ms ({lead_ms}), got {resume_ms}")
        if recorder is not None and recorder.window_ms // 2 < lead_ms + chunk_ms:
            # A clear takes back audio up to lead_ms + chunk_ms ahead of playback: the recording's window must still
            # hold it, and it keeps at least half a window behind its newest audio.
            raise ValueError(
                f"the recording's window_ms ({recorder.window_ms}) must be at least twice lead_ms + chunk_ms "
                f"({lead_ms + chunk_ms})"
            )
        self._stream = stream
        self._send = send
        self._timeline = timeline
        self._recorder = recorder
        self._tap = tap
        self._lead = lead_ms / 1000
        self._resume = resume_ms / 1000
        self._sleep = sleep if sleep is not None else LoopSleep()
        self._chunk_bytes = chunk_ms * BYTES_PER_MS
        self._mark_every_bytes = mark_every_ms * BYTES_PER_MS
        self._clock = clock
        self._cursor = clock()  # when the audio sent so far will have finished playing
        self._since_mark: dict[int, int] = {}
        self._unplayed: deque[_Placed] = deque()  # chunks sent that the caller may not have heard yet, in order
        self.first_audio_at: dict[int, float] = {}

    @property
    def queued_ms(self) -> int:
        """Audio sent that Twilio has probably not played yet, by the clock (marks give the exact figure)."""
        return max(0, round((self._cursor - self._clock()) * 1000))

    async def play(self, utterance_id: int, audio: bytes) -> None:
        """Send audio of one utterance, waiting only as needed to stay at most `lead_ms` ahead of playback."""
        view = memoryview(audio)
        for offset in range(0, len(view), self._chunk_bytes):
            chunk = bytes(view[offset : offset + self._chunk_bytes])
            now = self._clock()
            self._cursor = max(self._cursor, now)
            ahead = self._cursor - now
            if ahead > self._lead:
                if self._since_mark.get(utterance_id):  # audio sent since the last mark: mark where the wait begins
                    await self._send(self._stream.send_mark(utterance_id))
                    self._since_mark[utterance_id] = 0
                await self._sleep(ahead - self._resume)
            self.first_audio_at.setdefault(utterance_id, self._clock())
            # Counted sent, placed and recorded with no await between: a cut meanwhile finds every chunk it must drop.
            media = self._stream.send_media(chunk, utterance_id)
            heard_at_ms = self._timeline.stream_ms(self._cursor)  # where the caller hears it
            self._place(_Placed(utterance_id, heard_at_ms, len(chunk)))
            if self._recorder is not None:
                self._recorder.write_agent(chunk, heard_at_ms)
            if self._tap is not None:  # kept even with nobody listening: a listener may join before it plays
                self._tap.write_agent(chunk, heard_at_ms)
            await self._send(media)
            self._cursor += len(chunk) / BYTES_PER_MS / 1000
            first = utterance_id not in self._since_mark
            sent = self._since_mark.get(utterance_id, 0) + len(chunk)
            if first or sent >= self._mark_every_bytes:  # the first mark's echo: the caller hears the agent
                await self._send(self._stream.send_mark(utterance_id))
                sent = 0
            self._since_mark[utterance_id] = sent

    async def finish(self, utterance_id: int) -> None:
        """Mark the end of an utterance; its echo says the caller heard all of it."""
        self._since_mark.pop(utterance_id, None)
        await self._send(self._stream.send_mark(utterance_id, final=True))

    def _place(self, placed: _Placed) -> None:
        """Keep the chunk until the caller has heard it; forget the chunks they have heard by now."""
        played_to_ms = self._timeline.stream_ms(self._clock())
        while self._unplayed and self._unplayed[0].end_ms <= played_to_ms:
            self._unplayed.popleft()
        self._unplayed.append(placed)

    async def clear(self) -> dict[int, int]:
        """Drop whatever Twilio has not played yet (barge-in): `cut`, then tell Twilio (`send_clear`).

        Returns the milliseconds dropped of each utterance that lost audio, as `cut` does.
        """
        dropped = self.cut()
        await self.send_clear()
        return dropped

    def cut(self) -> dict[int, int]:
        """Cut the agent's audio where the caller's playback has reached now: the recording and the listen-in tap
        lose what follows (nobody heard it), and pacing starts over. `send_clear` must follow, before more audio.

        Returns the milliseconds dropped of each utterance that lost audio: the caller heard the rest of what was
        sent of it (`heard_of_cut`: what a cut transcript or a truncated model item must keep).
        """
        now = self._clock()
        heard_to_ms = self._timeline.stream_ms(now)
        self._cursor = now
        self._since_mark.clear()
        dropped: dict[int, int] = {}
        for placed in self._unplayed:
            unheard_ms = min(placed.end_ms - heard_to_ms, placed.size // BYTES_PER_MS)
            if unheard_ms > 0:
                dropped[placed.utterance_id] = dropped.get(placed.utterance_id, 0) + unheard_ms
        self._unplayed.clear()
        if self._recorder is not None:
            kept_ms = self._recorder.drop_agent_from(heard_to_ms)
            if kept_ms:  # the window check in __init__ keeps this from happening; if it did, say so
                log.warning("recording %s keeps %d ms of agent audio a clear dropped", self._recorder.path, kept_ms)
        if self._tap is not None:
            self._tap.drop_agent_from(heard_to_ms)
        return dropped

    async def send_clear(self) -> None:
        """Tell Twilio to drop whatever it has not played yet; pending marks come back flushed."""
        await self._send(self._stream.send_clear())


def heard_of_cut(dropped: Mapping[int, int], utterance: UtterancePlayback, *, at_most: int | None = None) -> int:
    """The milliseconds the caller heard of an utterance a clear cut: what was sent of it less what the clear dropped
    of it (`dropped`, as `OutboundAudio.cut` returns it), never more than `at_most` (all the audio it had, if known
    apart from what was sent)."""
    heard_ms = max(0, utterance.sent_ms - dropped.get(utterance.utterance_id, 0))
    return heard_ms if at_most is None else min(heard_ms, at_most)
