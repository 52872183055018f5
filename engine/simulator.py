"""A simulated phone call: play Twilio's part against a running engine, from the signed webhook to the hang-up.

`simulate_call` posts the inbound voice webhook as Twilio does, follows the `<Connect><Stream>` TwiML onto the
media WebSocket and then behaves like Twilio's media server: 20 ms inbound frames in real time, the engine's
audio played from a FIFO at 8 bytes per ms, marks echoed when playback reaches them, `clear` honoured. A caller
script (`Say`, `PlayWav`, `Dtmf`, `Pause`, `HangUp`) decides what the caller does; `CallResult` keeps what was heard.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import enum
import json
import secrets
import time
import wave
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
import numpy as np
import numpy.typing as npt

from config.settings import Settings
from media.g711 import ULAW_SILENCE, pcm16_to_ulaw, ulaw_to_pcm16
from media.resample import SUPPORTED_RATES, resample

__all__ = [
    "AgentUtterance",
    "CallEnding",
    "CallResult",
    "Dtmf",
    "HangUp",
    "MarkEcho",
    "Pause",
    "PlayWav",
    "PlaybackQueue",
    "Say",
    "SimEvent",
    "SimulationError",
    "Step",
    "add_call_command",
    "run_call_command",
    "simulate_call",
]

FRAME_MS: Final = 20
"""Twilio sends one inbound media frame every 20 ms."""
FRAME_BYTES: Final = 160
"""μ-law bytes in one 20 ms frame at 8 kHz."""
BYTES_PER_MS: Final = 8
"""μ-law 8 kHz: eight bytes per millisecond of audio."""
AGENT_DONE_SILENCE_MS: Final = 600
"""Agent silence, with nothing queued, after which a waiting `Say` takes its turn."""
UTTERANCE_GAP_MS: Final = 300
"""Playback idle this long ends an agent utterance."""
PROTOCOL_ERROR: Final = 31924
"""Twilio's error code for a malformed or unsupported message from the server."""

_SILENCE_FRAME: Final = bytes([ULAW_SILENCE]) * FRAME_BYTES
_DTMF_GAP_S: Final = 0.1
_CLOCK_RESYNC_S: Final = 0.2


class SimulationError(Exception):
    """The simulated call could not be placed (engine unreachable, unusable TwiML, unreadable audio)."""


class _StreamClosed(Exception):
    """The media WebSocket is gone; nothing more can be sent."""


# --------------------------------------------------------------------------------------------------- script


@dataclass(frozen=True, slots=True)
class Say:
    """The caller speaks `text` (eSpeak NG); waits for the agent to finish, or barges in `barge_in_after_ms`."""

    text: str
    barge_in_after_ms: int | None = None
    voice: str = "en-us"


@dataclass(frozen=True, slots=True)
class PlayWav:
    """The caller plays a mono 16-bit WAV file; waits for the agent like `Say`."""

    path: Path | str
    barge_in_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Dtmf:
    """The caller presses keys, one `dtmf` event per digit; waits for the agent to finish first."""

    digits: str


@dataclass(frozen=True, slots=True)
class Pause:
    """The caller stays silent for `ms` milliseconds."""

    ms: int


@dataclass(frozen=True, slots=True)
class HangUp:
    """The caller hangs up at once: `stop`, then the socket closes with 1000."""


Step = Say | PlayWav | Dtmf | Pause | HangUp


# --------------------------------------------------------------------------------------------------- results


class CallEnding(enum.Enum):
    """How the simulated call ended."""

    CALLER_HUNG_UP = "caller hung up"
    ENGINE_CLOSED = "engine closed the stream"
    TIMEOUT = "timed out"
    REFUSED = "refused by the webhook"
    PROTOCOL_ERROR = "protocol error"


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One line of the call's log: seconds since the webhook, who, and what."""

    at: float
    who: str
    text: str

    def __str__(self) -> str:
        """The log line, e.g. `[00:01.20] caller: hello`."""
        minutes, seconds = divmod(self.at, 60)
        return f"[{int(minutes):02d}:{seconds:05.2f}] {self.who}: {self.text}"


@dataclass(slots=True)
class AgentUtterance:
    """A run of agent audio the caller heard, between silences; `cleared` when a `clear` cut it."""

    started_at: float
    ended_at: float
    audio: bytearray = field(default_factory=bytearray)
    cleared: bool = False

    @property
    def duration_s(self) -> float:
        """Seconds of agent audio played."""
        return len(self.audio) / (BYTES_PER_MS * 1000)


@dataclass(frozen=True, slots=True)
class MarkEcho:
    """A mark sent back to the engine: `flushed` when a `clear` released it rather than playback."""

    name: str
    at: float
    flushed: bool


@dataclass(slots=True)
class CallResult:
    """Everything the simulated caller saw of the call."""

    call_sid: str
    account_sid: str
    stream_sid: str
    webhook_status: int = 0
    twiml: str = ""
    stream_url: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)
    refusal: str | None = None
    ending: CallEnding | None = None
    close_code: int | None = None
    utterances: list[AgentUtterance] = field(default_factory=list)
    marks: list[MarkEcho] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    dtmf_sent: list[str] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    events: list[SimEvent] = field(default_factory=list)
    heard: bytearray = field(default_factory=bytearray)
    media_frames_sent: int = 0

    @property
    def call_log_id(self) -> str | None:
        """The engine's CallLog id, from the stream's `callLogId` Parameter."""
        return self.custom_parameters.get("callLogId")

    @property
    def marks_played(self) -> list[str]:
        """Names of marks echoed because playback reached them."""
        return [mark.name for mark in self.marks if not mark.flushed]

    @property
    def marks_flushed(self) -> list[str]:
        """Names of marks echoed at once because a `clear` dropped the audio before them."""
        return [mark.name for mark in self.marks if mark.flushed]

    def save_heard(self, path: Path | str) -> None:
        """Write what the caller heard (agent audio and the silences between) as a 16-bit 8 kHz mono WAV."""
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(ulaw_to_pcm16(bytes(self.heard)).tobytes())


# --------------------------------------------------------------------------------------------------- playback


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


# --------------------------------------------------------------------------------------------------- audio


def _pcm_to_ulaw_8k(samples: npt.NDArray[np.int16], rate: int, source: str) -> bytes:
    if rate not in SUPPORTED_RATES:
        raise SimulationError(f"{source}: {rate} Hz is not supported; use one of {sorted(SUPPORTED_RATES)}")
    return pcm16_to_ulaw(resample(samples, rate, 8000))


def _read_wav(path: Path) -> bytes:
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (OSError, wave.Error, EOFError) as exc:
        raise SimulationError(f"{path}: cannot read the WAV file ({exc})") from exc
    if channels != 1 or width != 2:
        raise SimulationError(f"{path}: need mono 16-bit PCM, got {channels} channel(s) of {8 * width}-bit samples")
    return _pcm_to_ulaw_8k(np.frombuffer(frames, dtype="<i2").astype(np.int16), rate, str(path))


async def _speech(text: str, voice: str) -> bytes:
    from pipelines.tts.espeak import speak_pcm

    audio = await asyncio.to_thread(speak_pcm, text, voice=voice)
    return _pcm_to_ulaw_8k(audio.samples, audio.sample_rate, f"eSpeak voice {voice!r}")


# --------------------------------------------------------------------------------------------------- webhook


def _new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    from twilio.request_validator import RequestValidator  # type: ignore[import-untyped, unused-ignore]

    signature: str = RequestValidator(auth_token).compute_signature(url, params)
    return signature


@dataclass(frozen=True, slots=True)
class _Twiml:
    stream_url: str | None
    parameters: dict[str, str]
    action: str | None
    refusal: str | None


def _parse_twiml(text: str, webhook_url: str) -> _Twiml:
    try:
        root = ET.fromstring(text)  # noqa: S314 - the engine under test wrote it; a hostile engine is out of scope
    except ET.ParseError as exc:
        raise SimulationError(
            f"the voice webhook answered something that is not TwiML ({exc}): {text[:200]!r}"
        ) from exc
    if root.tag != "Response":
        raise SimulationError(f"the voice webhook answered <{root.tag}>, expected <Response>: {text[:200]!r}")
    stream = root.find("./Connect/Stream")
    if stream is not None and stream.get("url"):
        connect = root.find("./Connect")
        parameters = {
            str(p.get("name")): str(p.get("value", "")) for p in stream.findall("./Parameter") if p.get("name")
        }
        action = connect.get("action") if connect is not None else None
        return _Twiml(_stream_url(str(stream.get("url")), webhook_url), parameters, action, None)
    if root.find("./Hangup") is not None or root.find("./Reject") is not None or root.find("./Say") is not None:
        said = " ".join((say.text or "").strip() for say in root.findall("./Say")).strip()
        return _Twiml(None, {}, None, said or "(hung up without a word)")
    raise SimulationError(f"the voice webhook's TwiML has no <Connect><Stream url=…> and no <Hangup/>: {text[:200]!r}")


def _stream_url(url: str, webhook_url: str) -> str:
    # Relative URLs resolve against the webhook, as Twilio does; the query is dropped, as Twilio does.
    absolute = urljoin(webhook_url, url)
    parts = urlsplit(absolute)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


# --------------------------------------------------------------------------------------------------- the call


@dataclass(slots=True)
class _CallerAudio:
    data: bytes
    done: asyncio.Event
    offset: int = 0


class _Call:
    """One connected media stream: the 20 ms clock, the receiver and the caller script, sharing state."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        result: CallResult,
        started: float,
        on_event: Callable[[SimEvent], None] | None,
        reply_timeout_s: float,
    ) -> None:
        self.ws = ws
        self.result = result
        self.started = started
        self.on_event = on_event
        self.reply_timeout_s = reply_timeout_s
        self.playback = PlaybackQueue()
        self.sequence = 0
        self.chunk = 0
        self.send_lock = asyncio.Lock()
        self.caller_audio: deque[_CallerAudio] = deque()
        self.current: AgentUtterance | None = None
        self.last_agent_audio_at = 0.0
        self.utterances_started = 0
        self.hanging_up = False
        self.ticked = asyncio.Event()  # replaced every tick; waiters wake once per frame
        self.protocol_failed = False

    def now(self) -> float:
        return time.monotonic() - self.started

    def log(self, who: str, text: str, at: float | None = None) -> None:
        event = SimEvent(self.now() if at is None else at, who, text)
        self.result.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    async def send(self, message: dict[str, Any], *, numbered: bool = True) -> None:
        async with self.send_lock:  # sequence numbers must reach the engine in order
            if self.ws.closed:
                raise _StreamClosed
            if numbered:
                self.sequence += 1
                message = {"event": message["event"], "sequenceNumber": str(self.sequence), **message}
            try:
                await self.ws.send_str(json.dumps(message, separators=(",", ":")))
            except (ConnectionError, aiohttp.ClientError) as exc:
                raise _StreamClosed from exc

    async def echo_marks(self, names: list[str], *, flushed: bool) -> None:
        for name in names:
            at = self.now()
            self.result.marks.append(MarkEcho(name, at, flushed))
            self.log("twilio", f"mark {name} {'flushed' if flushed else 'played'}", at)
            await self.send({"event": "mark", "streamSid": self.result.stream_sid, "mark": {"name": name}})

    # ----------------------------------------------------------------------------------------- clock

    async def run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            try:
                await self.tick()
            except _StreamClosed:
                return
            next_tick += FRAME_MS / 1000
            delay = next_tick - loop.time()
            if delay < -_CLOCK_RESYNC_S:  # the loop stalled; keep real time rather than burst
                next_tick = loop.time()
                delay = 0
            await asyncio.sleep(max(delay, 0))

    async def tick(self) -> None:
        now = self.now()
        played, reached = self.playback.advance(FRAME_BYTES)
        self.track_agent(played, now)
        self.result.heard += played
        if len(played) < FRAME_BYTES:
            self.result.heard += _SILENCE_FRAME[len(played) :]
        if reached:
            await self.echo_marks(reached, flushed=False)
        self.chunk += 1
        payload = base64.b64encode(self.next_caller_frame()).decode("ascii")
        media = {"track": "inbound", "chunk": str(self.chunk), "timestamp": str((self.chunk - 1) * FRAME_MS)}
        await self.send({"event": "media", "streamSid": self.result.stream_sid, "media": {**media, "payload": payload}})
        self.result.media_frames_sent += 1
        ticked, self.ticked = self.ticked, asyncio.Event()
        ticked.set()

    def next_caller_frame(self) -> bytes:
        if not self.caller_audio:
            return _SILENCE_FRAME
        head = self.caller_audio[0]
        frame = head.data[head.offset : head.offset + FRAME_BYTES]
        head.offset += FRAME_BYTES
        if head.offset >= len(head.data):
            self.caller_audio.popleft()
            head.done.set()
        return frame + _SILENCE_FRAME[len(frame) :]

    def track_agent(self, played: bytes, now: float) -> None:
        if played:
            if self.current is None:
                self.current = AgentUtterance(started_at=now, ended_at=now)
                self.result.utterances.append(self.current)
                self.utterances_started += 1
            self.current.audio += played
            self.current.ended_at = now + len(played) / (BYTES_PER_MS * 1000)
            self.last_agent_audio_at = self.current.ended_at
        elif self.current is not None and now - self.last_agent_audio_at >= UTTERANCE_GAP_MS / 1000:
            self.end_utterance()

    def end_utterance(self) -> None:
        utterance, self.current = self.current, None
        if utterance is not None:
            cut = ", cut by clear" if utterance.cleared else ""
            self.log("agent", f"speaking … ({utterance.duration_s:.1f} s{cut})", utterance.started_at)

    # ----------------------------------------------------------------------------------------- receiver

    async def run_receiver(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                if message.type == aiohttp.WSMsgType.BINARY:
                    await self.protocol_error("a binary frame (Twilio accepts JSON text frames only)")
                    return
                continue
            problem = await self.handle(str(message.data))
            if problem is not None:
                await self.protocol_error(problem)
                return

    async def handle(self, text: str) -> str | None:
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
            await self.echo_marks(self.playback.push_mark(name), flushed=False)
        else:
            await self.on_clear()
        return None

    async def on_clear(self) -> None:
        now = self.now()
        dropped, marks = self.playback.clear()
        self.result.clears.append(now)
        barge_in = " (barge-in)" if self.caller_audio else ""
        self.log("agent", f"cleared{barge_in}, {dropped / BYTES_PER_MS / 1000:.1f} s of queued audio dropped", now)
        if self.current is not None:
            self.current.cleared = True
            self.end_utterance()
        await self.echo_marks(marks, flushed=True)

    async def protocol_error(self, problem: str) -> None:
        self.protocol_failed = True
        self.result.protocol_errors.append(f"{PROTOCOL_ERROR}: the engine sent {problem}")
        self.log("error", f"{PROTOCOL_ERROR} protocol error: the engine sent {problem}; closing the stream")
        await self.ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR)

    # ----------------------------------------------------------------------------------------- script

    async def run_script(self, script: Sequence[Step]) -> None:
        try:
            await self.follow(script)
        except _StreamClosed:
            return  # the engine went away mid-step; the receiver reports how

    async def follow(self, script: Sequence[Step]) -> None:
        heard_before = 0  # utterances the agent had started when the caller last took a turn
        for step in script:
            match step:
                case Say(text=text, barge_in_after_ms=barge_in, voice=voice):
                    audio = await _speech(text, voice)
                    await self.take_turn(heard_before, barge_in)
                    heard_before = self.utterances_started
                    await self.speak(audio, text)
                case PlayWav(path=path, barge_in_after_ms=barge_in):
                    audio = await asyncio.to_thread(_read_wav, Path(path))
                    await self.take_turn(heard_before, barge_in)
                    heard_before = self.utterances_started
                    await self.speak(audio, f"[plays {Path(path).name}, {len(audio) / 8000:.1f} s]")
                case Dtmf(digits=digits):
                    await self.take_turn(heard_before, None)
                    heard_before = self.utterances_started
                    await self.press(digits)
                case Pause(ms=ms):
                    await asyncio.sleep(ms / 1000)
                case HangUp():
                    return
        await self.take_turn(heard_before, None)  # a script without HangUp hangs up once the agent is done

    async def take_turn(self, heard_before: int, barge_in_after_ms: int | None) -> None:
        """Wait for the agent to reply since the caller's last turn, then for it to finish (or to barge in)."""
        deadline = self.now() + self.reply_timeout_s
        while self.utterances_started <= heard_before and self.now() < deadline:
            await self.ticked.wait()
        if barge_in_after_ms is not None:
            latest = self.result.utterances[-1] if self.result.utterances else None
            if latest is not None and self.utterances_started > heard_before:
                await asyncio.sleep(max(latest.started_at + barge_in_after_ms / 1000 - self.now(), 0))
            return
        while not self.agent_done():
            await self.ticked.wait()

    def agent_done(self) -> bool:
        return self.playback.queued_bytes == 0 and self.now() - self.last_agent_audio_at >= AGENT_DONE_SILENCE_MS / 1000

    async def speak(self, audio: bytes, description: str) -> None:
        done = asyncio.Event()
        self.caller_audio.append(_CallerAudio(audio, done))
        self.log("caller", description)
        await done.wait()

    async def press(self, digits: str) -> None:
        for digit in digits:
            self.log("caller", f"presses {digit}")
            self.result.dtmf_sent.append(digit)
            dtmf = {"track": "inbound_track", "digit": digit}
            await self.send({"event": "dtmf", "streamSid": self.result.stream_sid, "dtmf": dtmf})
            await asyncio.sleep(_DTMF_GAP_S)

    async def hang_up(self) -> None:
        self.hanging_up = True
        stop = {"accountSid": self.result.account_sid, "callSid": self.result.call_sid}
        self.log("caller", "hangs up")
        await self.send({"event": "stop", "streamSid": self.result.stream_sid, "stop": stop})
        await self.ws.close(code=aiohttp.WSCloseCode.OK)


async def simulate_call(
    base_url: str,
    *,
    to: str,
    from_: str,
    script: Sequence[Step],
    auth_token: str | None = None,
    public_url: str | None = None,
    timeout_s: float = 120.0,
    reply_timeout_s: float = 10.0,
    on_event: Callable[[SimEvent], None] | None = None,
) -> CallResult:
    """Place one inbound call on the engine at `base_url` as Twilio would, run `script`, and report what happened.

    `public_url` is the address the engine believes Twilio reaches it at (it signs the webhook); default `base_url`.
    A turn waits up to `reply_timeout_s` for the agent to start replying; the whole call is cut at `timeout_s`.
    """
    started = time.monotonic()
    result = CallResult(call_sid=_new_sid("CA"), account_sid=_new_sid("AC"), stream_sid=_new_sid("MZ"))

    def log(who: str, text: str) -> None:
        event = SimEvent(time.monotonic() - started, who, text)
        result.events.append(event)
        if on_event is not None:
            on_event(event)

    base = base_url.rstrip("/")
    signed_base = (public_url or base_url).rstrip("/")
    params = {
        "CallSid": result.call_sid,
        "AccountSid": result.account_sid,
        "From": from_,
        "To": to,
        "Caller": from_,
        "Called": to,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as http:
        twiml = await _post_webhook(
            http,
            result=result,
            url=f"{base}/twilio/voice",
            signed_url=f"{signed_base}/twilio/voice",
            params=params,
            auth_token=auth_token,
        )
        log("call", f"{from_} calls {to}: webhook answered {result.webhook_status}")
        if twiml.refusal is not None:
            result.refusal = twiml.refusal
            result.ending = CallEnding.REFUSED
            log("call", f"refused: {twiml.refusal!r}")
            return result
        assert twiml.stream_url is not None
        result.stream_url = twiml.stream_url
        result.custom_parameters = twiml.parameters
        if not twiml.stream_url.startswith("wss://"):
            log("call", f"note: {twiml.stream_url} is not wss:// (Twilio would refuse it, error 31922)")
        headers = {}
        if auth_token:
            signed_stream = _stream_url(urlsplit(twiml.stream_url).path, f"{signed_base}/twilio/voice")
            headers["X-Twilio-Signature"] = _signature(auth_token, signed_stream, {})
        try:
            ws = await http.ws_connect(twiml.stream_url, headers=headers, autoping=True, heartbeat=None)
        except aiohttp.ClientError as exc:
            raise SimulationError(f"{twiml.stream_url}: the media WebSocket refused the handshake ({exc})") from exc
        async with ws:
            call = _Call(ws, result, started, on_event, reply_timeout_s)
            await _run_stream(call, script, timeout_s - (time.monotonic() - started))
        result.close_code = ws.close_code
        if result.ending is CallEnding.ENGINE_CLOSED and twiml.action:
            await _post_action(
                http,
                url=urljoin(f"{base}/twilio/voice", twiml.action),
                signed_url=urljoin(f"{signed_base}/twilio/voice", twiml.action),
                params=params,
                auth_token=auth_token,
                log=log,
            )
    return result


async def _post_webhook(
    http: aiohttp.ClientSession,
    *,
    result: CallResult,
    url: str,
    signed_url: str,
    params: dict[str, str],
    auth_token: str | None,
) -> _Twiml:
    headers = {"X-Twilio-Signature": _signature(auth_token, signed_url, params)} if auth_token else {}
    try:
        async with http.post(url, data=params, headers=headers) as response:
            result.webhook_status = response.status
            result.twiml = await response.text()
    except aiohttp.ClientError as exc:
        raise SimulationError(f"{url}: could not reach the engine's voice webhook ({exc})") from exc
    if result.webhook_status != 200:
        raise SimulationError(f"{url}: the voice webhook answered HTTP {result.webhook_status}: {result.twiml[:200]!r}")
    return _parse_twiml(result.twiml, url)


async def _post_action(
    http: aiohttp.ClientSession,
    *,
    url: str,
    signed_url: str,
    params: dict[str, str],
    auth_token: str | None,
    log: Callable[[str, str], None],
) -> None:
    # After <Connect> ends because the server closed the stream, Twilio requests the action URL for more TwiML.
    fields = {**params, "CallStatus": "in-progress"}
    headers = {"X-Twilio-Signature": _signature(auth_token, signed_url, fields)} if auth_token else {}
    try:
        async with http.post(url, data=fields, headers=headers) as response:
            log("call", f"<Connect action> {url} answered {response.status}")
    except aiohttp.ClientError as exc:
        log("error", f"<Connect action> {url} failed: {exc}")


async def _run_stream(call: _Call, script: Sequence[Step], timeout_s: float) -> None:
    result = call.result
    await call.send({"event": "connected", "protocol": "Call", "version": "1.0.0"}, numbered=False)
    start = {
        "streamSid": result.stream_sid,
        "accountSid": result.account_sid,
        "callSid": result.call_sid,
        "tracks": ["inbound"],
        "customParameters": result.custom_parameters,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    await call.send({"event": "start", "streamSid": result.stream_sid, "start": start})
    call.log("call", f"stream {result.stream_sid} started, callLogId={result.call_log_id}")
    clock = asyncio.create_task(call.run_clock(), name="simulator-clock")
    receiver = asyncio.create_task(call.run_receiver(), name="simulator-receiver")
    caller = asyncio.create_task(call.run_script(script), name="simulator-script")
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
            call.log("call", f"the engine closed the stream (code {call.ws.close_code})")
        elif caller in done:
            result.ending = CallEnding.CALLER_HUNG_UP
        else:
            result.ending = CallEnding.TIMEOUT
            call.log("call", f"no end after {timeout_s:.0f} s: hanging up")
    finally:
        clock.cancel()
        caller.cancel()
        await asyncio.gather(clock, caller, return_exceptions=True)
        if call.current is not None:
            call.end_utterance()
        if not call.ws.closed:
            with contextlib.suppress(_StreamClosed):
                await call.hang_up()
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)


# --------------------------------------------------------------------------------------------------- CLI


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
    call.add_argument("--url", default="http://127.0.0.1:8080", help="the engine's base URL")
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

    try:
        result = await simulate_call(
            args.url,
            to=args.to,
            from_=args.from_,
            script=list(args.steps),
            auth_token=token,
            public_url=args.public_url or settings.public_url or args.url,
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
    if args.save:
        await asyncio.to_thread(result.save_heard, args.save)
        print(f"saved what the caller heard to {args.save}", flush=True)
    return 0 if result.ending in (CallEnding.CALLER_HUNG_UP, CallEnding.ENGINE_CLOSED) else 1
