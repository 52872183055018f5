"""ElevenLabs text-to-speech against a local fake: warm stream-input sockets, alignment, barge-in, HTTP fallback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import pytest

from config.agent import ElevenLabsTTSConfig
from pipelines.tts.base import Alignment, TTSError
from pipelines.tts.elevenlabs import (
    STANDBY_MAX_AGE_S,
    WS_FAILURES_BEFORE_HTTP,
    ElevenLabsTTS,
    close_http_clients,
)
from tests.fakes.elevenlabs import FakeElevenLabs, Spoken

API_KEY = "el-test"
VOICE_ID = "voice-june"
SENTENCE = "Thank you for calling, how can I help?"
OTHER_SENTENCE = "Your table is booked for eight."


@pytest.fixture(scope="module", autouse=True)
async def _shared_http_clients() -> AsyncIterator[None]:
    yield
    await close_http_clients()


def synthesizer(
    fake: FakeElevenLabs, *, api_key: str = API_KEY, standby_max_age_s: float = STANDBY_MAX_AGE_S, **config: Any
) -> ElevenLabsTTS:
    return ElevenLabsTTS(
        ElevenLabsTTSConfig(**config),
        api_key=api_key,
        url=fake.url,
        voice_id=VOICE_ID,
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
    """Wait until `condition` holds (the fake sees a socket's close a moment after the client sends it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)


async def test_the_socket_opens_with_the_query_and_the_voice_settings() -> None:
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
    assert socket.init == {"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8}}
    assert socket.messages == [{"text": SENTENCE + " ", "flush": True}, {"text": ""}]
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


async def test_prewarm_connects_and_initialises_a_socket_before_any_sentence() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake)
        try:
            await tts.prewarm()
            assert fake.ws_connections == 1
            await eventually(lambda: fake.sockets[0].init is not None)
            assert fake.texts == []
            await speak(tts, SENTENCE)
            assert fake.ws_connections == 2  # the sentence used the warm socket and warmed the next
            assert fake.sockets[0].messages[0]["text"] == SENTENCE + " "
        finally:
            await tts.close()


async def test_the_next_sentence_takes_a_socket_warmed_in_the_background() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake)
        try:
            await speak(tts, SENTENCE)
            await eventually(lambda: fake.ws_connections == 2 and fake.sockets[1].init is not None)
            assert fake.sockets[1].messages == []
            audio, _ = await speak(tts, OTHER_SENTENCE)
        finally:
            await tts.close()
    assert fake.sockets[1].messages[0] == {"text": OTHER_SENTENCE + " ", "flush": True}
    assert audio == fake.audio_for(OTHER_SENTENCE)
    assert fake.texts == [Spoken("ws", SENTENCE), Spoken("ws", OTHER_SENTENCE)]


@pytest.mark.parametrize("how", ["task cancelled", "iteration abandoned"])
async def test_a_cancelled_sentence_closes_its_socket_and_leaks_no_audio(how: str) -> None:
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
            await eventually(lambda: not fake.sockets[0].open)
            assert fake.sockets[0].audio_bytes_sent < len(fake.audio_for(SENTENCE))  # cut mid-sentence
            audio, alignments = await speak(tts, OTHER_SENTENCE)
        finally:
            await tts.close()
    assert audio == fake.audio_for(OTHER_SENTENCE)
    assert "".join(alignment.chars for alignment in alignments) == OTHER_SENTENCE


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


async def test_an_error_before_any_audio_falls_back_to_http_streaming() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        fake.fail_next_ws_stream(after_chunks=0)
        tts = synthesizer(fake)
        try:
            audio, _ = await speak(tts, SENTENCE)
        finally:
            await tts.close()
    assert audio == fake.audio_for(SENTENCE)
    assert fake.texts == [Spoken("ws", SENTENCE), Spoken("http", SENTENCE)]


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
    # One standby may have been connecting when the limit was reached; nothing is tried after it.
    assert fake.refused_handshakes <= WS_FAILURES_BEFORE_HTTP + 1
    assert [spoken.transport for spoken in fake.texts] == ["http"] * (WS_FAILURES_BEFORE_HTTP + 3)


async def test_a_standby_the_server_closed_for_inactivity_gives_way_to_a_fresh_one() -> None:
    async with FakeElevenLabs(api_key=API_KEY, max_inactivity_s=0.2) as fake:
        tts = synthesizer(fake)
        try:
            await tts.prewarm()
            await eventually(lambda: fake.sockets[0].close_code == 1008)
            audio, _ = await speak(tts, SENTENCE)
        finally:
            await tts.close()
    assert audio == fake.audio_for(SENTENCE)
    assert fake.texts == [Spoken("ws", SENTENCE)]


async def test_an_unused_standby_is_replaced_before_it_grows_old() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake, standby_max_age_s=0.1)
        try:
            await tts.prewarm()
            await eventually(lambda: fake.ws_connections >= 2 and not fake.sockets[0].open)
            assert fake.open_sockets == 1
        finally:
            await tts.close()


async def test_close_closes_every_socket_and_is_idempotent() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        tts = synthesizer(fake)
        await speak(tts, SENTENCE)
        await eventually(lambda: fake.open_sockets == 1)  # the warm standby
        await tts.close()
        await tts.close()
        await eventually(lambda: fake.open_sockets == 0)
        with pytest.raises(TTSError, match="closed"):
            await speak(tts, OTHER_SENTENCE)
        assert fake.ws_connections == 2
