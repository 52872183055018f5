"""The fakes' pacing as bench/bench_cloud.py sets it: the model's first token and token rate, ElevenLabs' first byte
and audio pace, and the bench's fake Deepgram choosing each stream's transcript by its agent's keyterm.

Pacing is checked as lower bounds only (a fake may be slower on a busy machine, never faster than it was told).
"""

from __future__ import annotations

import asyncio
import inspect
import json

import aiohttp
import numpy as np
from openai import AsyncOpenAI

from bench.bench_cloud import (
    PAUSE_FIRST,
    PAUSE_KEYTERM,
    PAUSE_TRANSCRIPT,
    REPLIES,
    TRANSCRIPT,
    BenchDeepgram,
    BenchOpenAI,
    Delays,
    deepgram_pacing,
)
from media.g711 import FRAME_BYTES, SAMPLE_RATE, ULAW_SILENCE, pcm16_to_ulaw
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.elevenlabs import FakeElevenLabs
from tests.fakes.openai_chat import FakeOpenAI, token_deltas

TIMER_SLACK_S = 0.003
"""asyncio may wake a timer up to a clock tick early: lower bounds allow this much."""


async def _stream_arrivals(fake: FakeOpenAI, text: str) -> tuple[float, list[tuple[float, str]]]:
    """Ask for a streamed completion; return when it was asked and each content delta with its arrival time."""
    fake.replies.append(text)
    client = AsyncOpenAI(api_key="sk-pace", base_url=fake.base_url, max_retries=0)
    loop = asyncio.get_running_loop()
    try:
        asked = loop.time()
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        arrivals = [
            (loop.time(), chunk.choices[0].delta.content)
            async for chunk in stream
            if chunk.choices and chunk.choices[0].delta.content
        ]
    finally:
        await client.close()
    return asked, arrivals


async def test_the_model_waits_for_its_first_token_then_streams_at_its_token_rate() -> None:
    delays = Delays(llm_first_token=120, tokens_per_second=100)
    text = "Of course, which day would suit you best?"
    async with FakeOpenAI(
        api_key="sk-pace", first_token_delay_ms=delays.llm_first_token, token_interval_ms=delays.token_interval_ms
    ) as fake:
        asked, arrivals = await _stream_arrivals(fake, text)
    assert "".join(delta for _, delta in arrivals) == text
    assert len(arrivals) == len(token_deltas(text))
    assert arrivals[0][0] - asked >= delays.llm_first_token / 1000 - TIMER_SLACK_S
    # A delta may reach the client late and the next on time, so the pace shows over the whole reply.
    span = arrivals[-1][0] - arrivals[0][0]
    assert span >= (len(arrivals) - 1) * delays.token_interval_ms / 1000 - TIMER_SLACK_S


async def test_without_a_token_rate_the_whole_reply_follows_the_first_token() -> None:
    assert Delays(tokens_per_second=0).token_interval_ms == 0
    assert Delays().token_interval_ms == 1000 / 60


async def test_elevenlabs_waits_for_its_first_byte_then_sends_audio_at_its_pace() -> None:
    text = "Sure, I can help with that."
    async with (
        FakeElevenLabs(api_key="el-pace", first_byte_delay_ms=100, chunk_ms=100, chunk_interval_ms=25) as fake,
        aiohttp.ClientSession() as http,
    ):
        loop = asyncio.get_running_loop()
        asked = loop.time()
        arrivals: list[tuple[float, int]] = []
        async with http.post(
            f"{fake.url}/v1/text-to-speech/voice/stream",
            json={"text": text},
            headers={"xi-api-key": "el-pace"},
        ) as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                arrivals.append((loop.time(), len(chunk)))
        expected = len(fake.audio_for(text))
    assert sum(size for _, size in arrivals) == expected
    assert arrivals[0][0] - asked >= 0.100 - TIMER_SLACK_S
    chunks = -(-expected // (100 * SAMPLE_RATE // 1000))
    assert arrivals[-1][0] - arrivals[0][0] >= (chunks - 1) * 0.025 - TIMER_SLACK_S


def test_the_bench_passes_deepgram_only_the_pacing_its_fake_accepts() -> None:
    pacing = deepgram_pacing(Delays(final_delay=210, finalize_delay=90))
    accepted = inspect.signature(FakeDeepgram.__init__).parameters
    assert set(pacing) <= {"final_delay_ms", "finalize_delay_ms"}
    assert set(pacing) == {name for name in ("final_delay_ms", "finalize_delay_ms") if name in accepted}
    assert {"final_delay_ms": 210, "finalize_delay_ms": 90}.items() >= pacing.items()


def _tone_then_silence(speech_ms: int, silence_ms: int) -> bytes:
    samples = np.arange(speech_ms * SAMPLE_RATE // 1000)
    tone = pcm16_to_ulaw((9000 * np.sin(2 * np.pi * 440 * samples / SAMPLE_RATE)).astype(np.int16))
    return tone + bytes([ULAW_SILENCE]) * (silence_ms * SAMPLE_RATE // 1000)


async def _final_transcript(fake: BenchDeepgram, query: str) -> str:
    """Send one burst of speech and its endpointing silence on a new stream; return the final transcript."""
    audio = _tone_then_silence(600, 400)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"{fake.url}/v1/listen?endpointing=300&{query}", headers={"Authorization": "Token dg-pace"}
        ) as ws,
    ):
        for start in range(0, len(audio), FRAME_BYTES):
            await ws.send_bytes(audio[start : start + FRAME_BYTES])
        async for message in ws:
            result = json.loads(message.data)
            if result.get("type") == "Results" and result["is_final"]:
                return str(result["channel"]["alternatives"][0]["transcript"])
    raise AssertionError("no final result")


async def test_the_bench_deepgram_hears_the_pausing_callers_sentence_on_their_streams_only() -> None:
    async with BenchDeepgram(api_key="dg-pace") as fake:
        plain = await _final_transcript(fake, "model=nova-3")
        pausing = await _final_transcript(fake, f"model=nova-3&keyterm={PAUSE_KEYTERM}")
    assert plain == TRANSCRIPT
    # One burst without a pause: the fake recognizes the sentence's first part (a newer fake) or all of it (an older).
    assert pausing in {PAUSE_FIRST, PAUSE_TRANSCRIPT}


async def test_the_bench_model_answers_by_turn_and_counts_requests_about_a_half_sentence() -> None:
    async with BenchOpenAI(api_key="sk-pace") as fake:
        client = AsyncOpenAI(api_key="sk-pace", base_url=fake.base_url, max_retries=0)
        try:
            first = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Can you tell me your opening hours?"}]
            )
            half = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[
                    {"role": "user", "content": "Can you tell me your opening hours?"},
                    {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": f"{PAUSE_FIRST}"},
                ],
            )
        finally:
            await client.close()
    assert first.choices[0].message.content == REPLIES[1]
    assert half.choices[0].message.content == REPLIES[2]
    assert fake.half_sentence_requests == 1
