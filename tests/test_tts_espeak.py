"""eSpeak NG text-to-speech: real synthesis through the wheel's library, μ-law 8 kHz chunks, shared cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest

from pipelines.offline_workers import INLINE, OfflineWorkers
from pipelines.tts.base import TTSError
from pipelines.tts.espeak import CHUNK_BYTES, NATIVE_SAMPLE_RATE, EspeakTTS, SpeechCache, speak_pcm

SENTENCE = "Thank you for calling, how can I help you today?"
R = TypeVar("R")


@pytest.fixture(scope="module")
async def workers() -> AsyncIterator[OfflineWorkers]:
    """Two worker processes, as the engine has by default."""
    async with OfflineWorkers(2) as pool:
        yield pool


class CountingWork:
    """Inline work counting the texts it is asked to speak."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def run(self, job: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        self.calls.append(args[0])
        return await INLINE.run(job, *args, **kwargs)


async def speak(tts: EspeakTTS, text: str) -> list[bytes]:
    return [chunk async for chunk in tts.synthesize(text)]


def test_a_sentence_is_spoken_with_plausible_duration() -> None:
    audio = speak_pcm(SENTENCE)
    assert audio.sample_rate == NATIVE_SAMPLE_RATE
    assert 20 * len(SENTENCE) < audio.duration_ms < 200 * len(SENTENCE)
    assert int(abs(audio.samples.astype("int32")).max()) > 1000


@pytest.mark.parametrize("voice", ["en-us", "en-gb"])
def test_english_voices_both_speak(voice: str) -> None:
    audio = speak_pcm("Tuesday at ten", voice=voice)
    assert audio.duration_ms > 300


def test_the_same_text_is_the_same_audio_every_time() -> None:
    first = speak_pcm("tuesday please")
    speak_pcm(SENTENCE, voice="en-gb")  # eSpeak state from another text must not leak
    again = speak_pcm("tuesday please")
    assert first.samples.tobytes() == again.samples.tobytes()


def test_variants_are_other_renditions_each_repeatable() -> None:
    plain, one, two = [speak_pcm("tuesday please", variant=n).samples for n in (0, 1, 2)]
    assert len({plain.tobytes(), one.tobytes(), two.tobytes()}) == 3
    assert speak_pcm("tuesday please", variant=1).samples.tobytes() == one.tobytes()


def test_an_unknown_voice_raises_naming_it() -> None:
    with pytest.raises(TTSError, match="xx-nowhere"):
        speak_pcm("hello", voice="xx-nowhere")


@pytest.mark.parametrize("voice", ["English (America)", "gmw/en-US", "EN-GB", "en-us+f3", "en-us+Mr serious"])
def test_a_voice_may_be_named_by_its_name_its_file_or_a_language_and_take_a_variant(voice: str) -> None:
    assert speak_pcm("Tuesday at ten", voice=voice).duration_ms > 300


async def test_a_variants_name_alone_is_refused_before_it_can_crash_the_worker(workers: OfflineWorkers) -> None:
    # "Alex" is a variant file: eSpeak NG loads it as a voice without phonemes, then crashes the process.
    with pytest.raises(TTSError, match="unknown voice 'Alex'"):
        await speak(EspeakTTS(work=workers, voice="Alex", cache=SpeechCache()), "hello")
    assert len(await speak(EspeakTTS(work=workers, cache=SpeechCache()), "hello")) > 0


def test_the_engine_speaks_again_after_an_unknown_voice() -> None:
    with pytest.raises(TTSError):
        speak_pcm("hello", voice="xx-nowhere")
    audio = speak_pcm("hello")
    assert audio.duration_ms > 100


async def test_ulaw_output_comes_in_100_ms_chunks_of_8khz_audio(workers: OfflineWorkers) -> None:
    chunks = await speak(EspeakTTS(work=workers, cache=SpeechCache()), SENTENCE)
    assert len(chunks) > 1
    assert all(len(chunk) == CHUNK_BYTES for chunk in chunks[:-1])
    assert 0 < len(chunks[-1]) <= CHUNK_BYTES
    native = speak_pcm(SENTENCE)
    ulaw_ms = sum(map(len, chunks)) / 8
    assert abs(ulaw_ms - native.duration_ms) < 100


async def test_empty_text_yields_no_audio() -> None:
    assert await speak(EspeakTTS(work=INLINE, cache=SpeechCache()), "  ") == []


async def test_a_repeated_text_comes_from_the_cache_without_the_engine() -> None:
    work = CountingWork()
    cache = SpeechCache()
    first = await speak(EspeakTTS(work=work, cache=cache), SENTENCE)
    again = await speak(EspeakTTS(work=work, cache=cache), SENTENCE)
    assert again == first
    assert work.calls == [SENTENCE]


async def test_different_settings_are_cached_apart() -> None:
    work = CountingWork()
    cache = SpeechCache()
    await speak(EspeakTTS(work=work, cache=cache), "yes")
    await speak(EspeakTTS(work=work, cache=cache, rate=220), "yes")
    assert len(work.calls) == 2


async def test_calls_asking_for_the_same_text_at_once_share_one_synthesis() -> None:
    work = CountingWork()
    cache = SpeechCache()
    results = await asyncio.gather(*(speak(EspeakTTS(work=work, cache=cache), SENTENCE) for _ in range(20)))
    assert all(result == results[0] for result in results)
    assert work.calls == [SENTENCE]


async def test_the_cache_evicts_the_least_recently_used_text() -> None:
    work = CountingWork()
    cache = SpeechCache(max_entries=2)
    tts = EspeakTTS(work=work, cache=cache)
    for text in ("one", "two", "one", "three", "one", "two"):
        await speak(tts, text)
    assert work.calls == ["one", "two", "three", "two"]
    assert len(cache) == 2


async def test_many_concurrent_syntheses_all_complete(workers: OfflineWorkers) -> None:
    texts = [f"This is caller number {n}." for n in range(40)]
    results = await asyncio.gather(*(speak(EspeakTTS(work=workers, cache=SpeechCache()), text) for text in texts))
    assert all(sum(map(len, chunks)) > 4000 for chunks in results)


async def test_the_event_loop_keeps_ticking_during_a_long_synthesis(workers: OfflineWorkers) -> None:
    long_text = " ".join([SENTENCE] * 60)
    longest_gap = 0.0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal longest_gap
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            longest_gap = max(longest_gap, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        chunks = await speak(EspeakTTS(work=workers, cache=SpeechCache()), long_text)
    finally:
        done.set()
        await ticker
    assert sum(map(len, chunks)) > 8000 * 60
    assert longest_gap < 0.2
