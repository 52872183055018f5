"""Lightweight Twilio callers for the cloud-pipeline benchmark: many concurrent calls on one event loop.

Each `CloudCaller` plays Twilio's part of one inbound call, as `engine.simulator` does but with one task per
direction and no per-step scripting, so a few hundred of them fit on one core:

- the signed voice webhook (`X-Twilio-Signature`), then the media WebSocket named by the TwiML's
  `<Connect><Stream>`, signed too; `connected`, then `start` with the TwiML's `<Parameter>`s as
  `customParameters`;
- a 20 ms clock: one `media` frame per tick (`sequenceNumber`, `chunk` and `timestamp` as strings), and the
  agent's audio played from a `PlaybackQueue` at 160 bytes per tick, marks echoed when playback reaches them
  (at once when nothing is queued ahead of them), `clear` dropping the queued audio and returning its marks;
- a conversation: wait for the agent's opening to finish, think a little, speak a pre-rendered utterance,
  stay silent, hear the reply out, repeat; once told to stop, finish the turn in flight and hang up (`stop`).

What it measures per turn (all times on this process's event-loop clock):

- voice to voice: the send time of the utterance's last voiced frame → the arrival of the reply's first media;
- playback health: whether the playback buffer ran dry before the utterance's audio ended (an audible gap,
  counted when more audio of the same utterance arrives after the buffer was found empty) and the worst
  lateness of any chunk against an uninterrupted schedule starting when the first byte played.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
import secrets
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from engine.simulator import (
    PlaybackQueue,
    SimulationError,
    parse_twiml,
    resolve_stream_url,
)
from engine.twilio.signature import request_signature
from media.g711 import FRAME_BYTES, FRAME_MS, SAMPLE_RATE, ULAW_SILENCE, pcm16_to_ulaw, ulaw_to_pcm16

VOICED_RMS: Final = 500.0
"""A 20 ms frame louder than this (16-bit RMS) is voiced: the fake Deepgram's own criterion."""

_SILENCE_FRAME: Final = bytes([ULAW_SILENCE]) * FRAME_BYTES
_SILENCE_B64: Final = base64.b64encode(_SILENCE_FRAME).decode("ascii")
_TICK_S: Final = FRAME_MS / 1000
_CLOCK_RESYNC_S: Final = 0.2


# --------------------------------------------------------------------------------------------------- audio


@dataclass(frozen=True, slots=True)
class Utterance:
    """What every caller says each turn: 20 ms frames, pre-encoded as base64, and where the voice ends."""

    frames_b64: tuple[str, ...]
    last_voiced: int
    """Index of the last voiced frame; the turn's voice-to-voice clock starts when it is sent."""
    source: str
    pause_from: int | None = None
    """With a mid-sentence pause: index of its first silent frame (agent audio from then on is a reply too early)."""
    transcript: str = ""
    """What the fake Deepgram is scripted to recognize (a ` | ` marks the pause)."""

    @property
    def duration_s(self) -> float:
        """Seconds of audio."""
        return len(self.frames_b64) * _TICK_S


def _frames(ulaw: bytes) -> list[bytes]:
    padded = ulaw + _SILENCE_FRAME[: (-len(ulaw)) % FRAME_BYTES]
    return [padded[i : i + FRAME_BYTES] for i in range(0, len(padded), FRAME_BYTES)]


def _voiced(frames: Sequence[bytes]) -> list[bool]:
    pcm = ulaw_to_pcm16(b"".join(frames)).astype(np.float64).reshape(-1, FRAME_BYTES)
    return [bool(v) for v in (pcm**2).mean(axis=1) > VOICED_RMS**2]


def _longest_quiet_run(voiced: Sequence[bool]) -> int:
    longest = run = 0
    for v in voiced:
        run = 0 if v else run + 1
        longest = max(longest, run)
    return longest


def tone_utterance(seconds: float = 1.5) -> Utterance:
    """A loud 440 Hz burst (the fake Deepgram hears energy, not words); the engine's VAD may not call it speech."""
    samples = np.arange(int(seconds * SAMPLE_RATE))
    tone = (9000 * np.sin(2 * np.pi * 440 * samples / SAMPLE_RATE)).astype(np.int16)
    frames = _frames(pcm16_to_ulaw(tone))
    return Utterance(tuple(base64.b64encode(f).decode("ascii") for f in frames), len(frames) - 1, "440 Hz tone")


async def speech_utterance(text: str, *, max_inner_quiet_ms: int) -> Utterance:
    """`text` spoken once by eSpeak NG (8 kHz μ-law), trimmed to its voiced span.

    Raises ValueError when a pause inside it lasts `max_inner_quiet_ms` or more (an endpointer would end the turn
    there), or when it has no voiced frame at all.
    """
    from pipelines.tts.espeak import speak_pcm

    audio = await asyncio.to_thread(speak_pcm, text, voice="en-us", sample_rate=8000)
    frames = _frames(pcm16_to_ulaw(audio.samples))
    voiced = _voiced(frames)
    if not any(voiced):
        raise ValueError(f"eSpeak's {text!r} has no frame louder than {VOICED_RMS:g} RMS")
    first = voiced.index(True)
    last = len(voiced) - 1 - voiced[::-1].index(True)
    frames, voiced = frames[first : last + 1], voiced[first : last + 1]
    if _longest_quiet_run(voiced) * FRAME_MS >= max_inner_quiet_ms:
        raise ValueError(f"eSpeak's {text!r} pauses {_longest_quiet_run(voiced) * FRAME_MS} ms inside")
    encoded = tuple(base64.b64encode(f).decode("ascii") for f in frames)
    return Utterance(encoded, len(frames) - 1, f"eSpeak NG: {text!r}")


async def paused_utterance(first: str, rest: str, pause_ms: int, *, max_inner_quiet_ms: int) -> Utterance:
    """`first`, `pause_ms` of silence, then `rest`: one sentence with a mid-sentence pause (eSpeak NG speech)."""
    head = await speech_utterance(first, max_inner_quiet_ms=max_inner_quiet_ms)
    tail = await speech_utterance(rest, max_inner_quiet_ms=max_inner_quiet_ms)
    silence = (_SILENCE_B64,) * (pause_ms // FRAME_MS)
    frames = head.frames_b64 + silence + tail.frames_b64
    return Utterance(
        frames,
        len(frames) - 1,
        f"eSpeak NG: {first!r} + {pause_ms} ms pause + {rest!r}",
        pause_from=len(head.frames_b64),
        transcript=f"{first} | {rest}",
    )


# --------------------------------------------------------------------------------------------------- results


@dataclass(slots=True)
class TurnStats:
    """One agent reply as the caller heard it; `index` 0 is the opening (nothing was asked)."""

    index: int
    asked_at: float | None
    """When the caller's last voiced frame of this turn went out (None for the opening)."""
    expected_bytes: int
    first_audio_at: float | None = None
    first_played_at: float | None = None
    received_bytes: int = 0
    played_bytes: int = 0
    last_audio_at: float = 0.0
    max_lateness_s: float = float("-inf")
    """Largest (arrival - due time) of any chunk after the first; negative: it arrived ahead of need."""
    gaps: int = 0
    gap_s: float = 0.0
    ended_by: str = ""
    """expected (all expected audio played), silence (none for a while), timeout (no reply), hangup."""
    paused: bool = False
    """The caller paused mid-sentence in this turn's utterance."""
    reply_in_pause: bool = False
    """Agent audio arrived after the mid-sentence pause began and before the sentence's last voiced frame."""
    _dry_since: float | None = None

    @property
    def voice_to_voice_s(self) -> float | None:
        """The caller's last voiced frame sent → the reply's first audio received."""
        if self.asked_at is None or self.first_audio_at is None:
            return None
        return self.first_audio_at - self.asked_at

    def as_json(self) -> dict[str, Any]:
        """The turn as plain JSON values."""
        v2v = self.voice_to_voice_s
        return {
            "index": self.index,
            "voiceToVoiceMs": None if v2v is None else round(v2v * 1000, 1),
            "expectedBytes": self.expected_bytes,
            "receivedBytes": self.received_bytes,
            "gaps": self.gaps,
            "gapMs": round(self.gap_s * 1000, 1),
            "worstLatenessMs": round(max(self.max_lateness_s, 0.0) * 1000, 1) if self.first_played_at else None,
            "endedBy": self.ended_by,
            "paused": self.paused,
            "replyInPause": self.reply_in_pause,
        }


@dataclass(slots=True)
class CallerResult:
    """One caller's call."""

    call_sid: str
    call_log_id: str | None = None
    connected_at: float | None = None
    opening_done_at: float | None = None
    hung_up_at: float | None = None
    turns: list[TurnStats] = field(default_factory=list)
    tick_lag_ms: array[float] = field(default_factory=lambda: array("f"))
    """How late each 20 ms tick ran (event-loop lag of this process: the harness's own saturation)."""
    error: str | None = None
    engine_closed: bool = False
    protocol_errors: list[str] = field(default_factory=list)
    unexpected_audio_bytes: int = 0
    """Agent audio that arrived while no reply was awaited (e.g. after a turn was given up)."""


# --------------------------------------------------------------------------------------------------- caller


class ReplyBook:
    """What the agent will say at each turn, so the caller knows how much audio a complete reply carries."""

    def __init__(self, opening_bytes: int, reply_bytes: Sequence[int]) -> None:
        """The opening carries `opening_bytes`; the reply to caller turn k carries `reply_bytes[k % len]`."""
        self._opening = opening_bytes
        self._replies = list(reply_bytes)

    def expected(self, turn: int) -> int:
        """Audio bytes the agent's reply to caller turn `turn` (0: the opening) should carry."""
        return self._opening if turn == 0 else self._replies[turn % len(self._replies)]


_OPENING, _THINK, _SPEAK, _AWAIT, _HEAR, _DONE = range(6)


class CloudCaller:
    """One simulated inbound call speaking Twilio's Media Streams protocol (see the module docstring)."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        base_url: str,
        to: str,
        from_: str,
        auth_token: str | None,
        utterance: Utterance | Sequence[Utterance],
        replies: ReplyBook,
        stop: asyncio.Event,
        rng: random.Random,
        think_s: tuple[float, float] = (0.3, 1.0),
        reply_timeout_s: float = 10.0,
        done_silence_s: float = 2.0,
        opening_timeout_s: float = 20.0,
        max_turns: int | None = None,
        caller_first: bool = False,
    ) -> None:
        """Prepare a call to `to` on the engine at `base_url`; nothing happens until `run()`.

        Each turn says one of `utterance` (picked at random when several). The caller hangs up at its first pause
        after `stop` is set, or after `max_turns` turns if given. With `caller_first` the agent has no opening:
        the caller speaks first.
        """
        self._http = http
        self._base = base_url.rstrip("/")
        self._to, self._from = to, from_
        self._token = auth_token
        self._utterances = (utterance,) if isinstance(utterance, Utterance) else tuple(utterance)
        self._utterance = self._utterances[0]
        self._caller_first = caller_first
        self._heard_in_pause = False
        self._replies = replies
        self._stop = stop
        self._rng = rng
        self._think_s = think_s
        self._reply_timeout_s = reply_timeout_s
        self._done_silence_s = done_silence_s
        self._opening_timeout_s = opening_timeout_s
        self._max_turns = max_turns
        self.result = CallerResult(call_sid="CA" + secrets.token_hex(16))
        self._account_sid = "AC" + secrets.token_hex(16)
        self._stream_sid = "MZ" + secrets.token_hex(16)
        self._stream_sid_json = json.dumps(self._stream_sid)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._playback = PlaybackQueue()
        self._sequence = 0
        self._chunk = 0
        self._state = _OPENING
        self._state_since = 0.0
        self._think_until = 0.0
        self._speak_index = 0
        self._turn: TurnStats | None = None
        self._asked = 0

    @property
    def asking_since(self) -> float | None:
        """When the turn still awaiting or playing its reply was asked (loop clock); None between turns."""
        turn = self._turn
        return None if turn is None or turn.ended_by else turn.asked_at

    # ------------------------------------------------------------------------------------------- run

    async def run(self) -> CallerResult:
        """Place the call and converse until told to stop (then hang up) or the engine ends it."""
        try:
            await self._place()
        except (SimulationError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.result.error = f"{type(exc).__name__}: {exc}"
        return self.result

    async def _place(self) -> None:
        loop = asyncio.get_running_loop()
        params = {
            "CallSid": self.result.call_sid,
            "AccountSid": self._account_sid,
            "From": self._from,
            "To": self._to,
            "Caller": self._from,
            "Called": self._to,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
        }
        url = f"{self._base}/twilio/voice"
        headers = {"X-Twilio-Signature": request_signature(self._token, url, params)} if self._token else {}
        async with self._http.post(url, data=params, headers=headers) as response:
            body = await response.text()
            if response.status != 200:
                raise SimulationError(f"voice webhook answered HTTP {response.status}: {body[:200]!r}")
        twiml = parse_twiml(body, url)
        if twiml.stream_url is None:
            raise SimulationError(f"the call was refused: {twiml.refusal!r}")
        self.result.call_log_id = twiml.parameters.get("callLogId")
        ws_headers = {}
        if self._token:
            signed = resolve_stream_url(urlsplit(twiml.stream_url).path, url)
            ws_headers["X-Twilio-Signature"] = request_signature(self._token, signed, {})
        ws = await self._http.ws_connect(twiml.stream_url, headers=ws_headers, autoping=True, heartbeat=None)
        self._ws = ws
        self.result.connected_at = loop.time()
        self._state_since = loop.time()
        try:
            await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            start = {
                "streamSid": self._stream_sid,
                "accountSid": self._account_sid,
                "callSid": self.result.call_sid,
                "tracks": ["inbound"],
                "customParameters": twiml.parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
            }
            await self._send_json({"event": "start", "start": start})
            self._begin(loop.time())
            receiver = asyncio.create_task(self._receive(ws))
            clock = asyncio.create_task(self._clock())
            done, _ = await asyncio.wait({receiver, clock}, return_when=asyncio.FIRST_COMPLETED)
            clock.cancel()
            await asyncio.gather(clock, return_exceptions=True)
            if not ws.closed:
                stop = {"accountSid": self._account_sid, "callSid": self.result.call_sid}
                await self._send_json({"event": "stop", "stop": stop})
                self.result.hung_up_at = loop.time()
                await ws.close()
            else:
                self.result.engine_closed = True
            if self._turn is not None:
                self._finish_turn("hangup")
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            for task in done:
                if not task.cancelled() and (exc := task.exception()) is not None:
                    raise exc
        finally:
            if not ws.closed:
                await ws.close()

    def _begin(self, now: float) -> None:
        """Await the agent's opening, or (caller first) think a moment before speaking."""
        if self._caller_first:
            self._turn = None
            self._think(now)
        else:
            self._turn = TurnStats(0, None, self._replies.expected(0))

    async def _send_json(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        self._sequence += 1
        body = {"event": message["event"], "sequenceNumber": str(self._sequence), "streamSid": self._stream_sid}
        await self._ws.send_str(json.dumps(body | message, separators=(",", ":")))

    # ------------------------------------------------------------------------------------------- clock

    async def _clock(self) -> None:
        """Tick every 20 ms: play agent audio, echo the marks it reached, send one caller frame."""
        loop = asyncio.get_running_loop()
        lags = self.result.tick_lag_ms
        due = loop.time()
        while True:
            now = loop.time()
            lags.append((now - due) * 1000)
            try:
                if not await self._tick(now):
                    return
            except (ConnectionError, aiohttp.ClientError):
                return  # the engine closed the stream; the receiver has seen it too
            due += _TICK_S
            delay = due - loop.time()
            if delay < -_CLOCK_RESYNC_S:  # stalled: keep real time rather than burst
                due = loop.time()
                delay = 0
            await asyncio.sleep(max(delay, 0))

    async def _tick(self, now: float) -> bool:
        """One 20 ms tick; False once the call is over from the caller's side (hung up)."""
        ws = self._ws
        assert ws is not None
        if ws.closed:
            return False
        played, reached = self._playback.advance(FRAME_BYTES)
        self._account_playback(now, len(played))
        for name in reached:
            await self._echo_mark(name)
        payload, voiced_end = self._next_frame(now)
        self._chunk += 1
        self._sequence += 1
        await ws.send_str(
            f'{{"event":"media","sequenceNumber":"{self._sequence}","streamSid":{self._stream_sid_json},'
            f'"media":{{"track":"inbound","chunk":"{self._chunk}","timestamp":"{(self._chunk - 1) * FRAME_MS}",'
            f'"payload":"{payload}"}}}}'
        )
        if voiced_end:
            self._asked += 1
            self._turn = TurnStats(self._asked, now, self._replies.expected(self._asked))
            self._turn.paused = self._utterance.pause_from is not None
            self._turn.reply_in_pause, self._heard_in_pause = self._heard_in_pause, False
            self._set_state(_AWAIT, now)
        return self._advance_conversation(now)

    def _next_frame(self, now: float) -> tuple[str, bool]:
        if self._state != _SPEAK:
            return _SILENCE_B64, False
        index = self._speak_index
        self._speak_index += 1
        frames = self._utterance.frames_b64
        if self._speak_index >= len(frames):
            self._speak_index = 0
        return frames[index], index == self._utterance.last_voiced

    def _set_state(self, state: int, now: float) -> None:
        self._state, self._state_since = state, now

    def _advance_conversation(self, now: float) -> bool:
        turn = self._turn
        state = self._state
        if state in (_OPENING, _HEAR) and turn is not None:
            if turn.first_audio_at is None:
                limit = self._opening_timeout_s if state == _OPENING else self._reply_timeout_s
                if now - self._state_since >= limit:
                    self._finish_turn("timeout")
                    self._think(now)
            elif self._playback.queued_bytes == 0:
                if turn.played_bytes >= turn.expected_bytes:
                    self._finish_turn("expected")
                    self._think(now)
                elif now - turn.last_audio_at >= self._done_silence_s:
                    self._finish_turn("silence")
                    self._think(now)
        elif state == _AWAIT and turn is not None:
            if turn.first_audio_at is not None:
                self._set_state(_HEAR, now)
            elif now - self._state_since >= self._reply_timeout_s:
                self._finish_turn("timeout")
                self._think(now)
        elif state == _THINK:
            if self._stop.is_set() or (self._max_turns is not None and self._asked >= self._max_turns):
                self._set_state(_DONE, now)
                return False
            if now >= self._think_until:
                self._speak_index = 0
                self._utterance = self._rng.choice(self._utterances)
                self._set_state(_SPEAK, now)
        return True

    def _think(self, now: float) -> None:
        if self.result.opening_done_at is None:
            self.result.opening_done_at = now
        self._think_until = now + self._rng.uniform(*self._think_s)
        self._set_state(_THINK, now)

    def _finish_turn(self, how: str) -> None:
        turn = self._turn
        if turn is None:
            return
        turn.ended_by = how
        self.result.turns.append(turn)
        self._turn = None

    def _account_playback(self, now: float, played: int) -> None:
        turn = self._turn
        if turn is None or turn.first_audio_at is None or turn.ended_by:
            return
        if played:
            if turn.first_played_at is None:
                turn.first_played_at = now
            turn.played_bytes += played
        if played < FRAME_BYTES and turn._dry_since is None:
            turn._dry_since = now  # resolved as a gap if more audio of this reply arrives

    # ------------------------------------------------------------------------------------------- receiver

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                if message.type is aiohttp.WSMsgType.BINARY:
                    self.result.protocol_errors.append("binary frame")
                continue
            try:
                frame = json.loads(message.data)
                event = frame["event"]
                if frame.get("streamSid") != self._stream_sid:
                    self.result.protocol_errors.append(f"{event} for streamSid {frame.get('streamSid')!r}")
                    continue
                if event == "media":
                    self._on_media(loop.time(), base64.b64decode(frame["media"]["payload"], validate=True))
                elif event == "mark":
                    for name in self._playback.push_mark(str(frame["mark"]["name"])):
                        await self._echo_mark(name)
                elif event == "clear":
                    _, marks = self._playback.clear()
                    for name in marks:
                        await self._echo_mark(name)
                else:
                    self.result.protocol_errors.append(f"unsupported event {event!r}")
            except (ValueError, KeyError, TypeError, binascii.Error) as exc:
                self.result.protocol_errors.append(f"unreadable frame ({exc!r}): {str(message.data)[:80]}")

    def _on_media(self, now: float, audio: bytes) -> None:
        self._playback.push_audio(audio)
        pause_from = self._utterance.pause_from
        if self._state == _SPEAK and pause_from is not None and self._speak_index > pause_from:
            self._heard_in_pause = True  # the agent started replying to the half sentence
        turn = self._turn
        if turn is None or turn.ended_by or self._state not in (_OPENING, _AWAIT, _HEAR):
            self.result.unexpected_audio_bytes += len(audio)
            return
        if turn.first_audio_at is None:
            turn.first_audio_at = now
        elif turn.first_played_at is not None:
            due = turn.first_played_at + turn.received_bytes / SAMPLE_RATE
            turn.max_lateness_s = max(turn.max_lateness_s, now - due)
        if turn._dry_since is not None:
            turn.gaps += 1
            turn.gap_s += now - turn._dry_since
            turn._dry_since = None
        turn.received_bytes += len(audio)
        turn.last_audio_at = now

    async def _echo_mark(self, name: str) -> None:
        await self._send_json({"event": "mark", "mark": {"name": name}})
