"""Twilio's side of a media stream, sans the webhook: the 20 ms inbound clock, playback with marks, `clear`.

`StreamPeer` behaves like Twilio's media server on one connected WebSocket: caller frames in real time, the
engine's audio played from a `PlaybackQueue` at 8 bytes per ms, marks echoed when playback reaches them, `clear`
honoured, anything Twilio would refuse answered with its protocol error. `run_stream` runs it with a caller script.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from engine.simulator.audio import read_wav, synthesize_speech
from engine.simulator.results import AgentUtterance, CallEnding, CallResult, MarkEcho, SimEvent
from engine.simulator.script import DropAudio, Dtmf, HangUp, Pause, PlayWav, Say, Step
from media.g711 import BYTES_PER_MS, FRAME_BYTES, FRAME_MS, SAMPLE_RATE, ULAW_SILENCE

__all__ = ["AGENT_DONE_SILENCE_MS", "PROTOCOL_ERROR", "UTTERANCE_GAP_MS", "PlaybackQueue", "StreamPeer", "run_stream"]

AGENT_DONE_SILENCE_MS: Final = 600
"""Agent silence, with nothing queued, after which a waiting `Say` takes its turn."""
UTTERANCE_GAP_MS: Final = 300
"""Playback idle this long ends an agent utterance."""
PROTOCOL_ERROR: Final = 31924
"""Twilio's error code for a malformed or unsupported message from the server."""

_SILENCE_FRAME: Final = bytes([ULAW_SILENCE]) * FRAME_BYTES
_DTMF_GAP_S: Final = 0.1
_CLOCK_RESYNC_S: Final = 0.2


class _StreamClosed(Exception):
    """The media WebSocket is gone; nothing more can be sent."""


class PlaybackQueue:
    """Twilio's playback buffer, sans I/O: agent audio and marks in arrival order, drained at real time."""

    def __init__(self) -> None:
        """Start empty."""
        self._items: deque[bytes | str] = deque()  # bytes are audio; str is a mark name
        self._offset = 0  # bytes of the head audio item already played
        self._queued_bytes = 0

    @property
    def queued_bytes(self) -> int:
        """Agent audio waiting to be played."""
        return self._queued_bytes

    def push_audio(self, ulaw: bytes) -> None:
        """Queue agent audio."""
        if ulaw:
            self._items.append(ulaw)
            self._queued_bytes += len(ulaw)

    def push_mark(self, name: str) -> list[str]:
        """Queue a mark; returns it at once (to echo) when nothing is queued ahead of it, as Twilio does."""
        if not self._items:
            return [name]
        self._items.append(name)
        return []

    def advance(self, size: int) -> tuple[bytes, list[str]]:
        """Play up to `size` bytes; returns the audio played and the marks playback reached, in order."""
        played = bytearray()
        reached: list[str] = []
        items = self._items
        while items:
            head = items[0]
            if isinstance(head, str):
                reached.append(head)
                items.popleft()
                continue
            if len(played) == size:
                break
            take = min(size - len(played), len(head) - self._offset)
            played += head[self._offset : self._offset + take]
            self._offset += take
            self._queued_bytes -= take
            if self._offset == len(head):
                items.popleft()
                self._offset = 0
        return bytes(played), reached

    def clear(self) -> tuple[int, list[str]]:
        """Drop every queued byte; returns how many were dropped and the pending marks, in order."""
        dropped = self._queued_bytes
        marks = [item for item in self._items if isinstance(item, str)]
        self._items.clear()
        self._offset = 0
        self._queued_bytes = 0
        return dropped, marks


@dataclass(slots=True)
class _CallerAudio:
    data: bytes
    done: asyncio.Event
    offset: int = 0


class StreamPeer:
    """One connected media stream: the 20 ms clock, the receiver and the caller script, sharing state."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        result: CallResult,
        started: float,
        on_event: Callable[[SimEvent], None] | None,
        reply_timeout_s: float,
    ) -> None:
        """Play Twilio's side of `ws` for `result`; times are seconds since `started` (time.monotonic)."""
        self.ws = ws
        self.result = result
        self.started = started
        self.on_event = on_event
        self.reply_timeout_s = reply_timeout_s
        self.playback = PlaybackQueue()
        self.sequence = 0
        self.chunk = 0
        self.frames_to_drop = 0  # inbound frames Twilio loses: counted as chunks, never sent
        self.send_lock = asyncio.Lock()
        self.stop_sent = False  # Twilio sends nothing on a stream after its `stop`
        self.caller_audio: deque[_CallerAudio] = deque()
        self.current: AgentUtterance | None = None
        self.last_agent_audio_at = 0.0
        self.utterances_started = 0
        self.ticked = asyncio.Event()  # replaced every tick; waiters wake once per frame
        self.protocol_failed = False

    def _now(self) -> float:
        return time.monotonic() - self.started

    def _log(self, who: str, text: str, at: float | None = None) -> None:
        event = SimEvent(self._now() if at is None else at, who, text)
        self.result.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    async def _send(self, message: dict[str, Any], *, numbered: bool = True) -> None:
        async with self.send_lock:  # sequence numbers must reach the engine in order
            # Closing the socket after `stop` first waits for the receiver to let go: no media may slip in meanwhile.
            if self.ws.closed or self.stop_sent:
                raise _StreamClosed
            if numbered:
                self.sequence += 1
                message = {"event": message["event"], "sequenceNumber": str(self.sequence), **message}
            self.stop_sent = message["event"] == "stop"
            try:
                await self.ws.send_str(json.dumps(message, separators=(",", ":")))
            except (ConnectionError, aiohttp.ClientError) as exc:
                raise _StreamClosed from exc

    async def _echo_marks(self, names: list[str], *, flushed: bool) -> None:
        for name in names:
            at = self._now()
            self.result.marks.append(MarkEcho(name, at, flushed))
            self._log("twilio", f"mark {name} {'flushed' if flushed else 'played'}", at)
            await self._send({"event": "mark", "streamSid": self.result.stream_sid, "mark": {"name": name}})

    # ----------------------------------------------------------------------------------------- clock

    async def _run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            try:
                await self._tick()
            except _StreamClosed:
                return
            next_tick += FRAME_MS / 1000
            delay = next_tick - loop.time()
            if delay < -_CLOCK_RESYNC_S:  # the loop stalled; keep real time rather than burst
                next_tick = loop.time()
                delay = 0
            await asyncio.sleep(max(delay, 0))

    async def _tick(self) -> None:
        now = self._now()
        played, reached = self.playback.advance(FRAME_BYTES)
        self._track_agent(played, now)
        self.result.heard += played
        if len(played) < FRAME_BYTES:
            self.result.heard += _SILENCE_FRAME[len(played) :]
        if reached:
            await self._echo_marks(reached, flushed=False)
        self.chunk += 1
        frame = self._next_caller_frame()
        if self.frames_to_drop:
            self.frames_to_drop -= 1
        else:
            payload = base64.b64encode(frame).decode("ascii")
            media = {"track": "inbound", "chunk": str(self.chunk), "timestamp": str((self.chunk - 1) * FRAME_MS)}
            await self._send(
                {"event": "media", "streamSid": self.result.stream_sid, "media": {**media, "payload": payload}}
            )
            self.result.media_frames_sent += 1
        ticked, self.ticked = self.ticked, asyncio.Event()
        ticked.set()

    def _next_caller_frame(self) -> bytes:
        if not self.caller_audio:
            return _SILENCE_FRAME
        head = self.caller_audio[0]
        frame = head.data[head.offset : head.offset + FRAME_BYTES]
        head.offset += FRAME_BYTES
        if head.offset >= len(head.data):
            self.caller_audio.popleft()
            head.done.set()
        return frame + _SILENCE_FRAME[len(frame) :]

    def _track_agent(self, played: bytes, now: float) -> None:
        if played:
            if self.current is None:
                self.current = AgentUtterance(started_at=now, ended_at=now)
                self.result.utterances.append(self.current)
                self.utterances_started += 1
            self.current.audio += played
            self.current.ended_at = now + len(played) / (BYTES_PER_MS * 1000)
            self.last_agent_audio_at = self.current.ended_at
        elif self.current is not None and now - self.last_agent_audio_at >= UTTERANCE_GAP_MS / 1000:
            self._end_utterance()

    def _end_utterance(self) -> None:
        utterance, self.current = self.current, None
        if utterance is not None:
            cut = ", cut by clear" if utterance.cleared else ""
            self._log("agent", f"speaking … ({utterance.duration_s:.1f} s{cut})", utterance.started_at)

    # ----------------------------------------------------------------------------------------- receiver

    async def _run_receiver(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                if message.type == aiohttp.WSMsgType.BINARY:
                    await self._protocol_error("a binary frame (Twilio accepts JSON text frames only)")
                    return
                continue
            problem = await self._handle(str(message.data))
            if problem is not None:
                await self._protocol_error(problem)
                return

    async def _handle(self, text: str) -> str | None:
        try:
            message = json.loads(text)
        except ValueError:
            return f"a frame that is not JSON: {text[:80]!r}"
        if not isinstance(message, dict):
            return f"a frame that is not a JSON object: {text[:80]!r}"
        event = message.get("event")
        if event not in ("media", "mark", "clear"):
            return f"unsupported event {event!r} (Twilio accepts media, mark and clear)"
        if message.get("streamSid") != self.result.stream_sid:
            return f"{event} with streamSid {message.get('streamSid')!r}, expected {self.result.stream_sid!r}"
        if event == "media":
            payload = (message.get("media") or {}).get("payload") if isinstance(message.get("media"), dict) else None
            if not isinstance(payload, str):
                return "media without media.payload"
            try:
                self.playback.push_audio(base64.b64decode(payload, validate=True))
            except binascii.Error:
                return "media whose payload is not base64"
        elif event == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str):
                return "mark without mark.name"
            await self._echo_marks(self.playback.push_mark(name), flushed=False)
        else:
            await self._on_clear()
        return None

    async def _on_clear(self) -> None:
        now = self._now()
        dropped, marks = self.playback.clear()
        self.result.clears.append(now)
        barge_in = " (barge-in)" if self.caller_audio else ""
        self._log("agent", f"cleared{barge_in}, {dropped / BYTES_PER_MS / 1000:.1f} s of queued audio dropped", now)
        if self.current is not None:
            self.current.cleared = True
            self._end_utterance()
        await self._echo_marks(marks, flushed=True)

    async def _protocol_error(self, problem: str) -> None:
        self.protocol_failed = True
        self.result.protocol_errors.append(f"{PROTOCOL_ERROR}: the engine sent {problem}")
        self._log("error", f"{PROTOCOL_ERROR} protocol error: the engine sent {problem}; closing the stream")
        await self.ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR)

    # ----------------------------------------------------------------------------------------- script

    async def _run_script(self, script: Sequence[Step]) -> None:
        try:
            await self._follow(script)
        except _StreamClosed:
            return  # the engine went away mid-step; the receiver reports how

    async def _follow(self, script: Sequence[Step]) -> None:
        heard_before = 0  # utterances the agent had started when the caller last took a turn
        for step in script:
            match step:
                case Say(text=text, barge_in_after_ms=barge_in, voice=voice):
                    audio = await synthesize_speech(text, voice)
                    await self._take_turn(heard_before, barge_in)
                    heard_before = self.utterances_started
                    await self.speak(audio, text)
                case PlayWav(path=path, barge_in_after_ms=barge_in):
                    audio = await asyncio.to_thread(read_wav, Path(path))
                    await self._take_turn(heard_before, barge_in)
                    heard_before = self.utterances_started
                    await self.speak(audio, f"[plays {Path(path).name}, {len(audio) / SAMPLE_RATE:.1f} s]")
                case Dtmf(digits=digits):
                    await self._take_turn(heard_before, None)
                    heard_before = self.utterances_started
                    await self._press(digits)
                case Pause(ms=ms):
                    await asyncio.sleep(ms / 1000)
                case DropAudio(ms=ms):
                    self._log("twilio", f"loses {ms} ms of the caller's audio")
                    self.frames_to_drop += ms // FRAME_MS
                    await asyncio.sleep(ms / 1000)
                case HangUp():
                    return
        await self._take_turn(heard_before, None)  # a script without HangUp hangs up once the agent is done

    async def _take_turn(self, heard_before: int, barge_in_after_ms: int | None) -> None:
        """Wait for the agent to reply since the caller's last turn, then for it to finish (or to barge in)."""
        deadline = self._now() + self.reply_timeout_s
        while self.utterances_started <= heard_before and self._now() < deadline:
            await self.ticked.wait()
        if barge_in_after_ms is not None:
            latest = self.result.utterances[-1] if self.result.utterances else None
            if latest is not None and self.utterances_started > heard_before:
                await asyncio.sleep(max(latest.started_at + barge_in_after_ms / 1000 - self._now(), 0))
            return
        while not self._agent_done():
            await self.ticked.wait()

    def _agent_done(self) -> bool:
        return (
            self.playback.queued_bytes == 0 and self._now() - self.last_agent_audio_at >= AGENT_DONE_SILENCE_MS / 1000
        )

    async def speak(self, audio: bytes, description: str) -> None:
        """Send the caller's μ-law `audio` in the next inbound frames; returns once it has all been sent."""
        done = asyncio.Event()
        self.caller_audio.append(_CallerAudio(audio, done))
        self._log("caller", description)
        await done.wait()

    async def _press(self, digits: str) -> None:
        for digit in digits:
            self._log("caller", f"presses {digit}")
            self.result.dtmf_sent.append(digit)
            dtmf = {"track": "inbound_track", "digit": digit}
            await self._send({"event": "dtmf", "streamSid": self.result.stream_sid, "dtmf": dtmf})
            await asyncio.sleep(_DTMF_GAP_S)

    async def hang_up(self) -> None:
        """Hang up as Twilio does: `stop`, then close the socket with 1000."""
        if not self.stop_sent:
            stop = {"accountSid": self.result.account_sid, "callSid": self.result.call_sid}
            self._log("caller", "hangs up")
            await self._send({"event": "stop", "streamSid": self.result.stream_sid, "stop": stop})
        await self.ws.close(code=aiohttp.WSCloseCode.OK)


async def run_stream(call: StreamPeer, script: Sequence[Step], timeout_s: float) -> None:
    """Open the stream (`connected`, `start`), then run the 20 ms clock, the receiver and `script` until the call ends.

    `call.result.ending` says how it ended; the stream is hung up if the engine has not closed it.
    """
    result = call.result
    await call._send({"event": "connected", "protocol": "Call", "version": "1.0.0"}, numbered=False)
    start = {
        "streamSid": result.stream_sid,
        "accountSid": result.account_sid,
        "callSid": result.call_sid,
        "tracks": ["inbound"],
        "customParameters": result.custom_parameters,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
    }
    await call._send({"event": "start", "streamSid": result.stream_sid, "start": start})
    call._log("call", f"stream {result.stream_sid} started, callLogId={result.call_log_id}")
    clock = asyncio.create_task(call._run_clock(), name="simulator-clock")
    receiver = asyncio.create_task(call._run_receiver(), name="simulator-receiver")
    caller = asyncio.create_task(call._run_script(script), name="simulator-script")
    try:
        done, _ = await asyncio.wait({receiver, caller}, timeout=max(timeout_s, 0), return_when="FIRST_COMPLETED")
        if caller in done:
            caller.result()  # a script failure (unreadable WAV, eSpeak error) surfaces here
            if call.ws.closed:  # the script stopped because the socket went away: let the receiver say how
                await asyncio.wait({receiver}, timeout=2)
        if clock.done() and not clock.cancelled():
            clock.result()  # the clock only ends by itself on a bug: surface it
        if call.protocol_failed:
            result.ending = CallEnding.PROTOCOL_ERROR
        elif receiver.done():
            result.ending = CallEnding.ENGINE_CLOSED
            call._log("call", f"the engine closed the stream (code {call.ws.close_code})")
        elif caller in done:
            result.ending = CallEnding.CALLER_HUNG_UP
        else:
            result.ending = CallEnding.TIMEOUT
            call._log("call", f"no end after {timeout_s:.0f} s: hanging up")
    finally:
        clock.cancel()
        caller.cancel()
        await asyncio.gather(clock, caller, return_exceptions=True)
        if call.current is not None:
            call._end_utterance()
        if not call.ws.closed:
            with contextlib.suppress(_StreamClosed):
                await call.hang_up()
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
