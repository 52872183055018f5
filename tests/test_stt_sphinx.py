"""PocketSphinx speech-to-text: eSpeak NG phrases sent as a caller's μ-law frames become turns with the key words."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import pytest

from pipelines.offline_workers import INLINE, OfflineWork, OfflineWorkers
from pipelines.stt.base import EndOfTurn, SpeechStarted, STTError, STTEvent, TranscriptUpdate
from pipelines.stt.sphinx import MAX_UTTERANCE_MS, SphinxSTT, Utterance, UtteranceBacklog
from tests.speech import events_after, noise_frames, silent_frames, spoken_frames

KEYPHRASES = ["book an appointment", "opening hours", "tuesday", "yes", "goodbye"]
R = TypeVar("R")


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[OfflineWorkers]:
    """Two worker processes, as the engine has by default."""
    async with OfflineWorkers(2) as workers:
        yield workers


def turns(events: Sequence[STTEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, EndOfTurn)]


async def recognize(pool: OfflineWork, *phrases: str, voice: str = "en-us") -> list[STTEvent]:
    stt = SphinxSTT(keyphrases=KEYPHRASES, work=pool)
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
    pool: OfflineWorkers, phrase: str, key_words: list[str]
) -> None:
    [text] = turns(await recognize(pool, phrase))
    assert all(word in text.split() for word in key_words), text


async def test_tuesday_is_recognized_across_natural_renditions(pool: OfflineWorkers) -> None:
    # Successive eSpeak syntheses differ (pitch flutter): without the n-best keyphrase rescue about one in four of
    # these came out as "two please". With the demo's keyphrases 20/20 keep it now; with this smaller vocabulary
    # rendition 7 still reads "two please", so allow one miss in 8 as for any real recognizer.
    texts = []
    for variant in range(1, 9):
        stt = SphinxSTT(keyphrases=KEYPHRASES, work=pool)
        await stt.start()
        frames = silent_frames(500) + await spoken_frames("tuesday please", variant=variant) + silent_frames(1200)
        texts += turns(await events_after(stt, frames))
    assert len(texts) == 8 and sum("tuesday" in text.split() for text in texts) >= 7, " | ".join(texts)


async def test_a_turn_reports_speech_start_then_final_transcript_then_end_of_turn(pool: OfflineWorkers) -> None:
    events = await recognize(pool, "yes")
    assert [type(event) for event in events] == [SpeechStarted, TranscriptUpdate, EndOfTurn]
    started, final, end = events
    assert isinstance(started, SpeechStarted) and isinstance(final, TranscriptUpdate) and isinstance(end, EndOfTurn)
    assert final.is_final and final.text == end.text
    assert 300 <= started.at_ms < end.at_ms


async def test_silence_and_low_noise_produce_no_events(pool: OfflineWorkers) -> None:
    stt = SphinxSTT(work=pool)
    await stt.start()
    assert await events_after(stt, silent_frames(2000) + noise_frames(3000, level=30.0)) == []


async def test_two_utterances_separated_by_silence_are_two_turns_in_order(pool: OfflineWorkers) -> None:
    texts = turns(await recognize(pool, "I would like to book an appointment", "no thank you goodbye"))
    assert len(texts) == 2
    assert "appointment" in texts[0].split() and "goodbye" in texts[1].split()


async def test_the_end_of_turn_waits_for_the_configured_silence(pool: OfflineWorkers) -> None:
    stt = SphinxSTT(keyphrases=KEYPHRASES, work=pool, end_silence_ms=1500)
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


async def test_a_caller_talking_on_past_the_longest_utterance_is_one_turn_not_two(pool: OfflineWorkers) -> None:
    # A caller who never pauses for the end-of-turn silence: their speech is decoded in stretches of at most
    # MAX_UTTERANCE_MS, but the turn ends once, when they pause, with all of it (not mid-sentence, to be answered
    # while they still talk).
    stt = SphinxSTT(keyphrases=KEYPHRASES, work=pool)
    await stt.start()
    speech = await spoken_frames(", ".join(["I would like to book an appointment"] * 12) + ", goodbye")
    assert len(speech) * 20 > MAX_UTTERANCE_MS + 2000
    events = await events_after(stt, silent_frames(500) + speech + silent_frames(1000))
    [end] = [event for event in events if isinstance(event, EndOfTurn)]
    assert end.at_ms >= 500 + len(speech) * 20 - 1000  # when the caller stopped, not 20 s in
    assert "appointment" in end.text.split() and "goodbye" in end.text.split()
    assert [type(event) for event in events] == [SpeechStarted, TranscriptUpdate, EndOfTurn]


async def test_concurrent_recognizers_share_the_workers() -> None:
    async with OfflineWorkers(2) as workers:
        results = await asyncio.gather(*(recognize(workers, "I would like to book an appointment") for _ in range(6)))
    assert all("appointment" in " ".join(turns(events)).split() for events in results)


async def test_a_recognizer_built_to_run_inline_recognizes_on_the_event_loop() -> None:
    [text] = turns(await recognize(INLINE, "tuesday please"))
    assert "tuesday" in text.split()


async def test_a_dead_worker_fails_that_recognizer_and_the_next_one_works() -> None:
    async with OfflineWorkers(1) as workers:
        stt = SphinxSTT(keyphrases=KEYPHRASES, work=_DyingOnce(workers))
        await stt.start()
        with pytest.raises(STTError, match="offline worker process died"):
            await events_after(stt, silent_frames(500) + await spoken_frames("yes") + silent_frames(1000))
        [text] = turns(await recognize(workers, "yes"))
    assert text == "yes"


class _DyingOnce:
    """The workers, except that the first decode kills the worker running it, as a crash in the decoder would."""

    def __init__(self, workers: OfflineWorkers) -> None:
        self.workers = workers
        self.decodes = 0

    async def run(self, job: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        if job.__name__ == "recognize_utterance":
            self.decodes += 1
            if self.decodes == 1:
                await self.workers.run(_exit_worker)
        return await self.workers.run(job, *args, **kwargs)


def _exit_worker() -> None:
    import os

    os._exit(1)


class _HeldWork:
    """Inline work whose decodes wait until released, as when every worker is busy with other calls."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.decoded: list[int] = []

    async def run(self, job: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        if job.__name__ == "recognize_utterance":
            await self.release.wait()
            self.decoded.append(len(args[0]) // 8)
        return job(*args, **kwargs)


async def test_a_call_whose_decodes_fall_behind_drops_its_oldest_waiting_speech_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    work = _HeldWork()
    stt = SphinxSTT(keyphrases=KEYPHRASES, work=work, max_backlog_ms=2500)
    await stt.start()
    phrases = ["yes", "I would like to book an appointment", "what are your opening hours", "goodbye"]
    with caplog.at_level(logging.WARNING, logger="pipelines.stt.sphinx"):
        for phrase in phrases:
            for frame in await spoken_frames(phrase) + silent_frames(1000):
                stt.send_audio(frame)
            await asyncio.sleep(0)  # the first utterance's decode starts and is held
        work.release.set()
        texts = turns(await events_after(stt, []))
    assert "yes" in texts[0].split()
    assert "goodbye" in texts[-1].split()
    assert len(texts) < len(phrases)
    assert "dropped the oldest utterance" in caplog.text


def _utterance(ms: int, at_ms: int) -> Utterance:
    return Utterance(np.zeros(8 * ms, dtype=np.int16), at_ms)


async def test_the_backlog_hands_out_utterances_oldest_first_then_none_once_closed() -> None:
    backlog = UtteranceBacklog(max_ms=10_000)
    backlog.put(_utterance(1000, at_ms=1000))
    backlog.put(_utterance(500, at_ms=3000))
    backlog.close()
    got = [await backlog.get(), await backlog.get(), await backlog.get()]
    assert [u.at_ms if u else None for u in got] == [1000, 3000, None]


async def test_the_backlog_over_its_bound_drops_the_oldest_and_keeps_the_newest() -> None:
    backlog = UtteranceBacklog(max_ms=2000)
    for at_ms in (1000, 2000, 3000, 4000):
        backlog.put(_utterance(900, at_ms=at_ms))
    assert backlog.waiting_ms <= 2000
    assert backlog.dropped == 2
    backlog.close()
    assert [(await backlog.get()).at_ms, (await backlog.get()).at_ms] == [3000, 4000]  # type: ignore[union-attr]


async def test_the_backlog_keeps_a_single_utterance_longer_than_its_bound() -> None:
    backlog = UtteranceBacklog(max_ms=1000)
    backlog.put(_utterance(5000, at_ms=5000))
    assert backlog.dropped == 0
    assert (await backlog.get()) is not None


async def test_events_end_after_close_even_without_speech(pool: OfflineWorkers) -> None:
    stt = SphinxSTT(work=pool)
    await stt.start()
    await stt.close()
    await stt.close()
    assert [event async for event in stt.events()] == []
