"""Deepgram live speech-to-text through the real SDK, against a local fake Deepgram: turns, timing, reconnects."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from config.agent import DeepgramSTTConfig
from pipelines.clients import ProviderClients
from pipelines.fallback import FallbackSTT
from pipelines.stt.base import EndOfTurn, SpeechStarted, STTError, STTEvent, TranscriptUpdate
from pipelines.stt.deepgram import DeepgramSTT
from tests.fakes.deepgram import FakeDeepgram
from tests.speech import noise_frames, silent_frames

API_KEY = "dg-test-key-4f9a"
FAST_RECONNECT = (0.02, 0.05, 0.1)
CLIENTS = ProviderClients()
"""The SDK clients of this module's recognizers, as an engine's are shared by its calls."""


@pytest.fixture(scope="module", autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await CLIENTS.aclose()


def speech(ms: int) -> list[bytes]:
    """Loud broadband noise: speech to an energy detector."""
    return noise_frames(ms, level=4000)


def config(**options: Any) -> DeepgramSTTConfig:
    return DeepgramSTTConfig.model_validate({"endpointing": 300, **options})


@pytest.fixture
async def fake() -> AsyncIterator[FakeDeepgram]:
    async with FakeDeepgram(api_key=API_KEY, transcripts=["i need to reschedule"]) as fake:
        yield fake


def recognizer(fake: FakeDeepgram, **options: Any) -> DeepgramSTT:
    """A recognizer on `fake`: options named like DeepgramSTTConfig fields configure Deepgram, the rest DeepgramSTT."""
    settings = {"reconnect_delays": FAST_RECONNECT, **options}
    stt_options = {key: settings.pop(key) for key in list(settings) if key in DeepgramSTTConfig.model_fields}
    return DeepgramSTT(config(**stt_options), clients=CLIENTS, api_key=API_KEY, url=fake.url, **settings)


async def feed(stt: DeepgramSTT | FallbackSTT, frames: Sequence[bytes], *, voiced: bool = True) -> None:
    """Send frames faster than real time (the fake keeps audio time), yielding to the loop as Twilio's reader does."""
    for frame in frames:
        stt.send_audio(frame, voiced=voiced)
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until the fake has seen something (it offers counters, not events)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def collect(stt: DeepgramSTT, until_event: Callable[[STTEvent], bool], timeout: float = 5.0) -> list[STTEvent]:
    """Events up to and including the first one `until_event` accepts."""
    events: list[STTEvent] = []
    async with asyncio.timeout(timeout):
        async for event in stt.events():
            events.append(event)
            if until_event(event):
                return events
    raise AssertionError(f"the events ended first: {events}")


def is_end_of_turn(event: STTEvent) -> bool:
    return isinstance(event, EndOfTurn)


async def test_the_socket_asks_for_mulaw_8khz_with_the_configured_options(fake: FakeDeepgram) -> None:
    stt = recognizer(
        fake,
        model="nova-2-phonecall",
        language="es",
        endpointing=450,
        utterance_end_ms=1200,
        keywords=["Dialtone", "reschedule"],
    )
    await stt.start()
    await stt.close()
    [query] = fake.queries
    assert query == {
        "model": "nova-2-phonecall",
        "language": "es",
        "encoding": "mulaw",
        "sample_rate": "8000",
        "channels": "1",
        "interim_results": "true",
        "endpointing": "450",
        "utterance_end_ms": "1200",
        "vad_events": "true",
        "smart_format": "true",
        "keywords": "Dialtone",
    }
    assert fake.listens[0].query_lists["keywords"] == ["Dialtone", "reschedule"]


async def test_every_socket_of_a_shared_client_carries_the_key_and_the_sdks_own_headers(fake: FakeDeepgram) -> None:
    clients = ProviderClients()
    try:
        for _ in range(2):  # two calls on the engine's one client: the second reuses the headers made for the first
            stt = DeepgramSTT(config(), clients=clients, api_key=API_KEY, url=fake.url)
            await stt.start()
            await stt.close()
    finally:
        await clients.aclose()
    first, second = (listen.headers for listen in fake.listens)
    assert first["Authorization"] == f"Token {API_KEY}"
    assert first["User-Agent"].startswith("deepgram-sdk/") and first["X-Fern-SDK-Name"] == "deepgram-sdk"
    assert first["x-deepgram-session-id"]
    sdk_headers = ("Authorization", "User-Agent", "X-Fern-SDK-Version", "x-deepgram-session-id")
    assert {name: second[name] for name in sdk_headers} == {name: first[name] for name in sdk_headers}


async def test_nova_3_keywords_go_as_keyterms_and_off_switches_as_false(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, endpointing=False, interim_results=False, vad_events=False, keywords=["a b", "c"])
    await stt.start()
    await stt.close()
    [query] = fake.queries
    assert query["model"] == "nova-3"
    assert (query["endpointing"], query["interim_results"], query["vad_events"]) == ("false", "false", "false")
    assert "utterance_end_ms" not in query
    assert fake.listens[0].query_lists["keyterm"] == ["a b", "c"]


async def test_speech_gives_speech_started_interims_a_final_and_the_end_of_turn(fake: FakeDeepgram) -> None:
    stt = recognizer(fake)
    await stt.start()
    await feed(stt, silent_frames(500) + speech(1000) + silent_frames(600))
    events = await collect(stt, is_end_of_turn)
    await stt.close()

    assert events[0] == SpeechStarted(at_ms=500)
    interims = [e for e in events if isinstance(e, TranscriptUpdate) and not e.is_final]
    assert [e.text for e in interims] == ["i", "i need", "i need to"]
    assert all(500 < e.at_ms <= 1500 for e in interims)
    *_, final, end = events
    # The final's span ends where the 300 ms of endpointing silence does: 500 + 1000 + 300.
    assert final == TranscriptUpdate(text="i need to reschedule", is_final=True, at_ms=1800)
    assert end == EndOfTurn(text="i need to reschedule", at_ms=1800)


async def test_messages_that_cannot_be_read_are_skipped_and_the_turn_still_ends(
    fake: FakeDeepgram, caplog: pytest.LogCaptureFixture
) -> None:
    fake.garbage.extend(
        [
            "{not json",
            "[1, 2]",
            '{"type": "Results", "channel": {}}',
            '{"type": "Results", "start": 0, "duration": true, "is_final": true,'
            ' "channel": {"alternatives": [{"transcript": "x"}]}}',
            '{"type": "Results", "start": 0, "duration": 1, "channel": {"alternatives": [{"transcript": 7}]}}',
            '{"type": "SpeechStarted", "timestamp": "soon"}',
        ]
    )
    stt = recognizer(fake)
    await stt.start()
    await feed(stt, silent_frames(500) + speech(1600) + silent_frames(600))  # five interims and a final
    events = await collect(stt, is_end_of_turn)
    await stt.close()

    assert not fake.garbage  # all of it was sent
    assert events[0] == SpeechStarted(at_ms=500)
    assert events[-1] == EndOfTurn(text="i need to reschedule", at_ms=2400)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 6


async def test_two_turns_each_end_with_their_own_transcript(fake: FakeDeepgram) -> None:
    fake.transcripts.append("tuesday please")
    stt = recognizer(fake, interim_results=False, utterance_end_ms=None)
    await stt.start()
    await feed(stt, speech(400) + silent_frames(500) + speech(400) + silent_frames(500))
    first = await collect(stt, is_end_of_turn)
    second = await collect(stt, is_end_of_turn)
    await stt.close()
    assert first[-1] == EndOfTurn(text="i need to reschedule", at_ms=700)
    assert second[-1] == EndOfTurn(text="tuesday please", at_ms=1600)


async def test_without_endpointing_utterance_end_closes_the_turn(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, endpointing=False, utterance_end_ms=1000, keepalive_seconds=60)
    await stt.start()
    await feed(stt, silent_frames(200) + speech(600) + silent_frames(1200))
    events = await collect(stt, is_end_of_turn)
    await stt.close()
    finals = [e for e in events if isinstance(e, TranscriptUpdate) and e.is_final]
    assert [e.text for e in finals] == ["i need to reschedule"]
    # UtteranceEnd carries the last word's end: the end of the speech, 200 + 600 ms in.
    assert events[-1] == EndOfTurn(text="i need to reschedule", at_ms=800)
    assert sum(isinstance(e, EndOfTurn) for e in events) == 1


async def test_short_noise_is_not_a_turn(fake: FakeDeepgram) -> None:
    stt = recognizer(fake)
    await stt.start()
    await feed(stt, speech(60) + silent_frames(600) + speech(400) + silent_frames(400))
    events = await collect(stt, is_end_of_turn)
    await stt.close()
    assert [e for e in events if isinstance(e, SpeechStarted)] == [SpeechStarted(at_ms=660)]
    assert events[-1] == EndOfTurn(text="i need to reschedule", at_ms=1360)


async def test_keepalive_is_sent_while_no_audio_flows_and_keeps_the_socket_open() -> None:
    async with FakeDeepgram(api_key=API_KEY, idle_timeout_seconds=0.3) as fake:
        stt = recognizer(fake, keepalive_seconds=0.1)
        await stt.start()
        await until(lambda: fake.keepalives >= 6)
        await stt.close()
    assert fake.connections == 1
    assert fake.listens[0].close_code == 1000


async def test_a_socket_closed_by_the_server_is_reopened() -> None:
    async with FakeDeepgram(api_key=API_KEY, idle_timeout_seconds=0.2) as fake:
        stt = recognizer(fake, keepalive_seconds=60)
        await stt.start()
        await until(lambda: fake.connections == 2)
        await stt.close()
    assert fake.listens[0].close_code == 1011


async def test_keepalive_is_not_sent_while_audio_flows(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, keepalive_seconds=0.2)
    await stt.start()
    for frame in silent_frames(1000):
        stt.send_audio(frame)
        await asyncio.sleep(0.01)
    await stt.close()
    assert fake.keepalives == 0


async def test_a_dropped_socket_mid_utterance_reconnects_and_the_turn_still_ends_once(fake: FakeDeepgram) -> None:
    stt = recognizer(fake)
    await stt.start()
    before_drop = silent_frames(500) + speech(400)
    await feed(stt, before_drop)
    # all but the speech still held for its batch (at most 200 ms)
    await until(lambda: fake.bytes_received[0] >= 160 * (len(before_drop) - 10))
    await fake.drop_all()
    await feed(stt, speech(600) + silent_frames(600))
    events = await collect(stt, is_end_of_turn)
    await asyncio.sleep(0.1)  # room for a duplicate to show up
    await stt.close()
    events += [event async for event in stt.events()]

    assert fake.connections == 2
    # The second socket heard the whole utterance again, from the start of the stream (nothing was final yet).
    assert fake.bytes_received[1] >= 160 * (len(before_drop) + 30)
    assert [e for e in events if isinstance(e, EndOfTurn)] == [EndOfTurn(text="i need to reschedule", at_ms=1800)]
    assert [e for e in events if isinstance(e, SpeechStarted)] == [SpeechStarted(at_ms=500)]


async def test_after_a_drop_between_turns_times_stay_on_the_stream_timeline(fake: FakeDeepgram) -> None:
    fake.transcripts.append("tuesday please")
    stt = recognizer(fake, interim_results=False, utterance_end_ms=None)
    await stt.start()
    await feed(stt, speech(400) + silent_frames(400))
    first = await collect(stt, is_end_of_turn)
    await fake.drop_all()
    await feed(stt, silent_frames(200) + speech(400) + silent_frames(400))
    second = await collect(stt, is_end_of_turn)
    # Only the audio after the first final's span (from 700 ms) went to the new socket; its times start there.
    await until(lambda: fake.bytes_received[1] == (1800 - 700) * 8)
    await stt.close()
    assert fake.connections == 2
    assert first[-1] == EndOfTurn(text="i need to reschedule", at_ms=700)
    assert second[-1] == EndOfTurn(text="tuesday please", at_ms=1700)


async def test_replay_audio_holds_only_what_no_final_result_covers(fake: FakeDeepgram) -> None:
    stt = recognizer(fake)
    await stt.start()
    await feed(stt, speech(400))
    assert len(stt.replay_audio()) == 400 * 8
    await feed(stt, silent_frames(500))
    await collect(stt, is_end_of_turn)
    assert len(stt.replay_audio()) == (500 - 300) * 8  # the silence after the final's span
    await stt.close()


async def test_a_reconnect_after_a_stretch_longer_than_the_replay_bound_says_what_it_cannot_replay(
    fake: FakeDeepgram, caplog: pytest.LogCaptureFixture
) -> None:
    # 2.5 s of speech with no final result (the caller talks on): the replay holds only its last second.
    lost_ms: list[int] = []
    stt = recognizer(fake, max_replay_ms=1000, on_replay_lost=lost_ms.append)
    await stt.start()
    await feed(stt, speech(2500))
    await until(lambda: fake.bytes_received[0] >= 2300 * 8)
    with caplog.at_level(logging.WARNING, logger="pipelines.stt.deepgram"):
        await fake.drop_all()
        await until(lambda: fake.connections == 2)
        await feed(stt, silent_frames(600))
        await collect(stt, is_end_of_turn)
    await stt.close()
    assert fake.bytes_received[1] >= 1000 * 8  # the last second again, then what came after
    lost = [r.getMessage() for r in caplog.records if "are lost" in r.getMessage()]
    assert len(lost) == 1 and "only the last 1000 ms" in lost[0] and "the 1500 ms before it are lost" in lost[0]
    assert lost_ms == [1500]


def test_replay_audio_is_bounded() -> None:
    stt = DeepgramSTT(config(), clients=CLIENTS, api_key=API_KEY, url="ws://127.0.0.1:9", max_replay_ms=1000)
    for frame in speech(3000):
        stt.send_audio(frame)
    assert len(stt.replay_audio()) == 1000 * 8


async def test_when_every_reconnect_is_refused_events_raise_stt_error(fake: FakeDeepgram) -> None:
    stt = recognizer(fake)
    await stt.start()
    await feed(stt, speech(400) + silent_frames(400))
    await collect(stt, is_end_of_turn)
    fake.refuse = True
    await fake.drop_all()
    with pytest.raises(STTError, match="could not reconnect"):
        async with asyncio.timeout(5):
            async for _event in stt.events():
                pass
    assert fake.refused == len(FAST_RECONNECT)
    await stt.close()


async def paced(stt: DeepgramSTT | FallbackSTT, frames: Sequence[bytes], *, voiced: bool) -> None:
    """Send frames at Twilio's pace (one each 20 ms), with the engine's VAD's verdict on them."""
    for frame in frames:
        stt.send_audio(frame, voiced=voiced)
        await asyncio.sleep(0.02)


async def test_a_socket_that_goes_silent_while_the_caller_speaks_is_replaced_and_the_turn_still_ends(
    fake: FakeDeepgram,
) -> None:
    fake.transcripts.append("tuesday please")
    stt = recognizer(fake, silent_socket_seconds=0.3)
    await stt.start()
    await feed(stt, speech(400) + silent_frames(400))
    await collect(stt, is_end_of_turn)
    fake.mute = True  # the socket stays open and takes the audio, but answers nothing
    await feed(stt, speech(1200))
    await until(lambda: fake.connections == 2)
    fake.mute = False
    await feed(stt, speech(200) + silent_frames(400))
    events = await collect(stt, is_end_of_turn)
    await stt.close()
    # The new socket heard the speech the silent one never answered, on the stream timeline: 800 + 1400 + 300 ms.
    assert events[-1] == EndOfTurn(text="tuesday please", at_ms=2500)
    assert fake.connections == 2


async def test_a_socket_that_stays_silent_while_the_caller_speaks_ends_the_events_with_stt_error(
    fake: FakeDeepgram,
) -> None:
    stt = recognizer(fake, silent_socket_seconds=0.3)
    await stt.start()
    await feed(stt, speech(400) + silent_frames(400))
    await collect(stt, is_end_of_turn)
    fake.mute = True  # every socket, the new ones too: a Deepgram stuck behind open sockets
    await feed(stt, speech(1200))
    with pytest.raises(STTError, match=r"sent nothing for 0.3 s while the caller spoke.*before it was silent too"):
        async with asyncio.timeout(5):
            async for _event in stt.events():
                pass
    await stt.close()
    # The second socket heard the first one's unanswered speech again and said nothing either: no third is tried.
    assert fake.connections == 2


async def test_a_silent_socket_that_served_long_still_counts_toward_failing(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, silent_socket_seconds=0.3, stable_socket_seconds=0.05)
    await stt.start()
    await feed(stt, speech(400) + silent_frames(400))
    await collect(stt, is_end_of_turn)
    fake.mute = True
    await feed(stt, speech(1200))
    with pytest.raises(STTError, match="before it was silent too"):
        async with asyncio.timeout(5):
            async for _event in stt.events():
                pass
    await stt.close()
    assert fake.connections == 2


async def test_drops_of_sockets_that_served_a_while_do_not_add_up_to_a_failure() -> None:
    # The server closes every socket after 0.2 s without audio; the caller only listens, so none ever answers.
    async with FakeDeepgram(api_key=API_KEY, idle_timeout_seconds=0.2) as fake:
        stt = recognizer(fake, keepalive_seconds=60, stable_socket_seconds=0.1)
        await stt.start()
        await until(lambda: fake.connections > 2 * (1 + len(FAST_RECONNECT)))
        events = asyncio.ensure_future(anext(aiter(stt.events())))
        await asyncio.sleep(0.1)
        assert not events.done()  # still reconnecting, no STTError
        events.cancel()
        await stt.close()


async def test_sockets_dropped_at_once_still_fail_after_the_attempts() -> None:
    async with FakeDeepgram(api_key=API_KEY, idle_timeout_seconds=0.05) as fake:
        stt = recognizer(fake, keepalive_seconds=60, stable_socket_seconds=30)
        await stt.start()
        with pytest.raises(STTError, match="could not reconnect after 3 attempts"):
            async with asyncio.timeout(5):
                async for _event in stt.events():
                    pass
        await stt.close()
    assert fake.connections == 1 + len(FAST_RECONNECT)


async def test_caller_silence_and_keepalives_never_drop_a_socket_that_says_nothing(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, silent_socket_seconds=0.1, keepalive_seconds=0.1)
    await stt.start()
    await paced(stt, speech(600), voiced=True)  # answered
    await paced(stt, silent_frames(600), voiced=False)  # the caller listens: Deepgram has nothing more to say
    await asyncio.sleep(0.5)  # no audio at all: KeepAlive only
    await stt.close()
    assert fake.keepalives > 0
    assert fake.connections == 1


async def test_short_voiced_audio_deepgram_does_not_answer_never_drops_the_socket(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, silent_socket_seconds=0.1)
    await stt.start()
    # Quiet audio the engine's VAD takes for speech and Deepgram hears nothing in, shorter than a second.
    await paced(stt, silent_frames(900), voiced=True)
    await paced(stt, silent_frames(300), voiced=False)
    answered = list(fake.listens[0].sent)
    await stt.close()
    assert answered == []
    assert fake.connections == 1


async def test_a_fallback_deepgram_given_only_silence_to_replay_is_not_dropped_for_not_answering_it(
    fake: FakeDeepgram,
) -> None:
    async with FakeDeepgram(api_key=API_KEY) as second:
        stt = FallbackSTT(
            [
                ("deepgram", lambda: recognizer(fake, silent_socket_seconds=0.1)),
                ("deepgram", lambda: recognizer(second, silent_socket_seconds=0.1)),
            ]
        )
        await stt.start()
        events: list[STTEvent] = []
        listening = asyncio.create_task(_collect_into(stt, events))
        await feed(stt, speech(400))
        await feed(stt, silent_frames(400), voiced=False)
        await until(lambda: any(isinstance(event, EndOfTurn) for event in events))
        await feed(stt, silent_frames(1500), voiced=False)  # the caller listens to the agent
        fake.refuse = True
        await fake.drop_all()  # the first recognizer is lost for good: the second hears the silence replayed
        await until(lambda: second.connections == 1)
        await paced(stt, silent_frames(400), voiced=False)
        await stt.close()
        listening.cancel()
    assert second.connections == 1  # its answer to the replayed silence was not waited for


async def test_a_fallback_recognizer_hears_the_audio_after_the_last_turn_taken_not_that_turn_again(
    fake: FakeDeepgram,
) -> None:
    async with FakeDeepgram(api_key=API_KEY, transcripts=["for four"]) as second:
        stt = _unended_then(fake, second)
        await stt.start()
        events: list[STTEvent] = []
        listening = asyncio.create_task(_collect_into(stt, events))
        await feed(stt, speech(400))
        await feed(stt, silent_frames(400), voiced=False)
        await until(lambda: any(isinstance(event, TranscriptUpdate) and event.is_final for event in events))
        stt.turn_taken()  # "i need to reschedule", final at 600 ms, is the caller's turn now
        await feed(stt, silent_frames(600), voiced=False)
        fake.refuse = True
        await fake.drop_all()  # the first recognizer is lost for good: the second hears the turn in progress
        await until(lambda: second.connections == 1)
        await feed(stt, speech(400))
        await feed(stt, silent_frames(400), voiced=False)
        await until(lambda: any(isinstance(event, EndOfTurn) for event in events))
        await stt.close()
        listening.cancel()
    ends = [event for event in events if isinstance(event, EndOfTurn)]
    # Only the caller's new words, on the call's timeline: 1400 ms in, 400 ms long, then 300 ms of endpointing.
    assert ends == [EndOfTurn(text="for four", at_ms=2100)]
    # The audio after the turn taken, less the silence before the caller spoke again but its last half second.
    assert second.bytes_received == [(2200 - 900) * 8]


def _unended_then(fake: FakeDeepgram, second: FakeDeepgram, **options: Any) -> FallbackSTT:
    """A recognizer on `fake` that never ends a turn (no endpointing, UtteranceEnd or interim results: the engine's
    silence ends them, and it says nothing during unbroken speech), then one on `second`."""
    return FallbackSTT(
        [
            ("deepgram", lambda: recognizer(fake, endpointing=False, interim_results=False)),
            ("deepgram", lambda: recognizer(second)),
        ],
        **options,
    )


async def _collect_into(stt: FallbackSTT, events: list[STTEvent]) -> None:
    async for event in stt.events():
        events.append(event)


async def test_events_already_received_are_yielded_before_the_stt_error(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, interim_results=False, utterance_end_ms=None)
    await stt.start()
    await feed(stt, speech(400) + silent_frames(400))
    await until(lambda: any(m["type"] == "Results" for m in fake.listens[0].sent))
    await asyncio.sleep(0.05)
    fake.refuse = True
    await fake.drop_all()
    events: list[STTEvent] = []
    with pytest.raises(STTError):
        async with asyncio.timeout(5):
            async for event in stt.events():
                events.append(event)
    assert events[-1] == EndOfTurn(text="i need to reschedule", at_ms=700)


async def test_a_wrong_key_fails_start_naming_the_cause_not_the_key(fake: FakeDeepgram) -> None:
    stt = DeepgramSTT(config(), clients=CLIENTS, api_key="dg-wrong-secret-123", url=fake.url)
    with pytest.raises(STTError) as failure:
        await stt.start()
    assert "API key" in str(failure.value)
    assert "401" in str(failure.value)
    assert "dg-wrong-secret-123" not in repr(failure.value)
    assert fake.connections == 0
    await stt.close()


async def test_an_unreachable_host_fails_start_naming_the_host(unused_port: int) -> None:
    stt = DeepgramSTT(config(), clients=CLIENTS, api_key=API_KEY, url=f"ws://127.0.0.1:{unused_port}")
    with pytest.raises(STTError, match=f"could not reach deepgram at 127.0.0.1:{unused_port}"):
        await stt.start()


async def test_close_sends_the_audio_then_finalize_then_close_stream(fake: FakeDeepgram) -> None:
    stt = recognizer(fake)
    await stt.start()
    await feed(stt, silent_frames(200) + speech(500))
    await stt.close()
    events = [event async for event in stt.events()]
    [listen] = fake.listens
    assert listen.bytes_received == 700 * 8
    assert listen.controls == ["Finalize", "CloseStream"]
    assert listen.close_code == 1000
    assert fake.closed_cleanly == 1
    # The words in progress come back final (from Finalize) and end the turn.
    assert events[-2:] == [
        TranscriptUpdate(text="i need to reschedule", is_final=True, at_ms=700),
        EndOfTurn(text="i need to reschedule", at_ms=700),
    ]


async def test_close_is_idempotent_and_safe_on_a_dead_socket(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, reconnect_delays=(5.0,))
    await stt.start()
    await fake.drop_all()
    await asyncio.sleep(0.05)
    async with asyncio.timeout(2):
        await stt.close()
        await stt.close()
    assert [event async for event in stt.events()] == []


async def test_close_while_connecting_ends_start_with_stt_error() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        stt = DeepgramSTT(config(), clients=CLIENTS, api_key=API_KEY, url=f"ws://127.0.0.1:{port}")
        starting = asyncio.create_task(stt.start())
        await asyncio.sleep(0.1)
        async with asyncio.timeout(2):
            await stt.close()
            with pytest.raises(STTError, match="closed before deepgram"):
                await starting


async def test_audio_after_close_is_ignored(fake: FakeDeepgram) -> None:
    stt = recognizer(fake)
    await stt.start()
    await stt.close()
    stt.send_audio(b"\xff" * 160)
    assert stt.replay_audio() == b""


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_audio_trimmed_before_deepgram_got_it_keeps_later_times_on_the_stream_timeline(
    fake: FakeDeepgram,
) -> None:
    # Unsent audio beyond the replay bound is dropped, oldest first (here: before the socket opened); Deepgram's
    # clock then starts later on the stream, and the times it reports must say so.
    stt = recognizer(fake, max_replay_ms=1000)
    for frame in silent_frames(3000):  # 3 s arrive before the socket is open; only the last second is kept
        stt.send_audio(frame)
    await stt.start()
    await feed(stt, silent_frames(200) + speech(1000) + silent_frames(600))
    events = await collect(stt, is_end_of_turn)
    await stt.close()

    assert events[0] == SpeechStarted(at_ms=3200)
    assert events[-1] == EndOfTurn(text="i need to reschedule", at_ms=4500)  # 3000 + 200 + 1000 + 300


async def send_counting(stt: DeepgramSTT, fake: FakeDeepgram, ms: int, *, voiced: bool) -> int:
    """Send `ms` of audio at 1 ms spacing (the sender runs between frames); the audio messages Deepgram got."""
    before = fake.listens[0].audio_messages
    for frame in speech(ms) if voiced else silent_frames(ms):
        stt.send_audio(frame, voiced=voiced)
        await asyncio.sleep(0.001)
    return fake.listens[0].audio_messages - before


async def received(fake: FakeDeepgram, ms: int) -> None:
    await until(lambda: fake.listens[0].bytes_received == ms * 8)


async def test_deepgram_gets_at_once_only_the_silence_that_completes_endpointing(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, endpointing=300, utterance_end_ms=1000, keepalive_seconds=60)  # no flush by keepalive
    await stt.start()

    speech_messages = await send_counting(stt, fake, 400, voiced=True)
    await received(fake, 400)
    before_endpointing = await send_counting(stt, fake, 300, voiced=False)
    await received(fake, 400 + 300)  # the frame that completes endpointing's 300 ms goes out with all held
    await collect(stt, is_end_of_turn)
    after_endpointing = await send_counting(stt, fake, 100, voiced=False)
    await received(fake, 400 + 400)
    # The turn has ended: nothing waits for UtteranceEnd, so its gap is nothing special.
    far_from_speech = await send_counting(stt, fake, 2000, voiced=False)
    await received(fake, 400 + 2000)  # the last 400 ms wait for their batch
    await stt.close()

    assert speech_messages == 2  # mid-speech nothing waits on the audio: 200 ms at a time
    assert before_endpointing <= 6  # a 200 ms batch, then frame by frame from 100 ms before the gap is complete
    assert after_endpointing == 100 // 20  # and 100 ms past it
    # Then 200 ms at a time until past the last hot window (UtteranceEnd's ends 1100 ms after the speech): silence
    # from 400 to 1000 ms in three messages, and from there 500 ms at a time: 1500 and 2000.
    assert far_from_speech == 3 + 2


async def test_without_endpointing_the_silence_that_completes_utterance_end_goes_at_once(fake: FakeDeepgram) -> None:
    stt = recognizer(fake, endpointing=False, utterance_end_ms=1000, keepalive_seconds=60)
    await stt.start()

    await send_counting(stt, fake, 420, voiced=True)  # 20 ms held: the batches do not line up with the gap
    await received(fake, 400)
    before_utterance_end = await send_counting(stt, fake, 1000, voiced=False)
    await received(fake, 420 + 1000)  # final words wait for UtteranceEnd: its frame goes out at once
    events = await collect(stt, is_end_of_turn)
    far_from_speech = await send_counting(stt, fake, 1000, voiced=False)
    await received(fake, 420 + 2000)
    await stt.close()

    assert isinstance(events[-1], EndOfTurn)
    assert before_utterance_end <= 10  # 200 ms batches, then frame by frame from 900 ms
    assert far_from_speech <= 1000 // 200 + 1


async def _fallback_after_a_drop(
    fake: FakeDeepgram, second: FakeDeepgram, before: Sequence[tuple[bytes, bool]], **options: Any
) -> int:
    """Audio the second of two Deepgram recognizers receives when the first is lost for good after `before`
    (frames with the VAD's verdict) and the caller then speaks 400 ms more: the replay and what came after it."""
    stt = _unended_then(fake, second, **options)
    await stt.start()
    listening = asyncio.create_task(_collect_into(stt, []))
    for frame, voiced in before:
        stt.send_audio(frame, voiced=voiced)
    await asyncio.sleep(0)
    fake.refuse = True
    await fake.drop_all()
    await until(lambda: second.connections == 1)
    await feed(stt, speech(400))
    await stt.close()
    listening.cancel()
    # The audio goes before CloseStream on the socket: once the fake has read that, it has counted all of it (close()
    # itself waits only CLOSE_GRACE_SECONDS for the server, which a loaded machine may take longer to answer in).
    await until(lambda: second.closed_cleanly == 1)
    return sum(second.bytes_received)


async def test_a_fallback_recognizer_hears_a_long_turn_in_progress_whole_without_the_silence_before_it(
    fake: FakeDeepgram,
) -> None:
    async with FakeDeepgram(api_key=API_KEY) as second:
        listened = [(frame, False) for frame in silent_frames(12_000)]  # the caller listens to the agent
        spoke = [(frame, True) for frame in speech(25_000)]  # then speaks 25 s without a pause
        received = await _fallback_after_a_drop(fake, second, listened + spoke)
    assert received == (500 + 25_000 + 400) * 8  # the whole turn, from half a second before its first voiced frame


async def test_of_a_turn_longer_than_the_replay_bound_the_fallback_hears_the_last_part(
    fake: FakeDeepgram, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeDeepgram(api_key=API_KEY) as second:
        spoke = [(frame, True) for frame in speech(9_000)]
        received = await _fallback_after_a_drop(fake, second, spoke, max_replay_ms=4_000)
    assert received == (4_000 + 400) * 8
    assert "takes over a caller turn of 9 s: it hears only its last 4 s again" in caplog.text
