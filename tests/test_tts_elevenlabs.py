"""ElevenLabs text-to-speech against a local fake: one multi-stream-input socket per call with a context per
sentence, alignment, barge-in, HTTP fallback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import pytest

from config.agent import ElevenLabsTTSConfig
from pipelines.clients import ProviderClients
from pipelines.tts import elevenlabs
from pipelines.tts.base import Alignment, TTSError
from pipelines.tts.elevenlabs import (
    STANDBY_MAX_AGE_S,
    WS_FAILURES_BEFORE_HTTP,
    ElevenLabsTTS,
)
from tests.fakes.elevenlabs import FakeElevenLabs, Spoken

API_KEY = "el-test"
VOICE_ID = "voice-june"
SENTENCE = "Thank you for calling, how can I help?"
OTHER_SENTENCE = "Your table is booked for eight."
THIRD_SENTENCE = "Is there anything else?"


CLIENTS = ProviderClients()
"""The SDK clients of this module's synthesizers, as an engine's are shared by its calls."""


@pytest.fixture(scope="module", autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await CLIENTS.aclose()


def synthesizer(
    fake: FakeElevenLabs,
    *,
    api_key: str = API_KEY,
    voice_id: str = VOICE_ID,
    standby_max_age_s: float = STANDBY_MAX_AGE_S,
    clients: ProviderClients = CLIENTS,
    **config: Any,
) -> ElevenLabsTTS:
    return ElevenLabsTTS(
        ElevenLabsTTSConfig(**config),
        clients=clients,
        api_key=api_key,
        url=fake.url,
        voice_id=voice_id,
        standby_max_age_s=standby_max_age_s,
    )


async def speak(tts: ElevenLabsTTS, text: str) -> tuple[bytes, list[Alignment]]:
    audio = bytearray()
    alignments: list[Alignment] = []
    async for item in tts.synthesize(text):
        if isinstance(item, Alignment):
            alignments.append(item)
        else:
            audio += item
    return bytes(audio), alignments


async def eventually(condition: Callable[[], bool], *, timeout: float = 5.0) -> None:
    """Wait until `condition` holds (the fake sees a client's message a moment after it is sent)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)


async def until_contexts_closed(fake: FakeElevenLabs, count: int) -> None:
    """Wait until the fake has seen `count` close_context messages, on all sockets together."""
    await eventually(lambda: sum(len(socket.closed_contexts) for socket in fake.sockets) == count)


async def test_the_socket_opens_with_the_query_and_a_sentence_is_a_context_opened_flushed_and_closed() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake, stability=0.5, similarity_boost=0.8, optimize_streaming_latency=3)
        try:
            await speak(tts, SENTENCE)
        finally:
            await tts.close()
    socket = fake.sockets[0]
    assert socket.voice_id == VOICE_ID
    assert socket.query == {
        "model_id": "eleven_flash_v2_5",
        "output_format": "ulaw_8000",
        "sync_alignment": "true",
        "auto_mode": "true",
        "inactivity_timeout": "180",
    }
    voice_settings = {"stability": 0.5, "similarity_boost": 0.8}
    assert socket.contexts == {
        "s1": [
            {"text": " ", "context_id": "s1", "voice_settings": voice_settings},
            {"text": SENTENCE + " ", "context_id": "s1", "flush": True},
            {"context_id": "s1", "close_context": True},
        ]
    }
    assert socket.init == socket.contexts["s1"][0]
    assert socket.finished_contexts == ["s1"]
    assert socket.errors == []
    assert socket.close_code == 1000


async def test_a_sentence_yields_its_audio_and_timings_from_the_start_of_its_audio() -> None:
    async with FakeElevenLabs(api_key=API_KEY, chunk_ms=100, ms_per_char=60) as fake:
        tts = synthesizer(fake)
        try:
            audio, alignments = await speak(tts, SENTENCE)
        finally:
            await tts.close()
    assert len(audio) == 8 * fake.duration_ms(SENTENCE)
    assert audio == fake.audio_for(SENTENCE)
    assert "".join(alignment.chars for alignment in alignments) == SENTENCE
    starts = [start for alignment in alignments for start in alignment.start_ms]
    assert starts == [60 * i for i in range(len(SENTENCE))]
    # The second chunk (100-200 ms) holds characters 2 and 3: the fake says 20 and 80 ms into its chunk.
    assert alignments[1] == Alignment(chars=SENTENCE[2:4], start_ms=(120, 180))


async def test_prewarm_connects_the_socket_before_any_sentence() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake)
        try:
            await tts.prewarm()
            assert fake.ws_connections == 1
            assert fake.texts == []
            await speak(tts, SENTENCE)
            assert fake.ws_connections == 1  # the sentence used the warm socket
            assert fake.sockets[0].init == {"text": " ", "context_id": "s1"}
        finally:
            await tts.close()


async def test_sentences_share_the_call_s_socket_with_a_context_each() -> None:
    sentences = [SENTENCE, OTHER_SENTENCE, THIRD_SENTENCE]
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake, speed=1.1)
        try:
            spoken = [await speak(tts, sentence) for sentence in sentences]
        finally:
            await tts.close()
    assert [audio for audio, _ in spoken] == [fake.audio_for(sentence) for sentence in sentences]
    assert fake.ws_connections == 1
    socket = fake.sockets[0]
    assert list(socket.contexts) == ["s1", "s2", "s3"]
    for (context, messages), sentence in zip(socket.contexts.items(), sentences, strict=True):
        assert messages == [
            {"text": " ", "context_id": context, "voice_settings": {"speed": 1.1}},
            {"text": sentence + " ", "context_id": context, "flush": True},
            {"context_id": context, "close_context": True},
        ]
    assert socket.finished_contexts == ["s1", "s2", "s3"]
    assert fake.texts == [Spoken("ws", sentence) for sentence in sentences]


@pytest.mark.parametrize("how", ["task cancelled", "iteration abandoned"])
async def test_a_cut_sentence_leaks_no_audio_into_the_next_on_the_same_socket(how: str) -> None:
    async with FakeElevenLabs(api_key=API_KEY, chunk_interval_ms=20) as fake:
        tts = synthesizer(fake)
        try:
            first_audio = asyncio.Event()

            async def listen() -> None:
                stream = cast("AsyncGenerator[bytes | Alignment, None]", tts.synthesize(SENTENCE))
                async for item in stream:
                    if isinstance(item, bytes):
                        first_audio.set()
                        if how == "iteration abandoned":
                            await stream.aclose()
                            return

            listening = asyncio.create_task(listen())
            await first_audio.wait()
            if how == "task cancelled":
                listening.cancel()
            await asyncio.wait({listening})
            socket = fake.sockets[0]
            assert socket.audio_sent["s1"] < len(fake.audio_for(SENTENCE))  # cut mid-sentence
            audio, alignments = await speak(tts, OTHER_SENTENCE)
        finally:
            await tts.close()
    assert audio == fake.audio_for(OTHER_SENTENCE)
    assert "".join(alignment.chars for alignment in alignments) == OTHER_SENTENCE
    assert fake.ws_connections == 1
    assert socket.closed_contexts == ["s1", "s2"]
    # The rest of the cut sentence went out on the socket before the next one: it was there to leak, and did not.
    assert socket.audio_sent["s1"] == len(fake.audio_for(SENTENCE))
    assert socket.finished_contexts == ["s1", "s2"]


async def test_quick_barge_ins_never_reach_elevenlabs_limit_of_open_contexts() -> None:
    # Each cut context goes on flushing on the server (about a second here) and stays open until its isFinal.
    async with FakeElevenLabs(api_key=API_KEY, chunk_interval_ms=50) as fake:
        tts = synthesizer(fake)
        try:
            for cut in range(1, 6):
                speaking = asyncio.create_task(speak(tts, SENTENCE))
                await until_contexts_closed(fake, cut)
                speaking.cancel()
                await asyncio.wait({speaking})
            audio, _ = await speak(tts, OTHER_SENTENCE)
        finally:
            await tts.close()
    assert audio == fake.audio_for(OTHER_SENTENCE)
    assert [socket.errors for socket in fake.sockets] == [[], []]
    # Four cut contexts on the first socket: the fifth cut sentence started on a fresh one.
    assert [list(socket.contexts) for socket in fake.sockets] == [["s1", "s2", "s3", "s4"], ["s5", "s6"]]
    assert fake.texts[-1] == Spoken("ws", OTHER_SENTENCE)
    assert fake.http_requests == []


async def test_a_socket_the_server_closed_while_idle_gives_way_to_a_fresh_one() -> None:
    async with FakeElevenLabs(api_key=API_KEY, max_inactivity_s=0.2) as fake:
        tts = synthesizer(fake)
        try:
            await tts.prewarm()
            await eventually(lambda: fake.sockets[0].close_code == 1008)
            audio, _ = await speak(tts, SENTENCE)
        finally:
            await tts.close()
    assert fake.sockets[0].errors == ["input_timeout_exceeded"]
    assert audio == fake.audio_for(SENTENCE)
    assert fake.texts == [Spoken("ws", SENTENCE)]
    assert fake.ws_connections == 2


async def test_a_refused_websocket_falls_back_to_http_streaming() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        fake.refuse_websocket = True
        tts = synthesizer(fake, stability=0.4, optimize_streaming_latency=3)
        try:
            audio, alignments = await speak(tts, SENTENCE)
        finally:
            await tts.close()
    assert audio == fake.audio_for(SENTENCE)
    assert alignments == []
    assert fake.texts == [Spoken("http", SENTENCE)]
    request = fake.http_requests[0]
    assert request["voice_id"] == VOICE_ID
    assert request["query"]["output_format"] == "ulaw_8000"
    assert request["query"]["optimize_streaming_latency"] == "3"
    assert request["body"]["model_id"] == "eleven_flash_v2_5"
    assert request["body"]["voice_settings"]["stability"] == 0.4


async def test_a_socket_silent_past_the_receive_timeout_is_dropped_and_http_speaks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(elevenlabs, "RECEIVE_TIMEOUT_S", 0.3)
    async with FakeElevenLabs(api_key=API_KEY, first_byte_delay_ms=1500) as fake:
        tts = synthesizer(fake)
        try:
            with caplog.at_level(logging.WARNING, logger="pipelines.tts.elevenlabs"):
                audio, _ = await speak(tts, SENTENCE)
            assert not fake.sockets[0].open
        finally:
            await tts.close()
    assert audio == fake.audio_for(SENTENCE)
    assert fake.texts == [Spoken("ws", SENTENCE), Spoken("http", SENTENCE)]
    assert "no message for 0.3 s" in caplog.text


async def test_time_the_caller_holds_a_chunk_is_not_counted_as_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(elevenlabs, "RECEIVE_TIMEOUT_S", 0.2)
    async with FakeElevenLabs(api_key=API_KEY, chunk_ms=100, ms_per_char=20, chunk_interval_ms=150) as fake:
        tts = synthesizer(fake)
        audio = bytearray()
        try:
            async for item in tts.synthesize(OTHER_SENTENCE):
                if isinstance(item, bytes):
                    audio += item
                    await asyncio.sleep(0.3)  # pacing, as the call's outbound audio does
        finally:
            await tts.close()
    assert bytes(audio) == fake.audio_for(OTHER_SENTENCE)
    assert [spoken.transport for spoken in fake.texts] == ["ws"]


@pytest.mark.parametrize("tagged", [False, True], ids=["untagged error", "error tagged with the context"])
async def test_an_error_before_any_audio_falls_back_to_http_and_the_next_sentence_gets_a_fresh_socket(
    tagged: bool,
) -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        fake.fail_next_ws_stream(after_chunks=0, tagged=tagged)
        tts = synthesizer(fake)
        try:
            audio, _ = await speak(tts, SENTENCE)
            await eventually(lambda: fake.ws_connections == 2)  # connected while HTTP spoke, ready for the next
            other_audio, _ = await speak(tts, OTHER_SENTENCE)
        finally:
            await tts.close()
    assert audio == fake.audio_for(SENTENCE)
    assert other_audio == fake.audio_for(OTHER_SENTENCE)
    assert fake.texts == [Spoken("ws", SENTENCE), Spoken("http", SENTENCE), Spoken("ws", OTHER_SENTENCE)]
    assert fake.ws_connections == 2


async def test_an_error_after_audio_was_yielded_raises_tts_error() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        fake.fail_next_ws_stream(after_chunks=1, error="internal_error", message="Something broke.")
        tts = synthesizer(fake)
        try:
            with pytest.raises(TTSError, match=r"broke after 100 ms of audio .*internal_error: Something broke"):
                await speak(tts, SENTENCE)
        finally:
            await tts.close()
    assert fake.texts == [Spoken("ws", SENTENCE)]


async def test_websocket_and_http_both_failing_raise_tts_error() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        fake.refuse_websocket = True
        fake.fail_http = True
        tts = synthesizer(fake)
        try:
            with pytest.raises(TTSError, match=r"WebSocket failed \(handshake refused with HTTP 503\).*HTTP 500"):
                await speak(tts, SENTENCE)
        finally:
            await tts.close()


async def test_a_wrong_key_is_reported_as_refused_without_showing_it() -> None:
    wrong_key = "sk_wrong_0123456789abcdef"
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake, api_key=wrong_key)
        try:
            with pytest.raises(TTSError, match="elevenlabs refused the API key") as refused:
                await speak(tts, SENTENCE)
        finally:
            await tts.close()
    assert wrong_key not in str(refused.value)
    assert fake.ws_connections == 0


async def test_the_api_key_stays_out_of_debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake)
        try:
            await speak(tts, SENTENCE)
        finally:
            await tts.close()
    assert fake.ws_connections == 1
    assert "xi-api-key: [REDACTED]" in caplog.text  # the handshake is logged, its key is not
    assert API_KEY not in caplog.text


async def test_repeated_websocket_failures_switch_the_synthesizer_to_http() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        fake.refuse_websocket = True
        tts = synthesizer(fake)
        try:
            for _ in range(WS_FAILURES_BEFORE_HTTP + 3):
                audio, _ = await speak(tts, SENTENCE)
                assert audio == fake.audio_for(SENTENCE)
        finally:
            await tts.close()
    assert fake.refused_handshakes == WS_FAILURES_BEFORE_HTTP  # nothing is tried after the limit
    assert [spoken.transport for spoken in fake.texts] == ["http"] * (WS_FAILURES_BEFORE_HTTP + 3)


async def test_errors_on_open_sockets_count_towards_the_switch_to_http() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        for _ in range(WS_FAILURES_BEFORE_HTTP):
            fake.fail_next_ws_stream(after_chunks=0)
        tts = synthesizer(fake)
        try:
            for _ in range(WS_FAILURES_BEFORE_HTTP + 1):
                await speak(tts, SENTENCE)
        finally:
            await tts.close()
    assert fake.ws_connections == WS_FAILURES_BEFORE_HTTP
    assert fake.texts[-2:] == [Spoken("http", SENTENCE), Spoken("http", SENTENCE)]


async def test_failures_between_successes_do_not_switch_to_http() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake)
        try:
            for _ in range(WS_FAILURES_BEFORE_HTTP):
                fake.fail_next_ws_stream(after_chunks=0)
                await speak(tts, SENTENCE)  # over HTTP
                await speak(tts, OTHER_SENTENCE)  # over the WebSocket again
        finally:
            await tts.close()
    assert fake.texts[-1] == Spoken("ws", OTHER_SENTENCE)


async def test_a_cut_context_stops_counting_against_the_socket_once_its_isfinal_arrives() -> None:
    async with FakeElevenLabs(api_key=API_KEY, chunk_interval_ms=10) as fake:
        tts = synthesizer(fake)
        try:
            for _ in range(6):
                stream = cast("AsyncGenerator[bytes | Alignment, None]", tts.synthesize(OTHER_SENTENCE))
                async for item in stream:
                    if isinstance(item, bytes):
                        await stream.aclose()  # barge-in after its first audio
                        break
                await speak(tts, THIRD_SENTENCE)  # reads the cut context's isFinal before its own audio
        finally:
            await tts.close()
    assert fake.ws_connections == 1
    assert fake.sockets[0].errors == []


async def test_an_unused_socket_is_replaced_before_it_grows_old() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake, standby_max_age_s=0.3)
        try:
            await tts.prewarm()
            await eventually(lambda: fake.ws_connections == 2 and fake.open_sockets == 1)
            assert not fake.sockets[0].open
            await speak(tts, SENTENCE)
            # Idle again after the sentence: replaced again.
            await eventually(lambda: fake.ws_connections == 3 and fake.open_sockets == 1)
            audio, _ = await speak(tts, OTHER_SENTENCE)
        finally:
            await tts.close()
    assert audio == fake.audio_for(OTHER_SENTENCE)
    assert [list(socket.contexts) for socket in fake.sockets[:3]] == [[], ["s1"], ["s2"]]
    assert fake.texts == [Spoken("ws", SENTENCE), Spoken("ws", OTHER_SENTENCE)]


async def test_a_socket_in_use_is_kept_however_long_the_call() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake, standby_max_age_s=0.6)
        try:
            started = time.monotonic()
            while time.monotonic() - started < 1.5:  # sentences 0.2 s apart: the socket never idles 0.6 s
                await speak(tts, SENTENCE)
                await asyncio.sleep(0.2)
        finally:
            await tts.close()
    assert fake.ws_connections == 1


async def test_close_says_goodbye_closes_every_socket_and_is_idempotent() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake)
        await speak(tts, SENTENCE)
        assert fake.open_sockets == 1
        await tts.close()
        await tts.close()
        await eventually(lambda: fake.open_sockets == 0)
        with pytest.raises(TTSError, match="closed"):
            await speak(tts, OTHER_SENTENCE)
        assert fake.ws_connections == 1
        assert fake.sockets[0].messages[-1] == {"close_socket": True}


async def test_close_of_a_socket_never_used_sends_nothing_on_it() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake)
        await tts.prewarm()
        await tts.close()
        await eventually(lambda: fake.open_sockets == 0)
    assert fake.sockets[0].messages == []
    assert fake.sockets[0].errors == []
