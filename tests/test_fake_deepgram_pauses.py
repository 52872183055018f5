"""The fake Deepgram's mid-sentence pauses (` | `), its Finalize reply, and its held-back finals, over a real socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np

from media.g711 import FRAME_BYTES, pcm16_to_ulaw
from tests.fakes.deepgram import FakeDeepgram
from tests.speech import silent_frames

QUERY = "?encoding=mulaw&sample_rate=8000&endpointing=300&interim_results=true&punctuate=true"


def tone_frames(ms: int) -> list[bytes]:
    """`ms` of a loud 440 Hz tone (speech to the fake's energy detector), in 20 ms frames."""
    t = np.arange(ms * 8) / 8000
    ulaw = pcm16_to_ulaw((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16))
    return [ulaw[i : i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]


async def finals_after(fake: FakeDeepgram, steps: list[list[bytes] | str]) -> list[dict[str, Any]]:
    """Send audio (frame lists) and control messages (strings) in order; return the final Results received."""
    headers = {"Authorization": "Token dg-test"}
    async with aiohttp.ClientSession() as http, http.ws_connect(fake.url + "/v1/listen" + QUERY, headers=headers) as ws:
        for step in steps:
            if isinstance(step, str):
                await ws.send_str(json.dumps({"type": step}))
                await asyncio.sleep(0.05)  # let the control land before the audio after it
            else:
                await ws.send_bytes(b"".join(step))
        await ws.send_str(json.dumps({"type": "CloseStream"}))
        messages = [json.loads(message.data) async for message in ws if message.type == aiohttp.WSMsgType.TEXT]
    return [m for m in messages if m["type"] == "Results" and m["is_final"]]


async def test_a_bar_splits_the_transcript_at_a_pause_the_endpointing_ends() -> None:
    async with FakeDeepgram(transcripts=["I would like to | book a table for two."]) as fake:
        finals = await finals_after(fake, [tone_frames(600), silent_frames(500), tone_frames(600), silent_frames(400)])
    said = [(f["channel"]["alternatives"][0]["transcript"], f["speech_final"]) for f in finals]
    assert said == [("I would like to", True), ("book a table for two.", True)]


async def test_a_pause_shorter_than_the_endpointing_keeps_the_first_part_for_all_the_speech() -> None:
    async with FakeDeepgram(transcripts=["I would like to | book a table."]) as fake:
        finals = await finals_after(fake, [tone_frames(400), silent_frames(200), tone_frames(400), silent_frames(400)])
    assert [f["channel"]["alternatives"][0]["transcript"] for f in finals] == ["I would like to"]


async def test_finalize_in_a_pause_finalizes_the_part_then_the_endpoint_sends_an_empty_speech_final() -> None:
    async with FakeDeepgram(transcripts=["see you | tomorrow."], finalize_delay_ms=30, final_delay_ms=30) as fake:
        finals = await finals_after(
            fake,
            [
                tone_frames(400),
                silent_frames(140),
                "Finalize",
                silent_frames(300),
                tone_frames(400),
                silent_frames(400),
            ],
        )
    said = [(f["channel"]["alternatives"][0]["transcript"], f["from_finalize"], f["speech_final"]) for f in finals]
    assert said == [("see you", True, False), ("", False, True), ("tomorrow.", False, True)]


async def test_a_held_back_final_keeps_its_place_before_later_results() -> None:
    async with FakeDeepgram(transcripts=["one.", "two."], final_delay_ms=300) as fake:
        finals = await finals_after(fake, [tone_frames(300), silent_frames(320), tone_frames(300), "Finalize"])
    # One writer keeps the order: the Finalize reply waits behind the endpoint's final, held back 300 ms.
    said = [(f["channel"]["alternatives"][0]["transcript"], f["from_finalize"]) for f in finals]
    assert said == [("one.", False), ("two.", True)]
