"""Caller audio for recognizer tests: eSpeak NG phrases as 20 ms μ-law frames, as they arrive from Twilio."""

from __future__ import annotations

import asyncio

import numpy as np

from media.framing import FrameSplitter
from media.g711 import FRAME_BYTES, ULAW_SILENCE, pcm16_to_ulaw
from pipelines.stt.base import SpeechToText, STTEvent
from pipelines.tts.espeak import speak_pcm


async def spoken_frames(text: str, *, voice: str = "en-us", variant: int = 0) -> list[bytes]:
    """`text` spoken by eSpeak NG as 8 kHz μ-law frames of 20 ms; each `variant` is another natural rendition."""
    audio = await asyncio.to_thread(speak_pcm, text, voice=voice, sample_rate=8000, variant=variant)
    splitter = FrameSplitter()
    frames = splitter.push(pcm16_to_ulaw(audio.samples))
    tail = splitter.flush()
    return frames + ([tail] if tail else [])


def silent_frames(ms: int) -> list[bytes]:
    """`ms` milliseconds of μ-law digital silence, in 20 ms frames."""
    return [bytes([ULAW_SILENCE]) * FRAME_BYTES] * (ms // 20)


def noise_frames(ms: int, *, level: float, seed: int = 0) -> list[bytes]:
    """`ms` milliseconds of white noise at `level` (standard deviation in 16-bit units), in 20 ms frames."""
    samples = np.random.default_rng(seed).normal(0.0, level, ms * 8).clip(-32768, 32767).astype(np.int16)
    ulaw = pcm16_to_ulaw(samples)
    return [ulaw[start : start + FRAME_BYTES] for start in range(0, len(ulaw), FRAME_BYTES)]


async def events_after(stt: SpeechToText, frames: list[bytes]) -> list[STTEvent]:
    """Send `frames`, close the recognizer, and return every event it produced."""
    for frame in frames:
        stt.send_audio(frame)
    await stt.close()
    return [event async for event in stt.events()]
