"""The Twilio Media Streams protocol as a sans-I/O state machine: JSON text frames in, typed events out.

`TwilioStream` parses each text frame Twilio sends (`receive_text`) into typed events and builds the frames the
engine sends back (`send_media`, `send_mark`, `send_clear`); it owns no socket. Its `PlaybackClock` turns Twilio's
mark echoes, the only truth about what the caller has heard, into played / in-flight milliseconds per utterance.

Mark names carry a generation and the utterance id: ``g{generation}-u{utterance_id}-{seq}``. `send_clear` starts a
new generation; Twilio echoes every pending mark right after a clear exactly as if it had been played, so echoes of
marks from an older generation are reported as `MarkFlushed`, never `MarkPlayed`. An echoed name that matches no
pending mark (Twilio only echoes ours, so this means a duplicate or a bug) is reported as `UnknownMark` and does not
fail the stream: the playback clock stays correct without it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from media.g711 import BYTES_PER_MS

__all__ = [
    "CALLER_TRACK",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "MEDIA_LEAD_MS",
    "AheadOfRealTime",
    "Connected",
    "DtmfReceived",
    "InvalidState",
    "MalformedMessage",
    "MarkFlushed",
    "MarkPlayed",
    "MediaFormat",
    "MediaGap",
    "MediaReceived",
    "MessageTooLarge",
    "PlaybackClock",
    "Started",
    "Stopped",
    "StreamEvent",
    "StreamProtocolError",
    "StreamState",
    "TwilioStream",
    "TwilioStreamError",
    "UnexpectedMessage",
    "UnknownEvent",
    "UnknownMark",
    "UtterancePlayback",
]

CALLER_TRACK: Final = "inbound"
"""The track of the caller's voice. A stream started with both tracks also sends "outbound": what Twilio plays to
the caller, i.e. the agent's own audio, which is not the caller speaking."""
DEFAULT_MAX_MESSAGE_SIZE: Final = 64 * 1024
"""Largest text frame accepted, in characters (Twilio frames are ASCII); a 20 ms media frame is about 400."""
DEFAULT_MAX_PAYLOAD_SIZE: Final = 8000
"""Largest decoded media payload accepted, in bytes: one second of audio (Twilio sends 160-byte frames)."""
MEDIA_LEAD_MS: Final = 2000
"""How far a track's audio may run ahead of the time elapsed since `start`, by its timestamps or by its amount.

Twilio's clock starts before its `start` reaches us (one network trip) and a network stall delivers the audio it
held back all at once; two seconds covers both. Audio further ahead cannot come from Twilio's real-time stream: a
client sending faster than real time, or one timestamp far in the future, is a protocol error of that call.
"""
_MAX_DIGITS = 15
"""Longest digit string read as a number (Twilio's counters fit; it also bounds the cost of int())."""

# An inbound media frame exactly as Twilio writes it (keys in its order, no spaces, no escapes): fifty of these a
# second per call are read by slicing instead of json.loads and a field-by-field walk. Any other spelling of the
# same message, and every other message, goes through the general parser, which checks everything.
_TWILIO_MEDIA_HEAD = (
    r'\{"event":"media","sequenceNumber":"([0-9]{1,15})","streamSid":"([^"\\]{1,128})","media":\{"track":"([a-z_]{1,32})",'
    r'"chunk":"([0-9]{1,15})","timestamp":"([0-9]{1,15})","payload":"'
)
_TWILIO_MEDIA = re.compile(_TWILIO_MEDIA_HEAD + r'([A-Za-z0-9+/=]*)"\}\}')
# All but the payload, whose characters strict base64 decoding checks anyway (a third of the regex's time saved).
_TWILIO_MEDIA_FIELDS = re.compile(_TWILIO_MEDIA_HEAD)
_DTMF_DIGIT = re.compile(r"[0-9*#A-D]")
"""A key of a telephone keypad (and the A-D of the 16-key one): what a `dtmf` message's digit can be."""


# --------------------------------------------------------------------------------------------------- errors


class TwilioStreamError(Exception):
    """Base class of every error raised by this module."""


class StreamProtocolError(TwilioStreamError):
    """Twilio sent something the protocol does not allow; the stream is now FAILED."""


class MalformedMessage(StreamProtocolError):
    """A frame is not a JSON object, or a field is missing, of the wrong type or not decodable."""


class UnexpectedMessage(StreamProtocolError):
    """A well-formed message arrived in a state that does not allow it (media before start, anything after stop)."""


class UnknownEvent(StreamProtocolError):
    """A message's `event` is not one Twilio Media Streams defines."""


class MessageTooLarge(StreamProtocolError):
    """A frame or a decoded media payload is larger than the configured limit."""


class AheadOfRealTime(StreamProtocolError):
    """Inbound audio runs more than `MEDIA_LEAD_MS` ahead of the time elapsed since `start`."""


class InvalidState(TwilioStreamError):
    """The engine used the stream in a state that does not allow it (input after FAILED, sending before start)."""


# --------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class MediaFormat:
    """The audio format announced in `start` (always mu-law, 8000 Hz, mono in practice)."""

    encoding: str
    sample_rate: int
    channels: int


@dataclass(frozen=True, slots=True)
class Connected:
    """Twilio opened the stream (`connected`); it may be absent, in which case `start` comes first."""

    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Started:
    """The stream started (`start`): its ids, tracks, the TwiML `<Parameter>` values and the audio format."""

    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    media_format: MediaFormat
    sequence_number: int | None


@dataclass(frozen=True, slots=True)
class MediaReceived:
    """A chunk of caller audio (`media`), decoded from base64 to mu-law bytes, with its numbers as integers."""

    payload: bytes
    track: str
    chunk: int
    timestamp_ms: int
    sequence_number: int


@dataclass(frozen=True, slots=True)
class MediaGap:
    """Chunks are missing before this one on `track` (Twilio dropped audio, warning 31930); emitted before it."""

    track: str
    expected_chunk: int
    got_chunk: int
    missing_ms: int


@dataclass(frozen=True, slots=True)
class DtmfReceived:
    """The caller pressed a key (`dtmf`)."""

    digit: str
    track: str


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    """Twilio played the audio up to one of our marks; `played_ms_of_utterance` counts from the utterance's start."""

    name: str
    utterance_id: int
    played_ms_of_utterance: int
    final: bool


@dataclass(frozen=True, slots=True)
class MarkFlushed:
    """A mark sent before a `clear` came back: its audio was dropped, not played, past `played_ms_of_utterance`."""

    name: str
    utterance_id: int
    played_ms_of_utterance: int


@dataclass(frozen=True, slots=True)
class UnknownMark:
    """Twilio echoed a mark name that matches no pending mark of ours (reported, not fatal)."""

    name: str


@dataclass(frozen=True, slots=True)
class Stopped:
    """The stream stopped (`stop`): the call ended or the stream was stopped; the socket closes next."""

    call_sid: str
    account_sid: str


StreamEvent = (
    Connected | Started | MediaReceived | MediaGap | DtmfReceived | MarkPlayed | MarkFlushed | UnknownMark | Stopped
)


# --------------------------------------------------------------------------------------------------- playback


@dataclass(frozen=True, slots=True)
class UtterancePlayback:
    """What the caller has heard of one utterance: ms sent, ms confirmed by marks, and how it ended."""

    utterance_id: int
    sent_ms: int
    played_ms: int
    finished: bool
    cleared: bool


@dataclass(slots=True)
class _Utterance:
    sent_bytes: int = 0
    played_bytes: int = 0
    finished: bool = False
    cleared: bool = False


@dataclass(frozen=True, slots=True)
class _PendingMark:
    name: str
    generation: int
    utterance_id: int
    utterance_bytes: int  # audio of this utterance sent before the mark
    position_bytes: int  # audio of the whole stream sent before the mark


class PlaybackClock:
    """Outbound audio accounting from mark echoes: sent = played + cleared + in flight, overall and per utterance.

    Positions are byte offsets on the timeline of all audio sent. A played mark confirms everything before its
    position; a clear resolves everything sent so far as dropped beyond what marks had confirmed (a lower bound on
    what was heard; `OutboundAudio.clear` says where the caller's playback had reached, by the clock).
    """

    __slots__ = ("_generation", "_marks", "_open", "_pending", "_played", "_resolved", "_sent", "_seq", "_utterances")

    def __init__(self) -> None:
        """Start with nothing sent, generation 0."""
        self._generation = 0
        self._seq = 0
        self._sent = 0
        self._played = 0
        self._resolved = 0  # position up to which audio is known played or dropped
        self._pending: deque[_PendingMark] = deque()
        self._marks: dict[str, bool] = {}  # pending mark name -> final
        self._utterances: dict[int, _Utterance] = {}
        self._open: set[int] = set()  # utterances with audio not yet confirmed or cleared

    @property
    def generation(self) -> int:
        """The current generation: the number of clears so far."""
        return self._generation

    @property
    def sent_ms(self) -> int:
        """All audio sent to Twilio, in ms."""
        return self._sent // BYTES_PER_MS

    @property
    def played_ms(self) -> int:
        """Audio confirmed played by mark echoes, in ms."""
        return self._played // BYTES_PER_MS

    @property
    def cleared_ms(self) -> int:
        """Audio sent but not confirmed when a clear dropped Twilio's buffer, in ms."""
        return (self._resolved - self._played) // BYTES_PER_MS

    @property
    def in_flight_ms(self) -> int:
        """Audio sent that no mark has confirmed and no clear has dropped yet, in ms."""
        return (self._sent - self._resolved) // BYTES_PER_MS

    @property
    def pending_marks(self) -> int:
        """Marks sent whose echo has not come back."""
        return len(self._pending)

    def utterance(self, utterance_id: int) -> UtterancePlayback:
        """What the caller has heard of `utterance_id` so far (all zero if nothing was sent for it)."""
        state = self._utterances.get(utterance_id) or _Utterance()
        return UtterancePlayback(
            utterance_id=utterance_id,
            sent_ms=state.sent_bytes // BYTES_PER_MS,
            played_ms=state.played_bytes // BYTES_PER_MS,
            finished=state.finished,
            cleared=state.cleared,
        )

    def record_media(self, size: int, utterance_id: int | None) -> None:
        """Count `size` bytes of audio sent, as part of `utterance_id` if given."""
        self._sent += size
        if utterance_id is not None:
            self._utterance_state(utterance_id).sent_bytes += size
            self._open.add(utterance_id)

    def record_mark(self, utterance_id: int, *, final: bool) -> str:
        """Record a mark placed after the audio sent so far and return its name."""
        self._seq += 1
        name = f"g{self._generation}-u{utterance_id}-{self._seq}"
        state = self._utterance_state(utterance_id)
        self._pending.append(_PendingMark(name, self._generation, utterance_id, state.sent_bytes, self._sent))
        self._marks[name] = final
        return name

    def record_clear(self) -> None:
        """Start a new generation: audio not yet confirmed is dropped, pending marks will come back flushed."""
        self._generation += 1
        self._resolved = self._sent
        for utterance_id in self._open:
            state = self._utterances[utterance_id]
            if not state.finished:
                state.cleared = True
        self._open.clear()

    def resolve_echo(self, name: str) -> MarkPlayed | MarkFlushed | UnknownMark:
        """Turn a mark echo from Twilio into played, flushed or unknown, and move the clock."""
        final = self._marks.pop(name, None)
        if final is None:
            return UnknownMark(name)
        mark = self._pending.popleft() if self._pending[0].name == name else self._remove_pending(name)
        state = self._utterances[mark.utterance_id]
        if mark.generation != self._generation:
            return MarkFlushed(name, mark.utterance_id, state.played_bytes // BYTES_PER_MS)
        if mark.position_bytes > self._resolved:
            self._played += mark.position_bytes - self._resolved
            self._resolved = mark.position_bytes
        state.played_bytes = max(state.played_bytes, mark.utterance_bytes)
        if final:
            state.finished = True
            self._open.discard(mark.utterance_id)
        return MarkPlayed(name, mark.utterance_id, state.played_bytes // BYTES_PER_MS, final)

    def _remove_pending(self, name: str) -> _PendingMark:
        # Twilio echoes in order, so this slow path only runs if it ever does not.
        for mark in self._pending:
            if mark.name == name:
                self._pending.remove(mark)
                return mark
        raise AssertionError(f"mark {name} is in the index but not in the queue")  # pragma: no cover

    def _utterance_state(self, utterance_id: int) -> _Utterance:
        state = self._utterances.get(utterance_id)
        if state is None:
            state = self._utterances[utterance_id] = _Utterance()
        return state


# --------------------------------------------------------------------------------------------------- stream


class StreamState(enum.Enum):
    """Where a Twilio media stream is in its life."""

    AWAITING_CONNECTED = "awaiting_connected"
    AWAITING_START = "awaiting_start"
    STREAMING = "streaming"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(slots=True)
class _TrackCursor:
    next_chunk: int
    next_timestamp_ms: int
    received_bytes: int = 0


@dataclass(slots=True)
class _MediaStats:
    dropped_chunks: int = 0
    dropped_ms: int = 0
    cursors: dict[str, _TrackCursor] = field(default_factory=dict)


class TwilioStream:
    """One call's Twilio Media Stream: parse frames with `receive_text`, build replies with the `send_*` methods.

    Any protocol error moves the stream to FAILED and raises; after that every call raises `InvalidState`, and the
    engine should end that call. `clock` (monotonic seconds) measures the time since `start` that inbound audio
    is held to (`MEDIA_LEAD_MS`).
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a stream waiting for `connected` (or `start`)."""
        self.max_message_size = max_message_size
        self.max_payload_size = max_payload_size
        self.state = StreamState.AWAITING_CONNECTED
        self.started: Started | None = None
        self._clock = clock
        self._started_at = 0.0
        self._elapsed_seen_ms = 0  # the last elapsed_ms() read: a floor of the present one, as time only moves on
        self.playback = PlaybackClock()
        self.last_sequence_number: int | None = None
        self._media = _MediaStats()
        self._stream_sid_json = ""
        self._media_prefix = ""

    @property
    def stream_sid(self) -> str | None:
        """The stream's sid once `start` has arrived."""
        return self.started.stream_sid if self.started else None

    def elapsed_ms(self) -> int:
        """Milliseconds since `start` arrived (0 before): the call's real time, which its audio may not outrun."""
        if self.started is None:
            return 0
        self._elapsed_seen_ms = elapsed = round((self._clock() - self._started_at) * 1000)
        return elapsed

    @property
    def dropped_chunks(self) -> int:
        """Inbound media chunks Twilio skipped, summed over the tracks (see `MediaGap`)."""
        return self._media.dropped_chunks

    @property
    def dropped_ms(self) -> int:
        """Inbound audio missing by the media timestamps, in ms, summed over the tracks."""
        return self._media.dropped_ms

    # ------------------------------------------------------------------------------------------- inbound

    def receive_text(self, text: str) -> list[StreamEvent]:
        """Parse one WebSocket text frame from Twilio into the events it carries."""
        if self.state is StreamState.FAILED:
            raise InvalidState("the stream has failed; end the call instead of feeding it more frames")
        try:
            return self._receive(text)
        except StreamProtocolError:
            self.state = StreamState.FAILED
            raise

    def receive_media(self, text: str) -> tuple[bytes, int] | None:
        """The payload and timestamp of a media frame that continues its track, spelled exactly as Twilio spells it.

        Fifty frames a second per call take this path: no event objects, nothing but the payload's numbers. It
        answers None for anything else (another message, another spelling, another track than the caller's, the
        first frame of a track, a gap, a late frame, a payload that does not decode); give that frame to
        `receive_text`, which parses and checks everything and says what is wrong.
        """
        if self.state is not StreamState.STREAMING or len(text) > self.max_message_size:
            return None
        fast = _TWILIO_MEDIA_FIELDS.match(text)
        if fast is None or not text.endswith('"}}') or len(text) < fast.end() + 3:
            return None
        sequence, stream_sid, track, chunk, timestamp = fast.groups()
        if track != CALLER_TRACK:
            return None
        encoded = text[fast.end() : -3]
        cursor = self._media.cursors.get(track)
        if cursor is None or int(chunk) != cursor.next_chunk or self.started is None:
            return None
        if stream_sid != self.started.stream_sid or len(encoded) // 4 * 3 > self.max_payload_size + 2:
            return None
        try:
            payload = binascii.a2b_base64(encoded, strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        if len(payload) > self.max_payload_size:
            return None
        timestamp_ms = int(timestamp)
        if self._ahead_ms(cursor, timestamp_ms, len(payload)) > MEDIA_LEAD_MS:
            return None
        self.last_sequence_number = int(sequence)
        cursor.next_chunk += 1
        cursor.next_timestamp_ms = timestamp_ms + len(payload) // BYTES_PER_MS
        cursor.received_bytes += len(payload)
        return payload, timestamp_ms

    def _receive(self, text: str) -> list[StreamEvent]:
        if len(text) > self.max_message_size:
            raise MessageTooLarge(f"frame of {len(text)} characters exceeds the limit of {self.max_message_size}")
        if self.state is StreamState.STREAMING and (events := self._fast_media(text)) is not None:
            return events
        return self._receive_json(text)

    def _receive_json(self, text: str) -> list[StreamEvent]:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: arrays or objects nested thousands deep
            raise MalformedMessage(f"frame is not JSON: {type(exc).__name__}: {exc}") from None
        if not isinstance(message, dict):
            raise MalformedMessage(f"frame is a JSON {type(message).__name__}, expected an object")
        event = message.get("event")
        if not isinstance(event, str):
            raise MalformedMessage("event: missing or not a string")
        if self.state is StreamState.STOPPED:
            raise UnexpectedMessage(f"{event!r} arrived after stop")
        match event:
            case "connected":
                return self._on_connected(message)
            case "start":
                return self._on_start(message)
            case "media":
                return self._on_media(message)
            case "dtmf":
                return self._on_dtmf(message)
            case "mark":
                return self._on_mark(message)
            case "stop":
                return self._on_stop(message)
            case _:
                raise UnknownEvent(f"event {event!r} is not a Twilio Media Streams event")

    def _fast_media(self, text: str) -> list[StreamEvent] | None:
        """The events of a media frame spelled exactly as Twilio spells it, or None for the general parser."""
        fast = _TWILIO_MEDIA.fullmatch(text)
        if fast is None:
            return None
        sequence, stream_sid, track, chunk, timestamp, encoded = fast.groups()
        if self.started is None or stream_sid != self.started.stream_sid:
            return None  # the general parser says what is wrong
        self.last_sequence_number = sequence_number = int(sequence)
        return self._media_events(track, int(chunk), int(timestamp), self._decode(encoded), sequence_number)

    def _on_connected(self, message: dict[str, Any]) -> list[StreamEvent]:
        self._expect("connected", StreamState.AWAITING_CONNECTED)
        self.state = StreamState.AWAITING_START
        return [Connected(_string(message, "protocol", "protocol"), _string(message, "version", "version"))]

    def _on_start(self, message: dict[str, Any]) -> list[StreamEvent]:
        self._expect("start", StreamState.AWAITING_CONNECTED, StreamState.AWAITING_START)
        sequence_number = self._sequence_number(message)
        start = _object(message, "start", "start")
        stream_sid = start.get("streamSid", message.get("streamSid"))
        if not isinstance(stream_sid, str) or not stream_sid:
            raise MalformedMessage("start.streamSid: missing or not a non-empty string")
        tracks = start.get("tracks", [])
        if not isinstance(tracks, list) or not all(isinstance(track, str) for track in tracks):
            raise MalformedMessage("start.tracks: expected a list of strings")
        parameters = start.get("customParameters", {})
        if not isinstance(parameters, dict) or not all(isinstance(value, str) for value in parameters.values()):
            raise MalformedMessage("start.customParameters: expected an object of string values")
        media_format = _object(start, "mediaFormat", "start.mediaFormat")
        self.started = Started(
            stream_sid=stream_sid,
            call_sid=_string(start, "callSid", "start.callSid"),
            account_sid=_string(start, "accountSid", "start.accountSid"),
            tracks=tuple(tracks),
            custom_parameters=dict(parameters),
            media_format=MediaFormat(
                encoding=_string(media_format, "encoding", "start.mediaFormat.encoding"),
                sample_rate=_integer(media_format, "sampleRate", "start.mediaFormat.sampleRate"),
                channels=_integer(media_format, "channels", "start.mediaFormat.channels"),
            ),
            sequence_number=sequence_number,
        )
        # Built once so each outbound media frame is two string concatenations, not a json.dumps.
        self._stream_sid_json = json.dumps(stream_sid)
        self._media_prefix = '{"event":"media","streamSid":' + self._stream_sid_json + ',"media":{"payload":"'
        self._started_at = self._clock()
        self.state = StreamState.STREAMING
        return [self.started]

    def _on_media(self, message: dict[str, Any]) -> list[StreamEvent]:
        self._expect("media", StreamState.STREAMING)
        sequence_number = self._sequence_number(message)
        if sequence_number is None:
            raise MalformedMessage("sequenceNumber: missing on media")
        media = _object(message, "media", "media")
        track = _string(media, "track", "media.track")
        chunk = _integer(media, "chunk", "media.chunk")
        timestamp_ms = _integer(media, "timestamp", "media.timestamp")
        encoded = _string(media, "payload", "media.payload", allow_empty=True)
        return self._media_events(track, chunk, timestamp_ms, self._decode(encoded), sequence_number)

    def _media_events(
        self, track: str, chunk: int, timestamp_ms: int, payload: bytes, sequence_number: int
    ) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        cursor = self._media.cursors.get(track)
        if cursor is None:
            cursor = _TrackCursor(chunk, timestamp_ms)
        ahead_ms = self._ahead_ms(cursor, timestamp_ms, len(payload))
        if ahead_ms > MEDIA_LEAD_MS:
            raise AheadOfRealTime(
                f"{track} audio runs {ahead_ms} ms ahead of the {self.elapsed_ms()} ms since start "
                f"(timestamp {timestamp_ms}); Twilio's real-time stream leads by at most {MEDIA_LEAD_MS} ms"
            )
        cursor.received_bytes += len(payload)
        if track not in self._media.cursors:
            self._media.cursors[track] = cursor
        elif chunk > cursor.next_chunk:
            missing_ms = max(0, timestamp_ms - cursor.next_timestamp_ms)
            self._media.dropped_chunks += chunk - cursor.next_chunk
            self._media.dropped_ms += missing_ms
            events.append(MediaGap(track, cursor.next_chunk, chunk, missing_ms))
        if chunk >= cursor.next_chunk:  # a late or repeated chunk does not move the cursor back
            cursor.next_chunk = chunk + 1
            cursor.next_timestamp_ms = timestamp_ms + len(payload) // BYTES_PER_MS
        events.append(MediaReceived(payload, track, chunk, timestamp_ms, sequence_number))
        return events

    def _ahead_ms(self, cursor: _TrackCursor, timestamp_ms: int, size: int) -> int:
        """How far a track would run ahead of real time with this frame: by its timestamp or by all audio received.

        Exact when past `MEDIA_LEAD_MS`; below it, possibly more than exact: the clock is read only when the last
        reading puts the frame past the lead (every couple of seconds of a real-time stream, not every frame).
        """
        end_ms = (max(timestamp_ms * BYTES_PER_MS, cursor.received_bytes) + size) // BYTES_PER_MS
        ahead_ms = end_ms - self._elapsed_seen_ms
        return ahead_ms if ahead_ms <= MEDIA_LEAD_MS else end_ms - self.elapsed_ms()

    def _on_dtmf(self, message: dict[str, Any]) -> list[StreamEvent]:
        self._expect("dtmf", StreamState.STREAMING)
        self._sequence_number(message)
        dtmf = _object(message, "dtmf", "dtmf")
        track = dtmf.get("track", "inbound_track")
        if not isinstance(track, str):
            raise MalformedMessage("dtmf.track: expected a string")
        digit = _string(dtmf, "digit", "dtmf.digit")
        if not _DTMF_DIGIT.fullmatch(digit):  # it reaches the model as the caller's key: nothing else may pass as one
            raise MalformedMessage(f"dtmf.digit: {digit[:20]!r} is not a keypad key (0-9, *, #, A-D)")
        return [DtmfReceived(digit, track)]

    def _on_mark(self, message: dict[str, Any]) -> list[StreamEvent]:
        self._expect("mark", StreamState.STREAMING)
        self._sequence_number(message)
        mark = _object(message, "mark", "mark")
        return [self.playback.resolve_echo(_string(mark, "name", "mark.name"))]

    def _on_stop(self, message: dict[str, Any]) -> list[StreamEvent]:
        # A call that hangs up during setup may stop before start; that is an ordinary end, not an error.
        self._expect("stop", StreamState.AWAITING_CONNECTED, StreamState.AWAITING_START, StreamState.STREAMING)
        self._sequence_number(message)
        stop = _object(message, "stop", "stop")
        stopped = Stopped(_string(stop, "callSid", "stop.callSid"), _string(stop, "accountSid", "stop.accountSid"))
        self.state = StreamState.STOPPED
        return [stopped]

    def _expect(self, event: str, *states: StreamState) -> None:
        if self.state not in states:
            raise UnexpectedMessage(f"{event!r} is not allowed in state {self.state.name}")

    def _sequence_number(self, message: dict[str, Any]) -> int | None:
        self._check_stream_sid(message)
        if "sequenceNumber" not in message:
            return None
        number = _integer(message, "sequenceNumber", "sequenceNumber")
        self.last_sequence_number = number
        return number

    def _check_stream_sid(self, message: dict[str, Any]) -> None:
        # Tolerated when absent (Twilio's own dtmf example omits it); a different sid means a crossed stream.
        sid = message.get("streamSid")
        if sid is not None and self.started is not None and sid != self.started.stream_sid:
            raise UnexpectedMessage(f"streamSid {sid!r} does not match this stream's {self.started.stream_sid!r}")

    def _decode(self, encoded: str) -> bytes:
        if len(encoded) // 4 * 3 > self.max_payload_size + 2:  # checked before decoding anything
            raise MessageTooLarge(f"media.payload decodes past the limit of {self.max_payload_size} bytes")
        try:
            # strict: only the base64 alphabet, padding only at the end (what b64decode's validate checks in Python)
            payload = binascii.a2b_base64(encoded, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedMessage(f"media.payload: invalid base64 ({exc})") from None
        if len(payload) > self.max_payload_size:
            raise MessageTooLarge(f"media.payload of {len(payload)} bytes exceeds the limit of {self.max_payload_size}")
        return payload

    # ------------------------------------------------------------------------------------------- outbound

    def send_media(self, ulaw: bytes, utterance_id: int | None = None) -> str:
        """Build a `media` frame playing `ulaw` (mu-law 8 kHz, any size), counted as part of `utterance_id`."""
        self._require_streaming("send media")
        self.playback.record_media(len(ulaw), utterance_id)
        return self._media_prefix + base64.b64encode(ulaw).decode("ascii") + '"}}'

    def send_mark(self, utterance_id: int, *, final: bool = False) -> str:
        """Build a `mark` frame after the audio sent so far; `final` marks the utterance's last audio."""
        self._require_streaming("send a mark")
        name = self.playback.record_mark(utterance_id, final=final)
        return '{"event":"mark","streamSid":' + self._stream_sid_json + ',"mark":{"name":' + json.dumps(name) + "}}"

    def send_clear(self) -> str:
        """Build a `clear` frame (barge-in): Twilio drops its buffer and pending marks come back as flushed."""
        self._require_streaming("send clear")
        self.playback.record_clear()
        return '{"event":"clear","streamSid":' + self._stream_sid_json + "}"

    def _require_streaming(self, action: str) -> None:
        if self.state is not StreamState.STREAMING:
            raise InvalidState(f"cannot {action} in state {self.state.name}; Twilio accepts frames only after start")


# --------------------------------------------------------------------------------------------------- fields


def _object(container: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = container.get(key)
    if not isinstance(value, dict):
        raise MalformedMessage(f"{path}: missing or not an object")
    return value


def _string(container: dict[str, Any], key: str, path: str, *, allow_empty: bool = False) -> str:
    value = container.get(key)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise MalformedMessage(f"{path}: missing or not a non-empty string")
    return value


def _integer(container: dict[str, Any], key: str, path: str) -> int:
    """Twilio sends numbers as strings of digits; accept those and plain non-negative integers, of `_MAX_DIGITS`."""
    value = container.get(key)
    if isinstance(value, str) and len(value) <= _MAX_DIGITS and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**_MAX_DIGITS:
        return value
    if isinstance(value, str) and len(value) > 40:
        value = f"{value[:20]}... ({len(value)} characters)"
    raise MalformedMessage(f"{path}: expected a non-negative integer of at most {_MAX_DIGITS} digits, got {value!r}")
