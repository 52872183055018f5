"""The phrase cache: an agent's scripted phrases synthesized once per voice (real ElevenLabs client, local fake),
said from memory afterwards with their timings; nothing kept that was cut short or failed, the memory bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from pipelines.clients import ProviderClients
from pipelines.fallback import FallbackTTS
from pipelines.offline_workers import INLINE
from pipelines.streams import closing_stream
from pipelines.tts.base import Alignment, TextToSpeech, TTSError
from pipelines.tts.elevenlabs import ElevenLabsTTS
from pipelines.tts.espeak import EspeakTTS, SpeechCache
from pipelines.tts.phrases import PhraseCache
from tests.fakes.elevenlabs import FakeElevenLabs, Spoken
from tests.test_tts_elevenlabs import synthesizer

API_KEY = "el-phrases"
GREETING = "Hello, thanks for calling the clinic."
GOODBYE = "Thanks for calling, goodbye."

CLIENTS = ProviderClients()


@pytest.fixture(scope="module", autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await CLIENTS.aclose()


def voice(fake: FakeElevenLabs, **options: Any) -> ElevenLabsTTS:
    """A call's ElevenLabs synthesizer, on this module's clients and key unless `options` say otherwise."""
    return synthesizer(fake, **{"api_key": API_KEY, "clients": CLIENTS, **options})


async def say(cache: PhraseCache, tts: TextToSpeech, text: str, owner: str = "org-a") -> tuple[bytes, list[Alignment]]:
    audio = bytearray()
    alignments: list[Alignment] = []
    async with closing_stream(cache.synthesize(tts, text, owner=owner)) as chunks:
        async for chunk in chunks:
            if isinstance(chunk, Alignment):
                alignments.append(chunk)
            else:
                audio += chunk
    return bytes(audio), alignments


async def test_a_phrase_is_synthesized_once_and_said_again_from_memory_with_its_timings() -> None:
    cache = PhraseCache()
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        first_call, second_call = voice(fake), voice(fake)
        try:
            first = await say(cache, first_call, GREETING)
            second = await say(cache, second_call, GREETING)
        finally:
            await first_call.close()
            await second_call.close()
    assert fake.texts == [Spoken("ws", GREETING)]
    assert first[0] == fake.audio_for(GREETING)
    assert second == first  # the same audio and the same character timings, for the cut transcript
    assert "".join(alignment.chars for alignment in second[1]) == GREETING
    assert (cache.hits, cache.misses, len(cache), cache.bytes) == (1, 1, 1, len(first[0]))


async def test_another_organization_voice_account_or_voice_setting_synthesizes_the_phrase_itself() -> None:
    cache = PhraseCache()
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        voices = [voice(fake), voice(fake, voice_id="voice-rachel"), voice(fake, stability=0.9)]
        try:
            for tts in voices:
                await say(cache, tts, GREETING)
            await say(cache, voices[1], GREETING)  # now said before in that voice
            await say(cache, voices[0], GREETING, owner="org-b")  # the same voice, for another organization
        finally:
            for tts in voices:
                await tts.close()
    assert fake.texts == [Spoken("ws", GREETING)] * 4
    assert (cache.hits, cache.misses, len(cache)) == (1, 4, 4)
    assert len({tts.voice_key for tts in voices}) == 3
    other_account = voice(fake, api_key="el-other-account")
    assert other_account.voice_key != voices[0].voice_key  # accounts never share audio
    assert API_KEY not in voices[0].voice_key  # the account is named by a hash of its key


async def test_a_phrase_cut_short_is_not_kept() -> None:
    cache = PhraseCache()
    async with FakeElevenLabs(api_key=API_KEY, chunk_ms=100) as fake:
        tts = voice(fake)
        try:
            async with closing_stream(cache.synthesize(tts, GREETING, owner="org-a")) as chunks:
                async for chunk in chunks:
                    if isinstance(chunk, bytes):
                        break  # the caller barged in on the first audio
            await say(cache, tts, GREETING)
        finally:
            await tts.close()
    assert fake.texts == [Spoken("ws", GREETING)] * 2
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 1)


async def test_a_phrase_whose_synthesis_failed_midway_is_not_kept() -> None:
    cache = PhraseCache()
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        fake.fail_next_ws_stream(after_chunks=1, error="internal_error", message="Something broke.")
        tts = voice(fake)
        try:
            with pytest.raises(TTSError, match="Something broke"):
                await say(cache, tts, GREETING)
            assert len(cache) == 0
            audio, _ = await say(cache, tts, GREETING)
        finally:
            await tts.close()
    assert audio == fake.audio_for(GREETING)
    assert len(cache) == 1


async def test_a_phrase_said_without_timings_is_not_kept() -> None:
    cache = PhraseCache()
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        fake.refuse_websocket = True  # ElevenLabs' HTTP streaming speaks, with no character timings
        untimed = voice(fake)
        try:
            audio, alignments = await say(cache, untimed, GREETING)
        finally:
            await untimed.close()
        fake.refuse_websocket = False
        timed = voice(fake)
        try:
            again = await say(cache, timed, GREETING)
        finally:
            await timed.close()
    assert audio == fake.audio_for(GREETING) and alignments == []
    assert fake.texts == [Spoken("http", GREETING), Spoken("ws", GREETING)]  # synthesized again, with its timings
    assert again[0] == audio and again[1]
    assert len(cache) == 1


async def test_the_least_recently_said_phrases_go_first_and_a_monologue_is_never_kept() -> None:
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        greeting, goodbye = fake.audio_for(GREETING), fake.audio_for(GOODBYE)
        cache = PhraseCache(max_bytes=len(greeting) + len(goodbye), max_phrase_bytes=len(greeting))
        tts = voice(fake)
        try:
            await say(cache, tts, GREETING)
            await say(cache, tts, GOODBYE)
            assert (len(cache), cache.bytes) == (2, len(greeting) + len(goodbye))
            await say(cache, tts, GREETING)  # said again: now the most recent
            long = "Please listen carefully, as our menu options have changed recently."
            assert len(fake.audio_for(long)) > len(greeting)
            await say(cache, tts, long)  # longer than any phrase kept
            assert len(cache) == 2
            third = "See you soon."
            await say(cache, tts, third)  # room is made by dropping the goodbye, said least recently
            await say(cache, tts, GREETING)
        finally:
            await tts.close()
    assert [spoken.text for spoken in fake.texts] == [GREETING, GOODBYE, long, third]
    assert cache.bytes <= cache.max_bytes


async def test_a_fallback_synthesizer_names_the_voice_it_speaks_with_now() -> None:
    cache = PhraseCache()
    async with FakeElevenLabs(api_key=API_KEY) as fake:
        primary, secondary = voice(fake), voice(fake, voice_id="voice-rachel")
        fallback = FallbackTTS([("first", primary), ("second", secondary)])
        try:
            await say(cache, fallback, GREETING)
            assert fallback.voice_key == primary.voice_key
            assert fallback.fail_over() == "second"
            assert fallback.voice_key == secondary.voice_key
            await say(cache, fallback, GREETING)  # the second voice has not said it yet
            await say(cache, secondary, GREETING)
        finally:
            await fallback.close()
    assert fake.texts == [Spoken("ws", GREETING)] * 2
    assert (cache.hits, cache.misses) == (1, 2)


async def test_a_synthesizer_that_names_no_voice_is_passed_through() -> None:
    cache = PhraseCache()
    espeak = EspeakTTS(work=INLINE, cache=SpeechCache())
    audio, _ = await say(cache, espeak, GREETING)
    assert audio
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)
