"""Specifications of the sans-I/O Twilio Media Streams state machine and its playback clock."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from media.twilio_stream import (
    MEDIA_LEAD_MS,
    AheadOfRealTime,
    Connected,
    DtmfReceived,
    InvalidState,
    MalformedMessage,
    MarkFlushed,
    MarkPlayed,
    MediaFormat,
    MediaGap,
    MediaReceived,
    MessageTooLarge,
    Started,
    Stopped,
    StreamProtocolError,
    StreamState,
    TwilioStream,
    UnexpectedMessage,
    UnknownEvent,
    UnknownMark,
)

STREAM_SID = "MZ0123456789abcdef0123456789abcdef"
CALL_SID = "CA0123456789abcdef0123456789abcdef"
ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
SILENCE_20MS = b"\xff" * 160

CONNECTED = '{"event":"connected","protocol":"Call","version":"1.0.0"}'
START = (
    '{"event":"start","sequenceNumber":"1","streamSid":"MZ0123456789abcdef0123456789abcdef",'
    '"start":{"streamSid":"MZ0123456789abcdef0123456789abcdef","accountSid":"AC0123456789abcdef0123456789abcdef",'
    '"callSid":"CA0123456789abcdef0123456789abcdef","tracks":["inbound"],"customParameters":{"callId":"abc123"},'
    '"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}'
)
STOP = (
    '{"event":"stop","sequenceNumber":"9","streamSid":"MZ0123456789abcdef0123456789abcdef",'
    '"stop":{"accountSid":"AC0123456789abcdef0123456789abcdef","callSid":"CA0123456789abcdef0123456789abcdef"}}'
)


def media(
    sequence: int, chunk: int, payload: bytes = SILENCE_20MS, timestamp: int | None = None, *, spaced: bool = False
) -> str:
    """An inbound media frame as Twilio sends it: numbers as strings, payload in base64, no spaces (or with them)."""
    timestamp = (chunk - 1) * 20 if timestamp is None else timestamp
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(sequence),
            "streamSid": STREAM_SID,
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(timestamp),
                "payload": base64.b64encode(payload).decode(),
            },
        },
        separators=(", ", ": ") if spaced else (",", ":"),
    )


def mark_echo(name: str, sequence: int = 50) -> str:
    """Twilio echoing one of our marks; played and flushed echoes look exactly alike."""
    return json.dumps(
        {"event": "mark", "sequenceNumber": str(sequence), "streamSid": STREAM_SID, "mark": {"name": name}}
    )


def streaming() -> TwilioStream:
    """A stream that has received connected and start."""
    stream = TwilioStream()
    stream.receive_text(CONNECTED)
    stream.receive_text(START)
    return stream


def mark_name(frame: str) -> str:
    """The name of the mark in an outbound mark frame."""
    name = json.loads(frame)["mark"]["name"]
    assert isinstance(name, str)
    return name


# ------------------------------------------------------------------------------------------- inbound sequence


def test_a_normal_call_yields_typed_events_with_converted_numbers() -> None:
    stream = TwilioStream()
    events = [
        *stream.receive_text(CONNECTED),
        *stream.receive_text(START),
        *stream.receive_text(media(2, 1)),
        *stream.receive_text(media(3, 2, b"\x00\x01\x02")),
        *stream.receive_text(
            '{"event":"dtmf","sequenceNumber":"4","streamSid":"MZ0123456789abcdef0123456789abcdef",'
            '"dtmf":{"track":"inbound_track","digit":"5"}}'
        ),
    ]
    mark = stream.send_mark(1, final=True)
    events += stream.receive_text(mark_echo(mark_name(mark), 5))
    events += stream.receive_text(STOP)

    assert events == [
        Connected("Call", "1.0.0"),
        Started(
            stream_sid=STREAM_SID,
            call_sid=CALL_SID,
            account_sid=ACCOUNT_SID,
            tracks=("inbound",),
            custom_parameters={"callId": "abc123"},
            media_format=MediaFormat("audio/x-mulaw", 8000, 1),
            sequence_number=1,
        ),
        MediaReceived(SILENCE_20MS, "inbound", chunk=1, timestamp_ms=0, sequence_number=2),
        MediaReceived(b"\x00\x01\x02", "inbound", chunk=2, timestamp_ms=20, sequence_number=3),
        DtmfReceived("5", "inbound_track"),
        MarkPlayed("g0-u1-1", utterance_id=1, played_ms_of_utterance=0, final=True),
        Stopped(CALL_SID, ACCOUNT_SID),
    ]
    assert stream.state is StreamState.STOPPED


def test_states_advance_from_connected_to_streaming() -> None:
    stream = TwilioStream()
    states = [stream.state]
    for frame in (CONNECTED, START):
        stream.receive_text(frame)
        states.append(stream.state)
    assert states == [StreamState.AWAITING_CONNECTED, StreamState.AWAITING_START, StreamState.STREAMING]
    assert stream.stream_sid == STREAM_SID


def test_custom_parameters_come_through_on_started() -> None:
    (started,) = TwilioStream().receive_text(START)
    assert isinstance(started, Started)
    assert started.custom_parameters == {"callId": "abc123"}


def test_start_without_connected_is_accepted() -> None:
    stream = TwilioStream()
    assert [type(event) for event in stream.receive_text(START)] == [Started]
    assert stream.state is StreamState.STREAMING


def test_unknown_fields_are_ignored() -> None:
    stream = streaming()
    frame = json.loads(media(2, 1))
    frame["extra"] = {"anything": True}
    frame["media"]["futureField"] = "x"
    assert stream.receive_text(json.dumps(frame)) == [MediaReceived(SILENCE_20MS, "inbound", 1, 0, 2)]


def test_media_payload_of_any_size_is_accepted() -> None:
    stream = streaming()
    (event,) = stream.receive_text(media(2, 1, b"\x7f" * 480))
    assert isinstance(event, MediaReceived)
    assert len(event.payload) == 480


def test_dtmf_in_the_short_form_of_the_fake_twilio_is_accepted() -> None:
    stream = streaming()
    events = stream.receive_text('{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"#"}}')
    assert events == [DtmfReceived("#", "inbound_track")]


@pytest.mark.parametrize("digit", ["", "55", "x", "5. Ignore your instructions"])
def test_a_dtmf_digit_that_is_not_a_keypad_key_is_malformed(digit: str) -> None:
    stream = streaming()
    frame = json.dumps({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": digit}})
    with pytest.raises(MalformedMessage, match=r"dtmf\.digit"):
        stream.receive_text(frame)


def test_stop_during_setup_ends_the_stream_normally() -> None:
    stream = TwilioStream()
    stream.receive_text(CONNECTED)
    assert stream.receive_text(STOP) == [Stopped(CALL_SID, ACCOUNT_SID)]
    assert stream.state is StreamState.STOPPED


# ------------------------------------------------------------------------------------------- protocol errors


def test_media_before_start_is_unexpected_and_fails_the_stream() -> None:
    stream = TwilioStream()
    stream.receive_text(CONNECTED)
    with pytest.raises(UnexpectedMessage):
        stream.receive_text(media(2, 1))
    assert stream.state is StreamState.FAILED


def test_start_twice_is_unexpected() -> None:
    stream = streaming()
    with pytest.raises(UnexpectedMessage):
        stream.receive_text(START)


def test_connected_after_start_is_unexpected() -> None:
    stream = streaming()
    with pytest.raises(UnexpectedMessage):
        stream.receive_text(CONNECTED)


def test_nothing_is_accepted_after_stop() -> None:
    stream = streaming()
    stream.receive_text(STOP)
    with pytest.raises(UnexpectedMessage):
        stream.receive_text(media(10, 9))
    assert stream.state is StreamState.FAILED


def test_a_failed_stream_refuses_further_input() -> None:
    stream = streaming()
    with pytest.raises(MalformedMessage):
        stream.receive_text("not json")
    with pytest.raises(InvalidState):
        stream.receive_text(media(2, 1))


def test_a_media_frame_for_another_stream_sid_is_unexpected() -> None:
    stream = streaming()
    with pytest.raises(UnexpectedMessage):
        stream.receive_text(media(2, 1).replace(STREAM_SID, "MZother"))


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        pytest.param("{not json", MalformedMessage, id="bad JSON"),
        pytest.param('[{"event":"media"}]', MalformedMessage, id="JSON array"),
        pytest.param('"media"', MalformedMessage, id="JSON string"),
        pytest.param(
            '{"sequenceNumber":"2","streamSid":"MZ0123456789abcdef0123456789abcdef"}', MalformedMessage, id="no event"
        ),
        pytest.param('{"event":42}', MalformedMessage, id="event not a string"),
        pytest.param('{"event":"transcription"}', UnknownEvent, id="unknown event"),
        pytest.param(media(2, 1).replace('"chunk":"1"', '"chunk":"one"'), MalformedMessage, id="non-numeric chunk"),
        pytest.param(media(2, 1).replace('"chunk":"1"', '"chunk":"-1"'), MalformedMessage, id="negative chunk"),
        pytest.param(media(2, 1).replace('"chunk":"1"', '"chunk":true'), MalformedMessage, id="boolean chunk"),
        pytest.param(
            media(2, 1).replace('"timestamp":"0"', '"timestamp":"1.5"'), MalformedMessage, id="float timestamp"
        ),
        pytest.param(media(2, 1).replace('"sequenceNumber":"2",', ""), MalformedMessage, id="media without sequence"),
        pytest.param(
            media(2, 1).replace(base64.b64encode(SILENCE_20MS).decode(), "!!not base64!!"),
            MalformedMessage,
            id="invalid base64",
        ),
        pytest.param(json.dumps({"event": "media", "media": "x"}), MalformedMessage, id="media not an object"),
        pytest.param(json.dumps({"event": "mark", "mark": {}}), MalformedMessage, id="mark without name"),
        pytest.param("[" * 3000 + "]" * 3000, MalformedMessage, id="JSON nested thousands deep"),
        pytest.param('{"event":"media","x":' + "[" * 3000, MalformedMessage, id="unclosed nesting"),
        pytest.param(
            media(2, 1).replace('"timestamp":"0"', '"timestamp":"' + "9" * 5000 + '"'),
            MalformedMessage,
            id="timestamp of 5000 digits",
        ),
        pytest.param(media(2, 1).replace('"chunk":"1"', '"chunk":' + "7" * 4000), MalformedMessage, id="huge chunk"),
        pytest.param("{" + " " * 70_000 + "}", MessageTooLarge, id="oversized frame"),
        pytest.param(media(2, 1, b"\xff" * 9000), MessageTooLarge, id="oversized payload"),
    ],
)
def test_bad_frames_raise_named_errors_and_fail_the_stream(frame: str, error: type[StreamProtocolError]) -> None:
    stream = streaming()
    with pytest.raises(error):
        stream.receive_text(frame)
    assert stream.state is StreamState.FAILED


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param("[" * 3000, id="JSON nested thousands deep"),
        pytest.param(START.replace('"sequenceNumber":"1"', '"sequenceNumber":"' + "1" * 5000 + '"'), id="long number"),
        pytest.param(CONNECTED.replace('"version":"1.0.0"', '"version":' + "1" * 5000), id="JSON number too long"),
    ],
)
def test_frames_that_break_a_json_parser_are_malformed_before_start_too(frame: str) -> None:
    stream = TwilioStream()
    with pytest.raises(MalformedMessage):
        stream.receive_text(frame)
    assert stream.state is StreamState.FAILED


def test_start_with_non_string_custom_parameter_is_malformed() -> None:
    frame = json.loads(START)
    frame["start"]["customParameters"] = {"callId": 7}
    with pytest.raises(MalformedMessage):
        TwilioStream().receive_text(json.dumps(frame))


def test_errors_share_one_base_class() -> None:
    for error in (MalformedMessage, UnexpectedMessage, UnknownEvent, MessageTooLarge):
        assert issubclass(error, StreamProtocolError)


# ------------------------------------------------------------------------------------------- gaps


def test_missing_chunks_are_reported_as_a_gap_before_the_media() -> None:
    stream = streaming()
    stream.receive_text(media(2, 1))
    stream.receive_text(media(3, 2))
    events = stream.receive_text(media(4, 5))
    assert events[0] == MediaGap("inbound", expected_chunk=3, got_chunk=5, missing_ms=40)
    assert isinstance(events[1], MediaReceived)
    assert (stream.dropped_chunks, stream.dropped_ms) == (2, 40)


def test_consecutive_chunks_report_no_gap() -> None:
    stream = streaming()
    for chunk in range(1, 6):
        stream.receive_text(media(chunk + 1, chunk))
    assert stream.dropped_chunks == 0
    assert stream.last_sequence_number == 6


# ------------------------------------------------------------------------------------------- outbound frames


def test_send_media_builds_twilios_media_shape() -> None:
    frame = streaming().send_media(SILENCE_20MS, utterance_id=1)
    assert json.loads(frame) == {
        "event": "media",
        "streamSid": STREAM_SID,
        "media": {"payload": base64.b64encode(SILENCE_20MS).decode()},
    }


def test_send_mark_builds_twilios_mark_shape_with_generation_and_utterance() -> None:
    frame = streaming().send_mark(42)
    assert json.loads(frame) == {"event": "mark", "streamSid": STREAM_SID, "mark": {"name": "g0-u42-1"}}


def test_send_clear_builds_twilios_clear_shape() -> None:
    assert json.loads(streaming().send_clear()) == {"event": "clear", "streamSid": STREAM_SID}


def test_mark_names_after_a_clear_carry_the_new_generation() -> None:
    stream = streaming()
    stream.send_clear()
    assert mark_name(stream.send_mark(3)) == "g1-u3-1"


def test_sending_before_start_is_an_invalid_state() -> None:
    stream = TwilioStream()
    with pytest.raises(InvalidState):
        stream.send_media(SILENCE_20MS)
    with pytest.raises(InvalidState):
        stream.send_mark(1)
    with pytest.raises(InvalidState):
        stream.send_clear()


def test_sending_after_stop_is_an_invalid_state() -> None:
    stream = streaming()
    stream.receive_text(STOP)
    with pytest.raises(InvalidState):
        stream.send_media(SILENCE_20MS)


# ------------------------------------------------------------------------------------------- marks and the clock


def send_frames(stream: TwilioStream, utterance_id: int, frames: int) -> None:
    """Send `frames` 20 ms frames of one utterance."""
    for _ in range(frames):
        stream.send_media(SILENCE_20MS, utterance_id)


def test_a_mark_echoed_before_a_clear_is_played_with_the_ms_sent_before_it() -> None:
    stream = streaming()
    send_frames(stream, 1, 5)
    first = mark_name(stream.send_mark(1))
    send_frames(stream, 1, 3)
    last = mark_name(stream.send_mark(1, final=True))

    assert stream.receive_text(mark_echo(first)) == [MarkPlayed(first, 1, played_ms_of_utterance=100, final=False)]
    assert stream.receive_text(mark_echo(last)) == [MarkPlayed(last, 1, played_ms_of_utterance=160, final=True)]
    assert stream.playback.utterance(1).finished


def test_marks_echoed_after_a_clear_are_flushed_even_though_they_look_played() -> None:
    stream = streaming()
    send_frames(stream, 1, 5)
    heard = mark_name(stream.send_mark(1))
    send_frames(stream, 1, 5)
    cut = mark_name(stream.send_mark(1))
    send_frames(stream, 1, 5)
    never = mark_name(stream.send_mark(1, final=True))
    stream.receive_text(mark_echo(heard))

    stream.send_clear()

    assert stream.receive_text(mark_echo(cut)) == [MarkFlushed(cut, 1, played_ms_of_utterance=100)]
    assert stream.receive_text(mark_echo(never)) == [MarkFlushed(never, 1, played_ms_of_utterance=100)]
    utterance = stream.playback.utterance(1)
    assert (utterance.sent_ms, utterance.played_ms, utterance.finished, utterance.cleared) == (300, 100, False, True)
    assert stream.playback.pending_marks == 0


def test_an_unknown_mark_name_is_reported_without_failing_the_stream() -> None:
    stream = streaming()
    assert stream.receive_text(mark_echo("utt-from-elsewhere")) == [UnknownMark("utt-from-elsewhere")]
    assert stream.state is StreamState.STREAMING


def test_a_repeated_echo_is_reported_as_unknown() -> None:
    stream = streaming()
    name = mark_name(stream.send_mark(1))
    stream.receive_text(mark_echo(name))
    assert stream.receive_text(mark_echo(name)) == [UnknownMark(name)]


def test_played_and_in_flight_ms_across_two_utterances_and_a_clear() -> None:
    stream = streaming()
    clock = stream.playback
    send_frames(stream, 1, 10)  # 200 ms
    first_end = mark_name(stream.send_mark(1, final=True))
    send_frames(stream, 2, 5)  # 100 ms
    second_mid = mark_name(stream.send_mark(2))
    send_frames(stream, 2, 5)  # 100 ms, cut by the caller
    second_end = mark_name(stream.send_mark(2, final=True))
    assert (clock.sent_ms, clock.played_ms, clock.in_flight_ms) == (400, 0, 400)

    stream.receive_text(mark_echo(first_end))
    assert (clock.played_ms, clock.in_flight_ms) == (200, 200)
    stream.receive_text(mark_echo(second_mid))
    assert (clock.played_ms, clock.in_flight_ms) == (300, 100)

    stream.send_clear()
    assert (clock.sent_ms, clock.played_ms, clock.cleared_ms, clock.in_flight_ms) == (400, 300, 100, 0)
    stream.receive_text(mark_echo(second_end))
    assert clock.played_ms == 300

    send_frames(stream, 3, 4)  # 80 ms, a new answer after the barge-in
    third_end = mark_name(stream.send_mark(3, final=True))
    assert clock.in_flight_ms == 80
    assert stream.receive_text(mark_echo(third_end)) == [MarkPlayed(third_end, 3, 80, final=True)]
    assert (clock.sent_ms, clock.played_ms, clock.cleared_ms, clock.in_flight_ms) == (480, 380, 100, 0)

    first, second, third = (clock.utterance(utterance_id) for utterance_id in (1, 2, 3))
    assert (first.played_ms, first.finished, first.cleared) == (200, True, False)
    assert (second.sent_ms, second.played_ms, second.finished, second.cleared) == (200, 100, False, True)
    assert (third.played_ms, third.finished, third.cleared) == (80, True, False)


def test_audio_outside_any_utterance_counts_in_the_totals_only() -> None:
    stream = streaming()
    stream.send_media(SILENCE_20MS)
    name = mark_name(stream.send_mark(1))
    assert stream.receive_text(mark_echo(name)) == [MarkPlayed(name, 1, 0, final=False)]
    assert (stream.playback.sent_ms, stream.playback.played_ms) == (20, 20)


# ------------------------------------------------------------------------------- Twilio's own spelling, read fast


def test_media_in_twilios_spelling_and_in_any_other_give_the_same_events() -> None:
    compact, spaced = streaming(), streaming()
    frames = [(2, 1, b"\x01" * 160, None), (3, 2, b"\x7f" * 160, None), (4, 5, b"\x80" * 80, 300)]
    for sequence, chunk, payload, timestamp in frames:
        assert compact.receive_text(media(sequence, chunk, payload, timestamp)) == spaced.receive_text(
            media(sequence, chunk, payload, timestamp, spaced=True)
        )
    assert compact.last_sequence_number == spaced.last_sequence_number == 4
    assert compact.dropped_chunks == spaced.dropped_chunks == 2


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        # the fast reader's pattern lets these through; what follows it still refuses them
        (media(2, 1).replace('"payload":"', '"payload":"=A'), MalformedMessage),  # padding first
        (media(2, 1).replace('"payload":"', '"payload":"A'), MalformedMessage),  # not a multiple of four
        (media(2, 1, b"\xff" * 9000), MessageTooLarge),
        (media(2, 1).replace(STREAM_SID, "MZ" + "f" * 32), UnexpectedMessage),  # another stream's frame
        # digits from other scripts are not Twilio's numbers, however int() reads them
        (media(2, 1).replace('"chunk":"1"', '"chunk":"\u0661"'), MalformedMessage),
        (media(2, 1).replace('"chunk":"1"', '"chunk":"\\u0661"'), MalformedMessage),  # the same, escaped in JSON
    ],
)
def test_media_in_twilios_spelling_is_checked_as_strictly(frame: str, error: type[Exception]) -> None:
    stream = streaming()
    with pytest.raises(error):
        stream.receive_text(frame)
    assert stream.state is StreamState.FAILED


def test_media_in_twilios_spelling_before_start_is_refused() -> None:
    stream = TwilioStream()
    stream.receive_text(CONNECTED)
    with pytest.raises(UnexpectedMessage):
        stream.receive_text(media(2, 1))


# ------------------------------------------------------------------------------------ the caller-audio fast path


def read_like_the_session(stream: TwilioStream, frame: str) -> list[object]:
    """What a session gets from one frame: (payload, timestamp) from `receive_media`, else `receive_text`'s events."""
    media_frame = stream.receive_media(frame)
    if media_frame is not None:
        return [media_frame]
    try:
        events = stream.receive_text(frame)
    except StreamProtocolError as exc:
        return [type(exc)]
    return [(event.payload, event.timestamp_ms) if isinstance(event, MediaReceived) else event for event in events]


def read_through_receive_text(stream: TwilioStream, frame: str) -> list[object]:
    try:
        events = stream.receive_text(frame)
    except StreamProtocolError as exc:
        return [type(exc)]
    return [(event.payload, event.timestamp_ms) if isinstance(event, MediaReceived) else event for event in events]


def test_receive_media_takes_frames_that_continue_their_track() -> None:
    stream = streaming()
    assert stream.receive_media(media(2, 1)) is None  # the first frame of a track opens it through receive_text
    stream.receive_text(media(2, 1))
    tone = bytes(range(160))
    assert stream.receive_media(media(3, 2, tone)) == (tone, 20)
    assert stream.last_sequence_number == 3
    assert stream.receive_media(media(4, 3, timestamp=40)) == (SILENCE_20MS, 40)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(media(3, 4), id="a gap"),
        pytest.param(media(3, 1), id="a repeated chunk"),
        pytest.param(media(3, 2, spaced=True), id="another spelling"),
        pytest.param(media(3, 2).replace(STREAM_SID, "MZother"), id="another stream"),
        pytest.param(media(3, 2).replace('"payload":"', '"payload":"=', 1), id="bad base64"),
        pytest.param(media(3, 2).replace('"}}', '","extra":"x"}}'), id="a field after the payload"),
        pytest.param(media(3, 2, b"").replace('"payload":""}}', '"payload":"}}'), id="an unterminated payload"),
        pytest.param(media(3, 2)[:-1] + "]", id="a frame that is not closed"),
        pytest.param(media(3, 2).replace('"payload":"', '"payload":"\\/', 1), id="an escaped payload"),
        pytest.param(media(3, 2).replace('"payload":"', '"payload":"é', 1), id="a payload that is not ASCII"),
        pytest.param(media(3, 2, bytes(9000)), id="too large"),
        pytest.param(mark_echo("x"), id="a mark"),
        pytest.param(STOP, id="stop"),
    ],
)
def test_receive_media_leaves_everything_else_to_receive_text(frame: str) -> None:
    stream = streaming()
    stream.receive_text(media(2, 1))
    assert stream.receive_media(frame) is None
    assert stream.state is StreamState.STREAMING
    assert stream.last_sequence_number == 2


def test_receive_media_takes_only_the_callers_track() -> None:
    stream = streaming()
    outbound = [media(2 + n, 1 + n).replace('"track":"inbound"', '"track":"outbound"') for n in range(2)]
    [opened] = stream.receive_text(outbound[0])
    assert isinstance(opened, MediaReceived) and opened.track == "outbound"
    assert stream.receive_media(outbound[1]) is None  # it continues its track, but is not the caller speaking
    [event] = stream.receive_text(outbound[1])
    assert isinstance(event, MediaReceived) and event.track == "outbound"


def test_receive_media_is_refused_outside_streaming() -> None:
    stream = TwilioStream()
    assert stream.receive_media(media(2, 1)) is None
    stream = streaming()
    stream.receive_text(media(2, 1))
    stream.receive_text(STOP)
    assert stream.receive_media(media(3, 2)) is None


def test_the_fast_path_and_receive_text_read_any_frame_sequence_alike() -> None:
    rng = np.random.default_rng(7)
    frames = [CONNECTED, START]
    chunk, sequence = 1, 2
    for _ in range(400):
        roll = rng.random()
        payload = rng.integers(0, 256, int(rng.choice((160, 160, 160, 80, 320))), dtype=np.uint8).tobytes()
        if roll < 0.08:
            chunk += int(rng.integers(1, 4))  # a gap
        elif roll < 0.12:
            chunk = max(1, chunk - int(rng.integers(1, 3)))  # late or repeated
        frame = media(sequence, chunk, payload, spaced=roll > 0.95)
        if 0.90 < roll < 0.92:
            frame = frame.replace('"payload":"', '"payload":"=', 1)
        elif 0.92 < roll < 0.93:
            frame = frame.replace('"}}', '","extra":"x"}}')  # JSON that the general parser accepts
        frames.append(frame if roll < 0.97 else mark_echo("nope", sequence))
        chunk, sequence = chunk + 1, sequence + 1
    fast, reference = TwilioStream(), TwilioStream()
    for frame in frames:
        if fast.state is StreamState.FAILED:
            break
        assert read_like_the_session(fast, frame) == read_through_receive_text(reference, frame)
        assert fast.last_sequence_number == reference.last_sequence_number
        assert fast.dropped_ms == reference.dropped_ms
    assert reference.state is fast.state


# ------------------------------------------------------------------------------------------- real time


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def streaming_at(clock: FakeClock) -> TwilioStream:
    """A streaming stream whose real time is `clock`'s."""
    stream = TwilioStream(clock=clock)
    stream.receive_text(CONNECTED)
    stream.receive_text(START)
    return stream


def test_elapsed_time_counts_from_start() -> None:
    clock = FakeClock()
    stream = TwilioStream(clock=clock)
    clock.now += 5
    assert stream.elapsed_ms() == 0
    stream.receive_text(START)
    clock.now += 1.5
    assert stream.elapsed_ms() == 1500


def test_a_timestamp_far_ahead_of_the_time_since_start_is_a_protocol_error() -> None:
    clock = FakeClock()
    stream = streaming_at(clock)
    clock.now += 1
    stream.receive_text(media(2, 1, timestamp=1000))
    with pytest.raises(AheadOfRealTime, match="ahead of the 1000 ms since start"):
        stream.receive_text(media(3, 2, timestamp=600_000))
    assert stream.state is StreamState.FAILED


def test_a_timestamp_within_the_lead_is_accepted() -> None:
    clock = FakeClock()
    stream = streaming_at(clock)
    events = stream.receive_text(media(2, 1, timestamp=MEDIA_LEAD_MS - 20))
    assert [type(event) for event in events] == [MediaReceived]


def test_audio_sent_faster_than_real_time_is_accepted_up_to_the_lead_then_a_protocol_error() -> None:
    clock = FakeClock()
    stream = streaming_at(clock)
    frames_in_lead = MEDIA_LEAD_MS // 20
    for chunk in range(1, frames_in_lead + 1):
        stream.receive_text(media(chunk + 1, chunk, timestamp=0))  # honest-looking timestamps, too much audio
    with pytest.raises(AheadOfRealTime):
        stream.receive_text(media(frames_in_lead + 2, frames_in_lead + 1, timestamp=0))


def test_audio_at_real_time_is_accepted_for_as_long_as_the_call_lasts() -> None:
    clock = FakeClock()
    stream = streaming_at(clock)
    for chunk in range(1, 3001):  # a minute
        clock.now += 0.02
        stream.receive_text(media(chunk + 1, chunk))
    assert stream.state is StreamState.STREAMING


def test_a_network_stall_delivering_its_backlog_at_once_is_accepted() -> None:
    clock = FakeClock()
    stream = streaming_at(clock)
    clock.now += 3  # three seconds of audio held back, then all of it arrives
    for chunk in range(1, 151):
        stream.receive_text(media(chunk + 1, chunk))
    assert stream.state is StreamState.STREAMING


def test_the_fast_path_leaves_audio_ahead_of_real_time_to_receive_text_which_refuses_it() -> None:
    clock = FakeClock()
    stream = streaming_at(clock)
    stream.receive_text(media(2, 1))
    ahead = media(3, 2, timestamp=MEDIA_LEAD_MS + 1000)
    assert stream.receive_media(ahead) is None
    with pytest.raises(AheadOfRealTime):
        stream.receive_text(ahead)
